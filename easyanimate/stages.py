"""The pipeline's stages as plain library calls: what each reads, writes and depends on.

This is the one description of the DAG. Prefect flows (``flows/``), the CLI and ``dvc.yaml`` all
run these functions; ``tests/test_dvc.py`` checks that ``dvc.yaml`` agrees with ``STAGES``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from easyanimate.config import Settings
from easyanimate.utils import atomic_write_json, atomic_write_text, hash_path


@dataclass(frozen=True)
class StageSpec:
    name: str
    deps: tuple[str, ...]  # names of ``settings.paths`` fields this stage reads
    outs: tuple[str, ...]  # names of ``settings.paths`` fields this stage writes
    params: tuple[str, ...]  # dotted settings sections that configure it
    modules: tuple[str, ...]  # library modules whose code defines it


_COMMON = ("easyanimate.config", "easyanimate.stages", "easyanimate.utils")
_TRAIN = ("easyanimate.training.common", "easyanimate.data.datasets")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("curate", ("raw_videos", "captions"), ("curated",), ("curate", "weights"),
              ("easyanimate.data.curate", "easyanimate.data.scenes", "easyanimate.data.video_io",
               "easyanimate.data.manifest", "easyanimate.data.quality", "easyanimate.data.filters",
               "easyanimate.data.captioners")),
    StageSpec("vae_stage1", ("curated",), ("vae_stage1",),
              ("vae.model", "vae.stage1", "vae.eval", "vae.mixed_precision", "weights.lpips"),
              ("easyanimate.training.vae", "easyanimate.models.vae") + _TRAIN),
    StageSpec("vae_stage2", ("curated", "vae_stage1"), ("vae_stage2",), ("vae.stage2", "vae.eval", "vae.mixed_precision"),
              ("easyanimate.training.vae", "easyanimate.models.vae") + _TRAIN),
    StageSpec("dit_stage1", ("curated", "vae_stage2"), ("dit_stage1",),
              ("dit.model", "dit.stage1", "dit.num_train_timesteps", "dit.beta_schedule", "dit.caption_dropout",
               "dit.mixed_precision", "weights.text_encoder"),
              ("easyanimate.training.dit", "easyanimate.models.dit", "easyanimate.models.text_encoder") + _TRAIN),
    StageSpec("dit_stage2", ("curated", "vae_stage2", "dit_stage1"), ("dit_stage2",),
              ("dit.stage2", "dit.num_train_timesteps", "dit.beta_schedule", "dit.caption_dropout",
               "dit.mixed_precision", "weights.text_encoder"),
              ("easyanimate.training.dit", "easyanimate.models.dit", "easyanimate.models.text_encoder") + _TRAIN),
    StageSpec("dit_stage3", ("curated", "vae_stage2", "dit_stage2"), ("dit_stage3",),
              ("dit.stage3", "dit.num_train_timesteps", "dit.beta_schedule", "dit.caption_dropout",
               "dit.mixed_precision", "weights.text_encoder"),
              ("easyanimate.training.dit", "easyanimate.models.dit", "easyanimate.models.text_encoder") + _TRAIN),
    StageSpec("lora", ("curated", "vae_stage2", "dit_stage3"), ("lora",), ("lora", "dit.num_train_timesteps",
              "dit.beta_schedule", "weights.text_encoder"),
              ("easyanimate.training.lora", "easyanimate.training.dit") + _TRAIN),
    StageSpec("evaluate", ("curated", "vae_stage2", "dit_stage3"), ("pipeline",),
              ("evaluate", "generate", "dit.num_train_timesteps", "dit.beta_schedule", "weights.text_encoder"),
              ("easyanimate.evaluation.evaluate", "easyanimate.pipelines")),
    StageSpec("register", ("pipeline", "lora"), (), ("registry",), ()),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def _module_files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)]


def stage_version(name: str, settings: Settings) -> str:
    """Changes when the stage's code or its settings change (Prefect task ``version``)."""
    spec = get_stage(name)
    digest = hashlib.sha256()
    for module in _COMMON + spec.modules:
        for file in _module_files(module):
            digest.update(file.read_bytes())
    digest.update(settings.section_hash(*spec.params).encode() if spec.params else b"")
    return digest.hexdigest()[:12]


