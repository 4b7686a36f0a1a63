"""The pipeline's DAG, described once: every stage's entry, inputs, outputs and settings.

Everything else is derived from ``STAGES``: the Prefect flows loop over it, ``easyanimate run NAME``
executes a spec, ``dvc.yaml`` is generated from it (``easyanimate dvc-yaml``), and a stage's code version
is the content of the project modules its entry imports (transitively), never a hand-kept list.

A stage entry is ``run(settings, ctx: StageContext) -> StageResult`` (``easyanimate.stage_api``). This
module is deliberately not imported by any entry, so editing the DAG changes no stage's code version.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from easyanimate.config import Settings
from easyanimate.stage_api import StageContext, StageFailed, StageResult
from easyanimate.utils import hash_path, verify_safetensors

PACKAGE = "easyanimate"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function", called as function(settings, ctx) -> StageResult
    deps: tuple[str, ...]  # names of ``settings.paths`` fields this stage reads
    outs: tuple[str, ...]  # names of ``settings.paths`` fields this stage writes
    params: tuple[str, ...]  # dotted settings sections that configure it (checked against its code)
    cached: bool = True  # a Prefect cache hit skips it when code, settings and inputs are unchanged
    trains: bool = False  # trains a model with resumable checkpoints (a registered pipeline's lineage)
    warm_start: str | None = None  # pipeline component that can start it instead of a fresh model (retraining)
    plots: tuple[tuple[str, str, str], ...] = ()  # report files plotted by DVC: (file, x, y)
    report_outs: tuple[str, ...] = ()  # extra report files/folders DVC versions (folders cached, files not)
    report_deps: tuple[str, ...] = ()  # other stages' report files it reads, relative to paths.reports
    family: str | None = None  # the ``model.family`` whose DAG holds it (None: every family's)
    description: str = ""

    def load(self) -> Callable[[Settings, StageContext], StageResult]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]


NATIVE, V51 = "native", "easyanimate-v5.1"  # config.FAMILIES
_LOSS = (("loss.csv", "step", "loss"),)
_EVALUATION_REPORTS = ("samples", "report.md", "eval_context.json", "gate.json")
_REGISTER_REPORTS = ("registered.json", "promotion.md")


def _register_reads(evaluation: str) -> tuple[str, ...]:
    """The evaluation reports a register stage reads: its gate, metrics and what they were computed on."""
    return tuple(f"{evaluation}/{name}" for name in ("gate.json", "metrics.json", "eval_context.json"))


# Every DiT stage also renders its samples with the generation settings.
_DIT = (
    "dit.num_train_timesteps",
    "dit.beta_schedule",
    "dit.caption_dropout",
    "dit.mixed_precision",
    "weights.text_encoder",
    "generate",
)

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "curate",
        "easyanimate.data.curate:run_stage",
        ("raw_videos", "captions"),
        ("curated",),
        cached=False,  # resumes per video instead
        params=(
            "curate",
            "weights.ocr",
            "weights.aesthetic_clip",
            "weights.aesthetic_head",
            "weights.captioner",
            "weights.frame_embedding",
            "weights.caption_rewriter",
        ),
        report_outs=("gate_report",),
        description="scene split, filters, captions, manifest and quality gate",
    ),
    StageSpec(
        "vae_stage1",
        "easyanimate.training.vae:run_stage1",
        ("curated",),
        ("vae_stage1",),
        ("vae.model", "vae.stage1", "vae.eval", "vae.mixed_precision", "weights.lpips"),
        trains=True,
        warm_start="vae",
        plots=_LOSS,
        family=NATIVE,
        description="Slice VAE: encoder + decoder",
    ),
    StageSpec(
        "vae_stage2",
        "easyanimate.training.vae:run_stage2",
        ("curated", "vae_stage1"),
        ("vae_stage2",),
        ("vae.stage2", "vae.eval", "vae.mixed_precision"),
        trains=True,
        plots=_LOSS,
        family=NATIVE,
        description="Slice VAE: decoder only",
    ),
    StageSpec(
        "dit_stage1",
        "easyanimate.training.dit:run_stage1",
        ("curated", "vae_stage2"),
        ("dit_stage1",),
        ("dit.model", "dit.init_from", "dit.stage1", "vae.model.latent_channels", *_DIT),
        trains=True,
        warm_start="transformer",
        plots=_LOSS,
        family=NATIVE,
        description="video DiT on images",
    ),
    StageSpec(
        "dit_stage2",
        "easyanimate.training.dit:run_stage2",
        ("curated", "vae_stage2", "dit_stage1"),
        ("dit_stage2",),
        ("dit.stage2", *_DIT),
        trains=True,
        plots=_LOSS,
        family=NATIVE,
        description="video DiT: motion",
    ),
    StageSpec(
        "dit_stage3",
        "easyanimate.training.dit:run_stage3",
        ("curated", "vae_stage2", "dit_stage2"),
        ("dit_stage3",),
        ("dit.stage3", *_DIT),
        trains=True,
        plots=_LOSS,
        family=NATIVE,
        description="video DiT: full fine-tune on the best clips",
    ),
    StageSpec(
        "lora",
        "easyanimate.training.lora:run_stage",
        ("curated", "vae_stage2", "dit_stage3"),
        ("lora",),
        ("lora", "curate.video_extensions", "dit.num_train_timesteps", "dit.beta_schedule", "weights.text_encoder"),
        trains=True,
        plots=_LOSS,
        family=NATIVE,
        description="LoRA adapter on the DiT",
    ),
    StageSpec(
        "evaluate",
        "easyanimate.evaluation.evaluate:run_stage",
        ("curated", "vae_stage2", "dit_stage3"),
        ("pipeline",),
        (
            "evaluate",
            "generate",
            "dit.num_train_timesteps",
            "dit.beta_schedule",
            "dit.model.max_text_tokens",
            "vae.stage1.sample_fps",
            "weights.text_encoder",
        ),
        plots=(("val_loss.csv", "timestep", "val_loss"),),
        report_outs=_EVALUATION_REPORTS,
        family=NATIVE,
        description="assemble the pipeline, score it on held-out clips, decide its gate",
    ),
    StageSpec(
        "register",
        "easyanimate.registry:run_stage",
        ("curated", "pipeline", "lora"),
        (),  # cached: an unchanged pipeline is never registered twice
        params=("registry", "lora.registered_model", "lora.default_scale", "model.family"),
        report_outs=_REGISTER_REPORTS,
        report_deps=_register_reads("evaluate"),
        family=NATIVE,
        description="register a model version, promote it only if it is better",
    ),
)
_V51_MODEL = ("v51.model_dir", "v51.dtype")
STAGES += (
    StageSpec(
        "v51_vae",
        "easyanimate.families.v51_vae:run_stage",
        ("curated",),
        ("v51_vae",),
        (
            "v51.model_dir",
            "v51.vae_decoder_steps",
            "v51.vae_learning_rate",
            "v51.vae_num_frames",
            "v51.vae_crop",
            "v51.weight_decay",
            "v51.max_grad_norm",
            "v51.checkpoint_every",
            "v51.seed",
            "v51.train_height",
            "v51.train_width",
            "v51.train_num_frames",
            "v51.bucket_aspect_ratios",
            "v51.sample_fps",
            "v51.data_dir",
            "curate.video_extensions",
        ),
        trains=True,
        plots=_LOSS,
        family=V51,
        description="V5.1: optional decoder fine-tune of the released MagViT VAE (v51.vae_decoder_steps; 0 keeps it)",
    ),
    StageSpec(
        "v51_latents",
        "easyanimate.families.v51_latents:run_stage",
        ("curated",),
        ("v51_latents",),
        (
            *_V51_MODEL,
            "v51.train_height",
            "v51.train_width",
            "v51.train_num_frames",
            "v51.bucket_aspect_ratios",
            "v51.sample_fps",
            "v51.data_dir",
            "v51.max_sequence_length",
            "curate.video_extensions",
        ),
        family=V51,
        description="V5.1: MagViT latents and Qwen2-VL prompt embeddings of the training and held-out clips",
    ),
    StageSpec(
        "v51_finetune",
        "easyanimate.families.v51_finetune:run_stage",
        ("v51_latents",),
        ("v51_finetune",),
        (
            *_V51_MODEL,
            "v51.finetune",
            "v51.lora_rank",
            "v51.lora_alpha",
            "v51.lora_target_modules",
            "v51.train_steps",
            "v51.learning_rate",
            "v51.full_learning_rate",
            "v51.weight_decay",
            "v51.max_grad_norm",
            "v51.weighting_scheme",
            "v51.logit_mean",
            "v51.logit_std",
            "v51.mode_scale",
            "v51.caption_dropout",
            "v51.inpaint_i2v_ratio",
            "v51.gradient_checkpointing",
            "v51.checkpoint_every",
            "v51.seed",
        ),
        trains=True,
        plots=_LOSS,
        family=V51,
        description="V5.1: LoRA (or full) fine-tune of the released transformer, flow matching",
    ),
    StageSpec(
        "v51_evaluate",
        "easyanimate.families.v51_evaluate:run_stage",
        ("curated", "v51_vae", "v51_latents", "v51_finetune"),
        ("v51_pipeline",),
        (
            *_V51_MODEL,
            "v51.eval_sigmas",
            "v51.eval_num_samples",
            "v51.num_frames",
            "v51.negative_prompt",
            "v51.max_sequence_length",
            "v51.noise_aug_strength",
            "v51.memory_mode",
            "v51.tile_sample_min_size",
            "v51.tile_sample_stride",
            "evaluate",
            "generate",
        ),
        plots=(("val_loss.csv", "sigma", "val_loss"),),
        report_outs=_EVALUATION_REPORTS,
        family=V51,
        description="V5.1: assemble the fine-tuned pipeline, score it on held-out clips, decide its gate",
    ),
    StageSpec(
        "v51_register",
        "easyanimate.registry:run_stage",
        ("curated", "v51_pipeline", "v51_finetune"),
        (),
        params=(
            "registry",
            "lora.registered_model",
            "lora.default_scale",
            "model.family",
            *_V51_MODEL,
            "v51.memory_mode",
            "v51.num_frames",
            "v51.negative_prompt",
            "v51.max_sequence_length",
            "v51.noise_aug_strength",
            "v51.tile_sample_min_size",
            "v51.tile_sample_stride",
        ),
        report_outs=_REGISTER_REPORTS,
        report_deps=_register_reads("v51_evaluate"),
        family=V51,
        description="V5.1: register the pipeline (and its LoRA), promote it only if it is better",
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
TRAINED_STAGES = tuple(s.name for s in STAGES if s.trains)


def stages_for(family: str) -> tuple[StageSpec, ...]:
    """The DAG of one ``model.family``: its own stages and the shared ones (curation), in order."""
    from easyanimate.config import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: choose one of {list(FAMILIES)}")
    return tuple(s for s in STAGES if s.family in (None, family))


def stage_names_for(family: str) -> tuple[str, ...]:
    return tuple(s.name for s in stages_for(family))


def family_role(family: str, role: str) -> str:
    """The stage that plays ``role`` ("evaluate" or "register") in ``family``'s DAG."""
    return role if family == NATIVE else f"v51_{role}"


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def producer(path_field: str) -> str | None:
    """The stage that writes ``settings.paths.<path_field>`` (None for raw inputs)."""
    return next((s.name for s in STAGES if path_field in s.outs), None)


