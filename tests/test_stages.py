"""The DAG is described once (easyanimate.stages); dvc.yaml and the library must agree with it."""

import subprocess
import sys

import yaml

from easyanimate.config import load_settings
from easyanimate.stages import STAGE_NAMES, STAGES, stage_inputs_hash, stage_version
from tests.conftest import REPO


def test_dvc_yaml_matches_stage_specs():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    settings = load_settings(REPO / "params.yaml")
    assert list(dvc) == list(STAGE_NAMES)
    for spec in STAGES:
        stage = dvc[spec.name]
        assert stage["cmd"] == f"easyanimate run {spec.name}"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        for dep in spec.deps:
            path = str(getattr(settings.paths, dep))
            if dep != "captions":  # the captions file lives inside the raw-video folder dep
                assert path in stage["deps"], f"{spec.name}: dvc.yaml lacks dep {path}"
        for out in spec.outs:
            assert str(getattr(settings.paths, out)) in outs, f"{spec.name}: dvc.yaml lacks out {out}"
        for param in stage["params"]:
            node = yaml.safe_load((REPO / "params.yaml").read_text())
            for part in param.split("."):
                node = node[part]  # every DVC param key must exist in params.yaml


def test_stage_version_follows_settings(tmp_path):
    base = load_settings(REPO / "params.yaml")
    changed = load_settings(REPO / "params.yaml", overrides={"dit": {"stage2": {"steps": 3}}})
    assert stage_version("dit_stage2", base) != stage_version("dit_stage2", changed)
    assert stage_version("vae_stage1", base) == stage_version("vae_stage1", changed)
    assert stage_version("curate", base) == stage_version("curate", changed)


def test_inputs_hash_follows_input_content(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.mp4").write_bytes(b"1")
    settings = load_settings(REPO / "params.yaml", overrides={"paths": {"raw_videos": str(raw),
                                                                       "captions": str(raw / "c.yaml")}})
    first = stage_inputs_hash("curate", settings)
    assert first == stage_inputs_hash("curate", settings)
    (raw / "a.mp4").write_bytes(b"2")
    assert stage_inputs_hash("curate", settings) != first


def test_library_never_imports_prefect():
    code = (
        "import sys, importlib, pkgutil, easyanimate\n"
        "skip = {'easyanimate.cli'}\n"
        "for m in pkgutil.walk_packages(easyanimate.__path__, 'easyanimate.'):\n"
        "    if m.name not in skip: importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
        "assert not bad, bad[:5]\n"
        "train = [m for m in sys.modules if m.startswith('easyanimate.training')]\n"
        "print('ok', len(train))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def test_dit_latent_cache_skips_decode_and_encode(tmp_path, monkeypatch):
    """Latents are computed once per (VAE, manifest, sampling); a second stage reads them back."""
    import shutil

    import torch

    from easyanimate.data.curate import curate_video
    from easyanimate.data.manifest import write_manifest
    from easyanimate.data.curate import build_manifest
    from easyanimate.models.vae import SliceVAE
    from easyanimate.training import dit as dit_training

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(REPO / "data" / "samples" / "bigbuckbunny.mp4", raw / "bigbuckbunny.mp4")
    settings = load_settings(REPO / "params.yaml", overrides={"paths": {
        "raw_videos": str(raw), "captions": str(REPO / "data" / "samples" / "captions.yaml"),
        "curated": str(tmp_path / "curated"), "cache": str(tmp_path / "cache")},
        "curate": {"text": {"enabled": False}}})  # OCR is not what this test is about
    df = build_manifest(curate_video(raw / "bigbuckbunny.mp4", settings, settings.paths.curated), settings)
    df.loc[df["status"] == "accepted", "split"] = "train"
    write_manifest(df, settings.paths.curated / "manifest.parquet")
    vae_dir = tmp_path / "vae"
    SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(vae_dir)

    vae = SliceVAE.from_pretrained(vae_dir)
    clips = dit_training.load_clip_frames(settings.paths.curated, "train", 32, 4.0)
    text = dit_training.TextBank.build(settings, [c.caption for c in clips])
    cache = dit_training.LatentCache(tmp_path / "cache", vae_dir, settings.paths.curated, ("train", 32, 4.0, None), 0)
    assert not cache.has({1, 8})
    first = cache.windows(vae, clips, 8, text)
    cache.windows(vae, clips, 1, text)
    assert cache.has({1, 8}) and cache.captions() == [c.caption for c in clips]

    monkeypatch.setattr(dit_training, "encode_windows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    again = dit_training.LatentCache(tmp_path / "cache", vae_dir, settings.paths.curated, ("train", 32, 4.0, None), 0)
    second = again.windows(vae, None, 8, text)
    assert len(second) == len(first) > 0
    assert all(torch.equal(a, b) for a, b in zip(first.latents, second.latents))
    assert second.caption_ids == first.caption_ids
    # A different VAE is a different cache entry.
    SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(tmp_path / "vae2")
    assert not dit_training.LatentCache(tmp_path / "cache", tmp_path / "vae2", settings.paths.curated,
                                        ("train", 32, 4.0, None), 0).has({8})
