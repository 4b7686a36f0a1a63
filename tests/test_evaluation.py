"""Evaluation on the held-out split: real tiny models, real clips cut from the bundled video.

The helpers here (a tiny curated dataset, tiny settings, tiny models) are shared with
tests/test_promotion.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate.config import Settings, load_settings
from easyanimate.data.manifest import read_manifest, to_frame, write_manifest
from easyanimate.data.video_io import decode_frames, write_video
from tests.conftest import REPO, SAMPLES

CLIP_SECONDS = 1.25
FPS = 8


def make_curated(root: Path, splits: list[str]) -> Path:
    """A curated folder in the curate stage's format: one accepted clip per entry of ``splits``."""
    (root / "clips").mkdir(parents=True)
    records = []
    for i, split in enumerate(splits):
        start = i * CLIP_SECONDS
        times = list(np.arange(start, start + CLIP_SECONDS, 1 / FPS))
        frames = decode_frames(SAMPLES / "bigbuckbunny.mp4", times=times, size=(112, 64))
        clip_path = f"clips/clip_{i}.mp4"
        write_video(frames, root / clip_path, fps=FPS)
        records.append(
            {
                "clip_id": f"clip{i:02d}",
                "source": "bigbuckbunny.mp4",
                "start_s": start,
                "end_s": start + CLIP_SECONDS,
                "duration_s": CLIP_SECONDS,
                "width": 112,
                "height": 64,
                "fps": float(FPS),
                "aesthetic": 5.0,
                "text_area": 0.0,
                "motion": 1.0,
                "caption": f"a big grey rabbit, shot {i}",
                "status": "accepted",
                "reject_reason": None,
                "clip_path": clip_path,
                "split": split,
            }
        )
    write_manifest(to_frame(records), root / "manifest.parquet")
    (root / "gate.json").write_text(json.dumps({"success": True, "failures": []}))
    return root