def upstream_stages(name: str) -> tuple[str, ...]:
    """Stages whose outputs ``name`` reads directly, in DAG order."""
    spec = get_stage(name)
    found = {producer(dep) for dep in spec.deps} - {None}
    return tuple(s for s in STAGE_NAMES if s in found)


def descendants(name: str) -> set[str]:
    out: set[str] = set()
    for spec in STAGES:
        if name in upstream_stages(spec.name) or out & set(upstream_stages(spec.name)):
            out.add(spec.name)
    return out


# ------------------------------------------------------------------------------- derived code version
def _module_file(module: str) -> Path | None:
    """The source file of a project module, found on disk (importing it could run heavy code)."""
    if not _is_project_module(module):
        return None
    base = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_project_module(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _walk_executed(tree: ast.AST):
    """``ast.walk`` minus ``if TYPE_CHECKING:`` bodies (imports for type hints only never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports_of(module: str, file: Path) -> set[str]:
    """Project modules ``file`` imports anywhere (module level or inside functions)."""
    is_package = file.name == "__init__.py"
    found: set[str] = set()
    for node in _walk_executed(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            for alias in node.names:  # ``from pkg import submodule``
                found.add(f"{source}.{alias.name}")
    return {m for m in found if _is_project_module(m) and _module_file(m) is not None}


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every project module it imports, transitively, with the packages that hold them."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing runs parent __init__s
        file = _module_file(name)
        if file is not None:
            todo.extend(_imports_of(name, file) - seen)
    return tuple(sorted(m for m in seen if _module_file(m) is not None))


def stage_modules(name: str) -> tuple[str, ...]:
    return module_closure(get_stage(name).module)


def stage_files(name: str) -> tuple[Path, ...]:
    return tuple(sorted({_module_file(m) for m in stage_modules(name)}))


def _code_hash(name: str) -> str:
    digest = hashlib.sha256()
    for file in stage_files(name):
        digest.update(str(file.relative_to(PACKAGE_DIR)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_version(name: str, settings: Settings) -> str:
    """Changes when the stage's code or its settings change (Prefect task ``version``)."""
    spec = get_stage(name)
    digest = hashlib.sha256(_code_hash(name).encode())
    digest.update(settings.section_hash(*spec.params).encode() if spec.params else b"")
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------- settings the code reads
def _settings_chain(node: ast.AST) -> list[str] | None:
    """``settings.a.b.c`` (or ``self.settings...``) -> ["a", "b", "c"]."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
        if isinstance(node, ast.Attribute) and node.attr == "settings":
            break
    root = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    if root != "settings" or not parts:
        return None
    return parts[::-1]


def settings_read_by(module: str) -> set[str]:
    """Dotted settings sections (two levels deep) read as ``settings.X.Y`` in one module's source."""
    file = _module_file(module)
    fields = set(Settings.model_fields)
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Attribute):
            chain = _settings_chain(node)
            if chain and chain[0] in fields:
                out.add(".".join(chain[:2]))
    return out


