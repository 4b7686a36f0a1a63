"""The DAG is described once (easyanimate.stages); dvc.yaml, code versions and params derive from it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from easyanimate.config import load_settings
from easyanimate.stages import (
    CHECK_STAGE,
    STAGE_NAMES,
    STAGES,
    descendants,
    dvc_yaml,
    get_stage,
    params_problems,
    stage_inputs_hash,
    stage_modules,
    stage_names_for,
    stage_version,
    stages_for,
    upstream_stages,
)
from tests.conftest import REPO


def test_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(REPO / "params.yaml", REPO), (
        "dvc.yaml is stale: run `easyanimate dvc-yaml`"
    )
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    family = load_settings(REPO / "params.yaml").model.family
    assert list(stages) == [CHECK_STAGE, *stage_names_for(family)]
    assert all(stages[name]["cmd"] == f"easyanimate run {name}" for name in stage_names_for(family))


def test_each_model_family_has_its_own_dag_sharing_curation(tmp_path):
    native, v51 = stage_names_for("native"), stage_names_for("easyanimate-v5.1")
    assert native[0] == v51[0] == "curate" and set(native) & set(v51) == {"curate"}
    assert set(native) | set(v51) == set(STAGE_NAMES)
    assert v51 == ("curate", "v51_vae", "v51_latents", "v51_finetune", "v51_evaluate", "v51_register")
    for name in v51[1:]:  # each V5.1 stage reads only outputs of the V5.1 DAG (or curation)
        assert set(upstream_stages(name)) <= set(v51), name
    # dvc.yaml follows the family in the params file; switching it makes the committed dvc.yaml stale.
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny\nmodel: {family: easyanimate-v5.1}\n")
    stages = yaml.safe_load(dvc_yaml(params, tmp_path))["stages"]
    assert list(stages) == [CHECK_STAGE, *v51]
    assert stages["v51_finetune"]["deps"][0] == "data/v51_latents"
    assert "loss.csv" in str(stages["v51_finetune"]["plots"])
    assert dvc_yaml(params, tmp_path) != (REPO / "dvc.yaml").read_text()


def test_code_versions_are_derived_from_imports():
    dit, vae = set(stage_modules("dit_stage1")), set(stage_modules("vae_stage1"))
    assert "easyanimate.data.buckets" in dit and "easyanimate.data.datasets" in dit
    assert "easyanimate.data.buckets" not in vae  # bucketing is DiT code: editing it must not retrain the VAE
    assert "easyanimate.config" in vae and "easyanimate.training.common" in vae
    for spec in STAGES:
        if spec.module != "easyanimate.registry":  # registration reads the DAG itself (lineage of every stage)
            assert "easyanimate.stages" not in stage_modules(spec.name), f"{spec.name} imports the DAG"
        assert "easyanimate.cli" not in stage_modules(spec.name)


def test_declared_params_agree_with_what_the_code_reads():
    assert [p for s in STAGE_NAMES for p in params_problems(s)] == []


def test_library_with_cli_never_imports_prefect():
    code = (
        "import sys, importlib, pkgutil, easyanimate\n"
        "for m in pkgutil.walk_packages(easyanimate.__path__, 'easyanimate.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.') or m.startswith('flows')]\n"
        "assert not bad, bad[:5]\n"
        "assert 'easyanimate.cli' in sys.modules and 'easyanimate.registry' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def staleness(tmp_path_factory):
    """A throwaway copy of the project with every stage's outputs committed to DVC, probed by
    ``tests/staleness_probe.py`` (one process: Prefect cache keys and ``dvc status`` after each edit)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "easyanimate", root / "easyanimate", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    samples = root / "data" / "samples"
    samples.mkdir(parents=True)
    shutil.copy(REPO / "data" / "samples" / "captions.yaml", samples / "captions.yaml")
    (samples / "clip.mp4").write_bytes(b"not decoded here")
    settings = load_settings(root / "params.yaml")
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for stage in dvc.values():  # stand-in outputs: DVC only hashes them
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = root / (entry if isinstance(entry, str) else next(iter(entry)))
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "weights.bin").write_bytes(path.name.encode())
    env = {**os.environ, "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(sys.executable, "-m", "dvc", "init", "--no-scm", "-q")
    run(sys.executable, "-m", "dvc", "commit", "-f", "-q")
    assert settings.preset == "tiny"
    out = run(sys.executable, str(REPO / "tests" / "staleness_probe.py"), "easyanimate/data/buckets.py")
    return json.loads(out.stdout)


def _dvc_params(stage: str, file: str) -> list[str]:
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage].get("params", [])
    if file == "params.yaml":
        return [p for p in listed if isinstance(p, str)]
    return [p for entry in listed if isinstance(entry, dict) for p in entry.get(file, [])]