def stage_inputs_hash(name: str, settings: Settings) -> str:
    """Content hash of everything the stage reads (its inputs' bytes), for caching and checkpoints."""
    spec = get_stage(name)
    digest = hashlib.sha256(stage_version(name, settings).encode())
    for dep in spec.deps:
        path = getattr(settings.paths, dep)
        digest.update(dep.encode())
        digest.update(hash_path(path).encode() if path.exists() else b"missing")
    init = warm_start_dir(name, settings)
    if init is not None:  # a new champion to continue from is a new input
        digest.update(b"init")
        digest.update(hash_path(init).encode() if init.exists() else b"missing")
    return digest.hexdigest()[:16]


# Which component of a pipeline folder warm-starts which first stage (retraining from the champion).
WARM_START_COMPONENTS = {"vae_stage1": "vae", "dit_stage1": "transformer"}


def warm_start_dir(name: str, settings: Settings) -> Path | None:
    """The folder stage ``name`` starts from instead of a fresh model (``retrain.init_pipeline``), if any."""
    init = settings.retrain.init_pipeline
    if init is None or name not in WARM_START_COMPONENTS:
        return None
    return Path(init) / WARM_START_COMPONENTS[name]


def warm_start_mismatches(settings: Settings, pipeline_dir: Path) -> list[str]:
    """Why ``pipeline_dir``'s VAE/transformer cannot continue under ``settings`` (empty when they can).

    Compares each saved ``config.json`` with the config of the model the settings build (built on the
    meta device, so checking a paper-size model allocates nothing).
    """
    import torch

    from easyanimate.models.vae import SliceVAE
    from easyanimate.training.dit import build_transformer
    from easyanimate.training.vae import build_vae

    # Saved config keys that are not architecture: a champion whose VAE fitted its own scaling factor, or that
    # slices/tiles differently, still warm-starts (stage 1 refits the factor).
    runtime_keys = SliceVAE.EXECUTION_CONFIG_KEYS | {"scaling_factor"}

    problems: list[str] = []
    configs = {}
    for component in WARM_START_COMPONENTS.values():
        file = Path(pipeline_dir) / component / "config.json"
        if not file.exists():
            problems.append(f"{file} is missing")
        else:
            configs[component] = json.loads(file.read_text())
    if problems:
        return problems
    with torch.device("meta"):
        fresh = {
            "vae": build_vae(settings),
            "transformer": build_transformer(settings, settings.vae.model.latent_channels,
                                             configs["transformer"].get("text_embed_dim", 0)),
        }
    for component, model in fresh.items():
        section = "vae.model" if component == "vae" else "dit.model"
        for key, want in model.config.items():
            if key.startswith("_") or key not in configs[component] or key in runtime_keys:
                continue
            have = configs[component][key]
            if json.loads(json.dumps(want)) != have:
                problems.append(f"{section}: {component}.{key} is {have!r} in {pipeline_dir.name}, settings give {want!r}")
    return problems


def _check_warm_start(settings: Settings) -> None:
    problems = warm_start_mismatches(settings, Path(settings.retrain.init_pipeline))
    if problems:
        raise ValueError("retrain.init_pipeline cannot warm-start these settings:\n  " + "\n  ".join(problems))


def outputs_present(name: str, settings: Settings) -> bool:
    spec = get_stage(name)
    return all(getattr(settings.paths, out).exists() for out in spec.outs) and (
        report_dir(settings, name) / "metrics.json"
    ).exists()


def report_dir(settings: Settings, name: str) -> Path:
    return settings.paths.reports / name


def checkpoint_dir(settings: Settings, name: str) -> Path:
    # Keyed by inputs + settings: a changed config never resumes from a stale run's checkpoints.
    return settings.paths.checkpoints / f"{name}-{stage_inputs_hash(name, settings)}"


def write_reports(settings: Settings, name: str, metrics: dict, losses: Sequence[float] | None = None) -> Path:
    """``reports/<stage>/metrics.json`` (DVC metrics) and ``loss.csv`` (DVC plots)."""
    out = report_dir(settings, name)
    if losses is not None:
        rows = ["step,loss"] + [f"{i + 1},{loss:.6f}" for i, loss in enumerate(losses)]
        atomic_write_text(out / "loss.csv", "\n".join(rows) + "\n")
    atomic_write_json(out / "metrics.json", metrics)
    return out / "metrics.json"


@dataclass
class StageResult:
    name: str
    metrics: dict
    outputs: dict[str, Path] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- training stages