_INPUT_SECTIONS = ("paths", "preset", "retrain")  # deps/outs and warm start are inputs, not params


def params_problems(name: str) -> list[str]:
    """Where a stage's declared ``params`` and the settings its code reads disagree.

    Each section read in the stage's code must be declared by it, or by a stage whose entry module that
    code imports (shared helpers, e.g. the DiT stages' module used by LoRA); each declared one must be read.
    """
    spec = get_stage(name)
    closure = stage_modules(name)
    read = set().union(*(settings_read_by(m) for m in closure))
    allowed = set(spec.params)
    for other in STAGES:
        if other.module in closure:
            allowed.update(other.params)

    def covered(section: str, by: Iterable[str]) -> bool:
        return any(section == p or section.startswith(p + ".") or p.startswith(section + ".") for p in by)

    problems = [
        f"{name}: its code reads settings.{s} but params does not declare it"
        for s in sorted(read)
        if s.split(".")[0] not in _INPUT_SECTIONS and not covered(s, allowed)
    ]
    problems += [f"{name}: declares {p} but its code never reads it" for p in spec.params if not covered(p, read)]
    return problems


# ------------------------------------------------------------------------------- inputs, cache keys
def warm_start_dir(name: str, settings: Settings) -> Path | None:
    """The folder stage ``name`` starts from instead of a fresh model (``retrain.init_pipeline``), if any."""
    spec = get_stage(name)
    init = settings.retrain.init_pipeline
    if init is None or spec.warm_start is None:
        return None
    return Path(init) / spec.warm_start