def _shares_entry(a: str, b: str) -> bool:
    return get_stage(a).module == get_stage(b).module


NATIVE_STAGES = stages_for("native")
NATIVE_NAMES = stage_names_for("native")


def test_editing_a_stage_module_stales_that_stage_and_descendants_only(staleness):
    for spec in NATIVE_STAGES:
        entry_file = spec.module.replace(".", "/") + ".py"
        found = staleness["modules"][spec.name]
        expected = sorted(s for s in NATIVE_NAMES if entry_file in staleness["stage_files"][s])
        assert found["prefect"] == expected and found["dvc"] == sorted([*expected, CHECK_STAGE]), (spec.name, found)
        assert spec.name in expected
        assert all(s == spec.name or s in descendants(spec.name) or _shares_entry(s, spec.name) for s in expected)
    buckets = staleness["files"]["easyanimate/data/buckets.py"]
    assert buckets["dvc"] == sorted([*buckets["prefect"], CHECK_STAGE])
    assert {"dit_stage1", "dit_stage2", "dit_stage3", "lora", "evaluate"} <= set(buckets["prefect"])
    assert set(buckets["prefect"]) <= {"dit_stage1"} | descendants("dit_stage1")  # nothing upstream: no VAE, no curate


def test_changing_a_param_stales_the_stages_that_declare_it_and_nothing_else(staleness):
    for key, found in staleness["params"].items():
        name, param = key.split(":")
        leaf = found["leaf"]
        expected = sorted(s.name for s in NATIVE_STAGES if any(leaf == p or leaf.startswith(p + ".") for p in s.params))
        assert name in expected and found["prefect"] == expected, (key, found, expected)
        first = min(expected, key=NATIVE_NAMES.index)
        assert all(s == first or s in descendants(first) for s in expected), (key, expected)
        # DVC reruns exactly those stages when dvc.yaml lists the key for the file that changed. A key set in
        # neither file is a code default: setting it first makes dvc.yaml stale, and the guard stage that
        # runs first in `dvc repro` (`easyanimate dvc-yaml --check`) fails loudly instead of skipping silently.
        assert CHECK_STAGE in found["dvc"], key
        rerun = sorted(set(found["dvc"]) - {CHECK_STAGE})
        tracked = sorted(
            s for s in NATIVE_NAMES if any(leaf == p or leaf.startswith(p + ".") for p in _dvc_params(s, found["file"]))
        )
        assert rerun == tracked and set(tracked) <= set(expected), (key, found, tracked)
        assert tracked == expected or found["dvc_yaml_stale"], f"{key}: DVC would silently miss this change"


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
    settings = load_settings(
        REPO / "params.yaml", overrides={"paths": {"raw_videos": str(raw), "captions": str(raw / "c.yaml")}}
    )
    first = stage_inputs_hash("curate", settings)
    assert first == stage_inputs_hash("curate", settings)
    (raw / "a.mp4").write_bytes(b"2")
    assert stage_inputs_hash("curate", settings) != first


def test_dit_latent_cache_skips_decode_and_encode(tmp_path, monkeypatch):
    """Latents are computed once per (VAE, manifest, sampling); a second stage reads them back."""
    import shutil

    import torch

    from easyanimate.data.curate import build_manifest, curate_video
    from easyanimate.data.manifest import write_manifest
    from easyanimate.models.vae import SliceVAE
    from easyanimate.training import dit as dit_training

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(REPO / "data" / "samples" / "bigbuckbunny.mp4", raw / "bigbuckbunny.mp4")
    settings = load_settings(
        REPO / "params.yaml",
        overrides={
            "paths": {
                "raw_videos": str(raw),
                "captions": str(REPO / "data" / "samples" / "captions.yaml"),
                "curated": str(tmp_path / "curated"),
                "cache": str(tmp_path / "cache"),
            },
            "curate": {"text": {"enabled": False}},
        },
    )  # OCR is not what this test is about
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

    monkeypatch.setattr(
        dit_training, "encode_windows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded"))
    )
    again = dit_training.LatentCache(tmp_path / "cache", vae_dir, settings.paths.curated, ("train", 32, 4.0, None), 0)
    second = again.windows(vae, None, 8, text)
    assert len(second) == len(first) > 0
    assert all(torch.equal(a, b) for a, b in zip(first.latents, second.latents))
    assert second.caption_ids == first.caption_ids
    # A different VAE is a different cache entry.
    SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(tmp_path / "vae2")
    assert not dit_training.LatentCache(
        tmp_path / "cache", tmp_path / "vae2", settings.paths.curated, ("train", 32, 4.0, None), 0
    ).has({8})