def run_vae_stage(settings: Settings, stage: int, trackers=None, show_progress: bool = True) -> StageResult:
    from easyanimate.training.vae import evaluate_vae, perceptual_status, train_vae

    name = f"vae_stage{stage}"
    out = getattr(settings.paths, name)
    cfg = settings.vae.stage1 if stage == 1 else settings.vae.stage2
    init = settings.paths.vae_stage1 if stage == 2 else warm_start_dir(name, settings)
    if stage == 1 and init is not None:
        _check_warm_start(settings)
    result = train_vae(
        settings, stage, settings.paths.curated, out, ckpt_dir=checkpoint_dir(settings, name),
        init_dir=init, trackers=trackers, show_progress=show_progress,
    )
    # Held-out reconstruction quality on the val clips, at the stage's training resolution and frame rate.
    eval_metrics, videos = evaluate_vae(settings, out, settings.paths.curated, report_dir(settings, name),
                                        cfg.resolution, cfg.sample_fps)
    metrics = {**result.metrics(name), **{f"{name}/{k}": v for k, v in eval_metrics.items()}}
    info: dict = {"parent": str(init) if init else None}
    if stage == 1:
        perceptual = perceptual_status(settings)
        metrics[f"{name}/perceptual_enabled"] = float(perceptual.enabled)
        info["perceptual_loss"] = perceptual.reason
    write_reports(settings, name, metrics, result.losses)
    return StageResult(name, metrics, {name: out}, [report_dir(settings, name) / "loss.csv", *videos], info=info)


def run_dit_stage(settings: Settings, stage: int, trackers=None, show_progress: bool = True) -> StageResult:
    from easyanimate.training.dit import render_samples, train_dit

    name = f"dit_stage{stage}"
    out = getattr(settings.paths, name)
    init = {1: warm_start_dir(name, settings), 2: settings.paths.dit_stage1, 3: settings.paths.dit_stage2}[stage]
    if stage == 1 and init is not None:
        _check_warm_start(settings)
    result = train_dit(
        settings, stage, settings.paths.curated, settings.paths.vae_stage2, out,
        ckpt_dir=checkpoint_dir(settings, name), init_dir=init, trackers=trackers, show_progress=show_progress,
    )
    metrics = result.metrics(name)
    write_reports(settings, name, metrics, result.losses)
    samples = render_samples(settings, settings.paths.vae_stage2, out, report_dir(settings, name) / "samples")
    return StageResult(name, metrics, {name: out}, [report_dir(settings, name) / "loss.csv", *samples],
                       info={"parent": str(init) if init else None})


def run_lora_stage(settings: Settings, trackers=None, show_progress: bool = True) -> StageResult:
    from easyanimate.training.lora import train_lora

    result = train_lora(
        settings, settings.paths.curated, settings.paths.vae_stage2, settings.paths.dit_stage3, settings.paths.lora,
        ckpt_dir=checkpoint_dir(settings, "lora"), trackers=trackers, show_progress=show_progress,
    )
    metrics = result.metrics("lora")
    write_reports(settings, "lora", metrics, result.losses)
    return StageResult("lora", metrics, {"lora": settings.paths.lora}, [report_dir(settings, "lora") / "loss.csv"])


def run_evaluate_stage(settings: Settings, show_progress: bool = True) -> StageResult:
    from easyanimate.evaluation.evaluate import assemble_pipeline, evaluate_pipeline

    assemble_pipeline(settings, settings.paths.vae_stage2, settings.paths.dit_stage3, settings.paths.pipeline)
    report = evaluate_pipeline(settings, settings.paths.pipeline, settings.paths.curated, report_dir(settings, "evaluate"))
    write_reports(settings, "evaluate", report.metrics)
    atomic_write_json(report_dir(settings, "evaluate") / "gate.json",
                      {"passed": report.passed, "reasons": report.reasons, "skipped": report.skipped})
    return StageResult("evaluate", report.metrics, {"pipeline": settings.paths.pipeline}, report.artifacts,
                       info={"passed": report.passed, "reasons": report.reasons, "skipped": report.skipped})


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_loss_csv(path: Path) -> list[tuple[int, float]]:
    with open(path) as handle:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]


TRAINING_RUNNERS: dict[str, Callable[..., StageResult]] = {
    "vae_stage1": lambda s, **kw: run_vae_stage(s, 1, **kw),
    "vae_stage2": lambda s, **kw: run_vae_stage(s, 2, **kw),
    "dit_stage1": lambda s, **kw: run_dit_stage(s, 1, **kw),
    "dit_stage2": lambda s, **kw: run_dit_stage(s, 2, **kw),
    "dit_stage3": lambda s, **kw: run_dit_stage(s, 3, **kw),
    "lora": run_lora_stage,
}