def stage_inputs_hash(name: str, settings: Settings) -> str:
    """Content hash of everything the stage reads (its inputs' bytes), for caching and checkpoints."""
    spec = get_stage(name)
    digest = hashlib.sha256(stage_version(name, settings).encode())
    for dep in spec.deps:
        path = getattr(settings.paths, dep)
        digest.update(dep.encode())
        digest.update(hash_path(path).encode() if path.exists() else b"missing")
    for report in spec.report_deps:
        path = settings.paths.reports / report
        digest.update(report.encode())
        digest.update(hash_path(path).encode() if path.exists() else b"missing")
    init = warm_start_dir(name, settings)
    if init is not None:  # a new champion to continue from is a new input
        digest.update(b"init")
        digest.update(hash_path(init).encode() if init.exists() else b"missing")
    return digest.hexdigest()[:16]


def report_dir(settings: Settings, name: str) -> Path:
    return settings.paths.reports / name


def checkpoint_dir(settings: Settings, name: str, inputs_hash: str | None = None) -> Path:
    # Keyed by inputs + settings: a changed config never resumes from a stale run's checkpoints.
    return settings.paths.checkpoints / f"{name}-{inputs_hash or stage_inputs_hash(name, settings)}"


def outputs_present(name: str, settings: Settings) -> bool:
    spec = get_stage(name)
    return (
        all(getattr(settings.paths, out).exists() for out in spec.outs)
        and (report_dir(settings, name) / "metrics.json").exists()
    )


# ------------------------------------------------------------------------------- running a stage
def make_context(name: str, settings: Settings, inputs_hash: str | None = None, **overrides) -> StageContext:
    """``inputs_hash``: the stage's ``stage_inputs_hash`` when the caller already has it (hashing the data
    twice per stage is the slow part at real scale)."""
    trains = get_stage(name).trains
    defaults = {
        "report_dir": report_dir(settings, name),
        "warm_start": warm_start_dir(name, settings),
        "checkpoint_dir": checkpoint_dir(settings, name, inputs_hash) if trains else settings.paths.checkpoints / name,
    }
    return StageContext(**{**defaults, **overrides})