def tiny_settings(root: Path, curated: Path, **overrides) -> Settings:
    """Repo params with every path under ``root``, models small enough for seconds on a CPU."""
    base = {
        "paths": {
            name: str(root / sub)
            for name, sub in {
                "curated": curated,
                "vae_stage1": "models/vae/stage1",
                "vae_stage2": "models/vae/stage2",
                "dit_stage1": "models/dit/stage1",
                "dit_stage2": "models/dit/stage2",
                "dit_stage3": "models/dit/stage3",
                "lora": "models/lora",
                "pipeline": "models/pipeline",
                "reports": "reports",
                "checkpoints": ".easyanimate/checkpoints",
                "cache": ".easyanimate/cache",
            }.items()
        },
        "vae": {
            "model": {"block_out_channels": [8, 8, 8, 8], "norm_groups": 4},
            "stage1": {"steps": 1, "batch_size": 1},
            "stage2": {"steps": 1, "batch_size": 1},
        },
        "dit": {
            "model": {"hidden_size": 32, "depth": 2, "num_heads": 2},
            "stage1": {"steps": 1, "batch_size": 2},
            "stage2": {"steps": 1, "batch_size": 2},
            "stage3": {"steps": 1, "batch_size": 2},
        },
        "lora": {"train": {"steps": 1, "batch_size": 2}},
        "generate": {"num_inference_steps": 2},
        # Loose gates: the models are untrained; promotion tests compare them with each other.
        "evaluate": {"min_vae_psnr": 0.0, "max_val_loss": 100.0, "max_flicker": 1.0, "min_caption_retrieval": 0.0},
        "registry": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
    }
    return load_settings(REPO / "params.yaml", overrides=_merge(base, overrides))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def save_tiny_models(settings: Settings, dit_noise: float = 0.0, dit_seed: int = 0) -> None:
    """An untrained tiny VAE (paths.vae_stage2) and DiT (paths.dit_stage3); ``dit_noise`` adds Gaussian
    noise of that std to every DiT weight (its zero-initialised output layer then predicts garbage)."""
    from easyanimate.training.dit import build_transformer
    from easyanimate.training.vae import build_vae

    torch.manual_seed(0)
    build_vae(settings).save_pretrained(settings.paths.vae_stage2, safe_serialization=True)
    dit = build_transformer(settings, settings.vae.model.latent_channels, 384)
    if dit_noise:
        g = torch.Generator().manual_seed(dit_seed)
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(torch.randn(p.shape, generator=g) * dit_noise)
    dit.save_pretrained(settings.paths.dit_stage3, safe_serialization=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    curated = make_curated(root / "data" / "curated", ["train", "val", "train", "val"])
    return root, tiny_settings(root, curated)


@pytest.mark.slow
def test_training_datasets_never_include_val_clips(project, monkeypatch):
    """Each training function really runs (one step) while every clip set it loads is recorded.

    Loads made by the training function itself are its training data; stages may also score the
    held-out clips afterwards (e.g. the VAE's held-out PSNR), which is evaluation, not training.
    """
    import sys

    from easyanimate.data import datasets
    from easyanimate.stages import run_stage
    from easyanimate.training import dit, lora, vae

    root, settings = project
    manifest = read_manifest(settings.paths.curated / "manifest.parquet")
    val_ids = set(manifest.loc[manifest["split"] == "val", "clip_id"])
    train_ids = set(manifest.loc[manifest["split"] == "train", "clip_id"])
    assert val_ids and train_ids
    loads: list[tuple[str, str, set[str]]] = []

    def recording_load(curated_dir, split, *args, **kwargs):
        clips = datasets.load_clip_frames(curated_dir, split, *args, **kwargs)
        loads.append((sys._getframe(1).f_code.co_name, split, {c.clip_id for c in clips}))
        return clips

    for module in (vae, dit, lora):
        monkeypatch.setattr(module, "load_clip_frames", recording_load)
    save_tiny_models(settings)  # the frozen VAE / DiT that DiT stage 1 and LoRA start from
    # One call per training function (the other stages of each share its loading code).
    # The VAE loads through its helper (which also decodes the augmentation scales).
    for trainer, run in (
        (("train_vae", "_training_clips"), lambda: run_stage("vae_stage1", settings, show_progress=False)),
        (("train_dit",), lambda: run_stage("dit_stage1", settings, show_progress=False)),
        (("train_lora",), lambda: run_stage("lora", settings, show_progress=False)),
    ):
        loads.clear()
        run()
        training = [(split, ids) for caller, split, ids in loads if caller in trainer]
        assert training, f"{trainer} loaded no clips through load_clip_frames: the spy missed its data path"
        for split, ids in training:
            assert split == "train" and ids, (trainer, split, ids)
            assert not ids & val_ids, f"{trainer} trained on held-out clips {ids & val_ids}"
            assert ids <= train_ids


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_plots_report_and_context(project):
    from easyanimate.evaluation.evaluate import dit_validation_loss, evaluation_protocol_hash
    from easyanimate.lineage import dvc_hash
    from easyanimate.stages import report_dir, run_stage

    root, settings = project
    save_tiny_models(settings, dit_noise=0.05)
    result = run_stage("evaluate", settings, show_progress=False)
    out = report_dir(settings, "evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert result.info["passed"] and metrics["eval/num_val_clips"] == 2.0
    for key in ("eval/vae_psnr", "eval/vae_ssim", "eval/val_loss", "eval/flicker", "eval/caption_retrieval"):
        assert np.isfinite(metrics[key]), key
    assert metrics["eval/caption_retrieval_captions"] == 2.0  # the two train clips' captions

    with open(out / "val_loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["timestep"]) for r in rows] == sorted(settings.evaluate.val_timesteps)
    for row in rows:
        assert float(row["val_loss"]) == pytest.approx(metrics[f"eval/val_loss_t{row['timestep']}"], abs=1e-6)

    context = json.loads((out / "eval_context.json").read_text())
    manifest = read_manifest(settings.paths.curated / "manifest.parquet")
    assert context["val_clip_ids"] == sorted(manifest.loc[manifest["split"] == "val", "clip_id"])
    assert context["data_dvc_hash"] == dvc_hash(settings.paths.curated)
    assert context["protocol_hash"] == evaluation_protocol_hash(settings)

    report = (out / "report.md").read_text()
    assert "Evaluation PASSED" in report and "| eval/val_loss |" in report and "fvd: skipped" in report
    gifs = [line.split("](")[1].split(")")[0] for line in report.splitlines() if line.startswith("![")]
    assert gifs and all((out / g).exists() for g in gifs)

    # Fixed timesteps and fixed noise: recomputing gives the same number (comparable across versions).
    from easyanimate.data.datasets import load_clip_frames
    from easyanimate.pipelines import EasyAnimatePipeline

    pipe = EasyAnimatePipeline.from_pretrained(settings.paths.pipeline)
    from easyanimate.evaluation.evaluate import generation_geometry

    clips = load_clip_frames(
        settings.paths.curated,
        "val",
        settings.generate.height,
        settings.vae.stage1.sample_fps,
        buckets=generation_geometry(settings),
    )
    assert tuple(clips[0].frames.shape[-2:]) == (settings.generate.height, settings.generate.width)
    again = dit_validation_loss(settings, pipe, clips, settings.generate.num_frames)
    assert again["eval/val_loss"] == pytest.approx(metrics["eval/val_loss"], rel=1e-6)


def test_protocol_hash_follows_metric_settings_not_gates(project):
    from easyanimate.evaluation.evaluate import evaluation_protocol_hash

    root, settings = project
    curated = settings.paths.curated
    same = tiny_settings(root, curated, evaluate={"max_val_loss": 3.0, "min_vae_psnr": 5.0})
    other = tiny_settings(root, curated, evaluate={"val_timesteps": [10, 990]})
    assert evaluation_protocol_hash(same) == evaluation_protocol_hash(settings)
    assert evaluation_protocol_hash(other) != evaluation_protocol_hash(settings)


def test_caption_retrieval_scores_own_clip_nearest():
    """A caption hits only when its own clip(s) are strictly nearer than every other clip."""
    from easyanimate.evaluation.retrieval import RetrievalResult

    distances = np.array(
        [
            [0.1, 0.5, 0.6, 0.7],  # own clip 0 nearest: hit
            [0.4, 0.3, 0.2, 0.9],  # own clip 1, clip 2 nearer: miss
            [0.5, 0.5, 0.9, 0.2],  # shared caption of clips 2 and 3: the nearer of them (3) wins: hit
            [0.3, 0.3, 0.9, 0.9],  # tie with another clip is not a hit
        ]
    )
    result = RetrievalResult(["a", "b", "c", "d"], ["k0", "k1", "k2", "k3"], distances, [{0}, {1}, {2, 3}, {0}])
    assert result.hits == [True, False, True, False]
    assert result.rate == 0.5
    assert result.table()[1]["nearest_clip"] == "k2"