def run_stage(
    name: str, settings: Settings, ctx: StageContext | None = None, track: bool = False, **context
) -> StageResult:
    """Run one stage's entry; with ``track``, inside its own MLflow run (lineage tags, params, metrics,
    artifacts). Raises ``StageFailed`` after logging when the stage's own gate refused its result."""
    spec = get_stage(name)
    ctx = ctx or make_context(name, settings, **context)
    for dep in spec.deps:  # a truncated upstream weight file fails here, by name, instead of deep in a loader
        verify_safetensors(getattr(settings.paths, dep))
    entry = spec.load()
    if not track:
        result = entry(settings, ctx)
    else:
        from easyanimate.lineage import dvc_hash
        from easyanimate.tracking import MLflowRunTracker, log_files, log_metrics, stage_run

        tags = {"upstream_run_id": ctx.upstream_run_id or ""}
        if "curated" in spec.deps and settings.paths.curated.exists():
            tags["curated_data_dvc_hash"] = dvc_hash(settings.paths.curated)
        with stage_run(settings, name, ctx.parent_run_id, **tags) as run:
            run_id = run.info.run_id
            ctx = replace(ctx, run_id=run_id, trackers=[*ctx.trackers, MLflowRunTracker(run_id)])
            result = entry(settings, ctx)
            result.run_id = run_id
            log_metrics(result.metrics)
            log_files(result.artifacts, name)
            if result.tags:
                import mlflow

                mlflow.set_tags(result.tags)
    return result


def raise_for_failure(result: StageResult) -> StageResult:
    if result.failure:
        raise StageFailed(result.failure)
    return result


# ------------------------------------------------------------------------------- dvc.yaml
def has_key(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


CHECK_STAGE = "dvc_yaml_check"  # DVC-only guard stage (see dvc_yaml)


def dvc_yaml(params_file: str | Path = "params.yaml", root: str | Path = ".") -> str:
    """``dvc.yaml`` for the DAG: code deps from each stage's derived modules; params from the params file
    and the preset it names (only the keys each file holds: defaults in code are covered by config.py)."""
    import yaml

    from easyanimate.config import PRESETS_DIR, load_settings

    root = Path(root).resolve()
    params_path = Path(params_file)
    settings = load_settings(root / params_path)
    overrides = yaml.safe_load((root / params_path).read_text()) or {}
    preset_file = PRESETS_DIR / f"{settings.preset}.yaml"
    preset_values = yaml.safe_load(preset_file.read_text()) or {}

    def rel(path: Path) -> str:
        path = Path(path)
        return (path.resolve().relative_to(root) if path.is_absolute() else path).as_posix()

    # DVC sees only the params dvc.yaml lists, and the list depends on the keys each file holds and on the
    # code's imports: this cheap first stage reruns on any change to them and fails while dvc.yaml is stale.
    stages: dict = {
        CHECK_STAGE: {"cmd": "easyanimate dvc-yaml --check", "deps": [rel(params_path), PACKAGE]},
    }
    for spec in stages_for(settings.model.family):
        deps = [rel(getattr(settings.paths, d)) for d in spec.deps if d != "captions"]
        deps += [rel(settings.paths.reports / r) for r in spec.report_deps]
        # Code deps name the package folder beside dvc.yaml (the project's own copy of the code).
        deps += [f"{PACKAGE}/{f.relative_to(PACKAGE_DIR).as_posix()}" for f in stage_files(spec.name)]
        params: list = [p for p in ("preset", *spec.params) if has_key(overrides, p)]
        from_preset = [p for p in spec.params if has_key(preset_values, p)]
        if from_preset:
            params.append({f"{PACKAGE}/{preset_file.relative_to(PACKAGE_DIR).as_posix()}": from_preset})
        stage: dict = {"cmd": f"easyanimate run {spec.name}", "deps": deps}
        if params:
            stage["params"] = params
        reports = rel(report_dir(settings, spec.name))
        outs: list = [rel(getattr(settings.paths, o)) for o in spec.outs]
        if spec.name == "curate":  # DVC keeps the folder during a rerun: finished videos' records are reused
            outs = [{outs[0]: {"persist": True}}]
        for extra in spec.report_outs:
            path = f"{reports}/{extra}"
            outs.append(path if "." not in extra else {path: {"cache": False}})
        if outs:
            stage["outs"] = outs
        stage["metrics"] = [{f"{reports}/metrics.json": {"cache": False}}]
        if spec.plots:
            stage["plots"] = [{f"{reports}/{f}": {"cache": False, "x": x, "y": y}} for f, x, y in spec.plots]
        stages[spec.name] = stage
    header = (
        "# GENERATED by `easyanimate dvc-yaml` from easyanimate/stages.py: do not edit by hand.\n"
        "# Each stage runs its Prefect flow through `easyanimate run STAGE` (inside the project venv).\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
