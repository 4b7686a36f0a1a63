"""The MLflow model registry, in one place: resolving and downloading registered models, registering the
evaluated pipeline (with its lineage) and its LoRA adapter, gated promotion, and the ``register`` stage.

Prefect-free: the CLI, the Prefect flows, serving and tests all go through this module.

Promotion is the registry side of ``easyanimate.promotion.decide``: the challenger and the champion are
scored on the same held-out set before they are compared. Stored metrics are used when they were computed
on the current curated data (DVC hash) with the current evaluation protocol; otherwise that side's pipeline
is downloaded and re-evaluated (and the result cached as a tag on its version).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from easyanimate.config import Settings
from easyanimate.lineage import (
    PARAMS_ARTIFACT,
    RUN_TAG,
    checkpoint_tags,
    dvc_hash,
    git_commit,
    params_hash,
    resolve_stage_runs,
)
from easyanimate.promotion import Candidate, Decision, decide
from easyanimate.stage_api import StageContext, StageResult, read_json, write_reports
from easyanimate.stages import (
    NATIVE,
    V51,
    family_role,
    get_stage,
    producer,
    report_dir,
    stage_inputs_hash,
    stage_names_for,
    stage_version,
    stages_for,
)
from easyanimate.tracking import log_files, log_metrics, setup_mlflow, stage_run, tracking_uri, workspace_tags
from easyanimate.utils import atomic_directory, atomic_write_json, atomic_write_text, verify_safetensors

REGISTRY_SCHEME = "models:/"
PIPELINE_MARKER = "model_index.json"  # a saved pipeline folder holds it at its root
REEVAL_TAG = "reevaluated.{data}.{protocol}"  # on a version: its metrics on another data/protocol, as JSON
WARM_START_TAG = "warm_start"  # on a version: the model its training continued from (``model_lineage`` reads it)
TAG_VALUE_LIMIT = 5000  # MLflow's limit on a model-version tag value


class ModelNotFound(FileNotFoundError, LookupError):
    """A ``models:/`` URI that does not resolve (or holds the wrong kind of model); the message is one line
    naming the URI. Both a FileNotFoundError and a LookupError, so either kind of caller catches it."""


# ------------------------------------------------------------------------------------------ lookup
def champion_version(client: MlflowClient, settings: Settings) -> str | None:
    """The version holding ``registry.champion_alias``; None when there is no such model or alias.

    Only "does not exist" means no champion: an unreachable server raises, so a retrain never silently
    starts from scratch because the registry was down.
    """
    try:
        model = client.get_registered_model(settings.registry.model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(settings.registry.champion_alias)
    return str(version) if version is not None else None


def latest_version(client: MlflowClient, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(f"no registered versions of model {name!r} (registry.model_name)")
    return str(max(int(v.version) for v in versions))


def split_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION)."""
    name, _, version = uri.removeprefix(REGISTRY_SCHEME).rpartition("/")
    if not uri.startswith(REGISTRY_SCHEME) or not name or not version.isdigit():
        raise ValueError(f"{uri!r} is not models:/NAME/VERSION")
    return name, version


# ------------------------------------------------------------------------------------------ download
def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def download_model(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """The files of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, as a local folder.

    With ``dst`` the download is a cache: it lands atomically in ``dst``, and an existing ``dst`` is
    returned as is (pass a version URI then: a version's files never change, an alias moves). Without
    ``dst`` MLflow picks a fresh temporary folder. ``tracking_uri`` (``MLFLOW_TRACKING_URI`` wins over it)
    is used for this call only; without it the process-wide tracking URI is.
    """
    uri = str(uri)
    if not uri.startswith(REGISTRY_SCHEME):
        raise ValueError(
            f"{uri!r} is not a registry URI ({REGISTRY_SCHEME}NAME/VERSION or {REGISTRY_SCHEME}NAME@ALIAS)"
        )
    where = os.environ.get("MLFLOW_TRACKING_URI", tracking_uri) if tracking_uri else None

    def fetch(into: Path | None) -> Path:
        # The registry of a models:/ URI is the registry URI, which defaults to the global tracking URI:
        # name both, or a per-call tracking URI would still resolve against the global registry.
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(into) if into else None, tracking_uri=where, registry_uri=where
            )
        )

    try:
        if dst is None:
            return fetch(None)
        dst = Path(dst)
        if not dst.exists():
            with atomic_directory(dst) as tmp:
                fetch(tmp)
        return dst
    except MlflowException as exc:
        store = where or mlflow.get_tracking_uri()
        raise ModelNotFound(f"{uri} cannot be downloaded from {store}: {_first_line(exc)}") from None


def _folder_holding(root: Path, marker: str, uri: str, what: str) -> Path:
    found = sorted(root.rglob(marker))
    if not found:
        raise ModelNotFound(f"{uri} holds no {what} (no {marker})")
    return found[0].parent


def pipeline_folder(ref: str | Path, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A saved pipeline folder, or the one inside ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
    (downloaded, into ``dst`` when given: see ``download_model``)."""
    ref = str(ref)
    if ref.startswith(REGISTRY_SCHEME):
        path = _folder_holding(download_model(ref, dst, tracking_uri), PIPELINE_MARKER, ref, "pipeline folder")
    else:
        path = Path(ref)
        if not (path / PIPELINE_MARKER).is_file():
            raise FileNotFoundError(
                f"{ref} is not a pipeline folder (no {PIPELINE_MARKER}); run the pipeline or pass models:/NAME@ALIAS"
            )
    verify_safetensors(path)
    return path


def lora_path(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """An adapter folder or ``.safetensors`` file, or the adapter inside a registered LoRA model."""
    from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME

    ref = str(ref)
    if ref.startswith(REGISTRY_SCHEME):
        return _folder_holding(download_model(ref, None, tracking_uri), LORA_WEIGHT_NAME, ref, "LoRA adapter")
    path = Path(ref)
    if not (path / LORA_WEIGHT_NAME).is_file() and not (path.is_file() and path.suffix == ".safetensors"):
        raise FileNotFoundError(f"{ref} is neither a LoRA folder (with {LORA_WEIGHT_NAME}) nor a .safetensors file")
    return path


def download_pipeline(settings: Settings, version: str) -> Path:
    """Version ``version``'s pipeline folder, downloaded once into ``retrain.download_dir/NAME-vVERSION``."""
    name = settings.registry.model_name
    dst = (settings.retrain.download_dir / f"{name}-v{version}").resolve()
    return pipeline_folder(f"{REGISTRY_SCHEME}{name}/{version}", tracking_uri(settings), dst=dst)


def tag_version(client: MlflowClient, uri: str, tags: dict[str, str]) -> None:
    """Set tags on the version ``models:/NAME/VERSION`` names."""
    name, version = split_model_uri(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:TAG_VALUE_LIMIT])


# ------------------------------------------------------------------------------------------ resume
REGISTER_KEY_TAG = "easyanimate.register_key"  # the register stage's inputs hash
REGISTERED_TAG = "easyanimate.registered"  # set last: the version's tags are complete


def register_key(settings: Settings) -> str:
    return stage_inputs_hash(register_stage(settings), settings)


# ------------------------------------------------------------------------------------------ families
def register_stage(settings: Settings) -> str:
    return family_role(settings.model.family, "register")


def evaluation_dir(settings: Settings) -> Path:
    """The report folder of the evaluation the register stage reads (gate, metrics, context)."""
    return report_dir(settings, family_role(settings.model.family, "evaluate"))


def registered_pipeline_dir(settings: Settings) -> Path:
    """The pipeline folder the family's evaluate stage assembles (its output in the DAG)."""
    [pipeline] = get_stage(family_role(settings.model.family, "evaluate")).outs
    return getattr(settings.paths, pipeline)


def registered_adapter_dir(settings: Settings) -> Path | None:
    """The LoRA adapter registered beside the pipeline, if one was trained: the register stage's input that a
    training stage writes (native ``lora``; V5.1 ``v51_finetune``, an adapter only with ``v51.finetune: lora``)."""
    from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME

    spec = get_stage(register_stage(settings))
    [adapter] = [dep for dep in spec.deps if (made_by := producer(dep)) and get_stage(made_by).trains]
    folder = getattr(settings.paths, adapter)
    return folder if (folder / LORA_WEIGHT_NAME).is_file() else None


def pyfunc_model(settings: Settings, **kwargs):
    """The pyfunc wrapper a version is logged with: the request defaults and limits of this run, and the family."""
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc

    if settings.model.family == V51:
        kwargs.update(family=V51, v51=settings.v51)
    return EasyAnimatePyfunc(generate=settings.generate, max_text_tokens=settings.dit.model.max_text_tokens, **kwargs)


def finished_version(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    """The version of ``name`` an earlier register stage made from these same inputs, when it finished
    tagging it; a version a killed attempt left half-tagged is deleted (it never became an alias)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.tags.get(REGISTER_KEY_TAG) != key:
            continue
        if version.tags.get(REGISTERED_TAG) == "true":
            return version
        if not version.aliases:
            print(f"deleting models:/{name}/{version.version}: a killed register attempt left it half-made")
            client.delete_model_version(name, version.version)
    return None


# ------------------------------------------------------------------------------------------ runs
@contextlib.contextmanager
def _register_run(settings: Settings, parent_run_id: str | None) -> Iterator[mlflow.ActiveRun]:
    """The register stage's run: the active one when the stage runner opened it, else a new one."""
    active = mlflow.active_run()
    stage = register_stage(settings)
    if active is not None and active.data.tags.get("stage") == stage:
        yield active
        return
    with stage_run(settings, stage, parent_run_id) as run:
        yield run


@contextlib.contextmanager
def _sibling_run(run_name: str, parent_run_id: str | None, tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """A run that is a child of ``parent_run_id`` (top-level without one) even while another run is active.

    ``mlflow.start_run`` refuses a parent other than the active run, so with one active the run is
    created by the client and then pushed onto the fluent stack (``log_model`` writes into it).
    """
    tags = {**workspace_tags(), **tags}
    active = mlflow.active_run()
    if active is None:
        with mlflow.start_run(
            run_name=run_name, parent_run_id=parent_run_id, nested=parent_run_id is not None, tags=tags
        ) as run:
            yield run
        return
    all_tags = {**tags, **({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})}
    created = MlflowClient().create_run(active.info.experiment_id, tags=all_tags, run_name=run_name)
    with mlflow.start_run(run_id=created.info.run_id, nested=True) as run:
        yield run


# ------------------------------------------------------------------------------------------ register
def lineage_tags(settings: Settings, client: MlflowClient, run, upstream_run_id: str | None) -> dict[str, str]:
    """What the version came from: data, code, params, parent checkpoints and the runs that made them."""
    parent_run_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    family = settings.model.family
    names = stage_names_for(family)
    upstream = names[: names.index(register_stage(settings))]
    trained = tuple(s.name for s in stages_for(family) if s.trains)
    evaluate = family_role(family, "evaluate")
    runs = resolve_stage_runs(
        client,
        run.info.experiment_id,
        {s: stage_version(s, settings) for s in upstream},
        evaluate_run_id=upstream_run_id,
        parent_run_id=parent_run_id,
    )
    # A stage run's parent_checkpoint tag is its actual init folder; otherwise its model inputs are its parents.
    parents = {}
    for stage in trained:
        tagged = client.get_run(runs[stage][0]).data.tags.get("parent_checkpoint") if stage in runs else None
        model_deps = [d for d in get_stage(stage).deps if d in trained]
        if family == V51 and not model_deps:  # a V5.1 fine-tune starts from the released checkpoint
            model_deps_paths = [str(settings.v51.model_dir)]
        else:
            model_deps_paths = [str(getattr(settings.paths, d)) for d in model_deps]
        parents[stage] = tagged or ",".join(model_deps_paths)
    adapter = registered_adapter_dir(settings)
    family_tags = {"model.family": family}
    if family == V51:
        family_tags.update(v51_release_tags(settings.v51.model_dir))
    return {
        **family_tags,
        "git_commit": git_commit(),
        "curated_data_dvc_hash": dvc_hash(settings.paths.curated),
        "params_hash": params_hash(settings),
        "pipeline_dvc_hash": dvc_hash(registered_pipeline_dir(settings)),
        "lora_dvc_hash": dvc_hash(adapter) if adapter is not None else "none",
        "evaluate_run_id": upstream_run_id or (runs[evaluate][0] if evaluate in runs else ""),
        "pipeline_run_id": parent_run_id or "",
        "register_run_id": run.info.run_id,
        **checkpoint_tags({s: getattr(settings.paths, s) for s in trained}, parents),
        **{RUN_TAG.format(stage=s): run_id for s, (run_id, _) in runs.items()},
        "lineage.runs_found_by": json.dumps({s: how for s, (_, how) in runs.items()}, sort_keys=True)[:TAG_VALUE_LIMIT],
    }


def v51_release_tags(model_dir) -> dict[str, str]:
    """Which release a V5.1 version was fine-tuned from: its folder and a hash of its component configs."""
    import hashlib

    from easyanimate.families.v51 import SUBFOLDERS, is_inpaint_checkpoint

    folder = Path(model_dir)
    digest = hashlib.sha256()
    for name in ["model_index.json", *(f"{sub}/{config}" for sub, config in SUBFOLDERS.items())]:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return {
        "v51.base_model_dir": str(folder.resolve()),
        "v51.base_config_hash": digest.hexdigest()[:16],
        "v51.inpaint": str(is_inpaint_checkpoint(folder)),
    }


def register_pipeline(
    settings: Settings,
    client: MlflowClient,
    parent_run_id: str | None = None,
    upstream_run_id: str | None = None,
    params_path: str | None = None,
) -> dict:
    """Log ``paths.pipeline`` (and the LoRA, if any) as a pyfunc model version inside the register stage's
    run (the active one, or a new one nested in ``parent_run_id``): evaluation metrics on that run, gates,
    hashes and lineage as version tags. ``upstream_run_id`` is the evaluate run."""
    evaluation = evaluation_dir(settings)
    gate = read_json(evaluation / "gate.json")
    metrics = read_json(evaluation / "metrics.json")
    context = read_json(evaluation / "eval_context.json") or {}
    if gate is None or metrics is None:
        raise FileNotFoundError(f"{evaluation}/gate.json and metrics.json are missing: run the evaluate stage first")
    data_gate = read_json(settings.paths.curated / "gate.json")
    name = settings.registry.model_name
    key = register_key(settings)
    done = finished_version(client, name, key)
    if done is not None:  # a rerun after a kill: the version exists, finish the stage around it
        print(f"models:/{name}/{done.version} was registered from these inputs already; reusing it")
        return {
            "model": name,
            "version": str(done.version),
            "uri": f"{REGISTRY_SCHEME}{name}/{done.version}",
            "run_id": done.run_id,
            **{k: done.tags.get(k, "") for k in REGISTER_SUMMARY_TAGS},
        }
    with _register_run(settings, parent_run_id) as active:
        run = client.get_run(active.info.run_id)
        params_file = Path(params_path or "params.yaml")
        if params_file.exists():
            mlflow.log_artifact(str(params_file), artifact_path=str(Path(PARAMS_ARTIFACT).parent))
        mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
        for extra in ("report.md", "val_loss.csv", "eval_context.json"):
            if (evaluation / extra).exists():
                mlflow.log_artifact(str(evaluation / extra), artifact_path="evaluation")
        artifacts = {"pipeline": str(registered_pipeline_dir(settings))}
        adapter = registered_adapter_dir(settings)
        if adapter is not None:
            artifacts["lora"] = str(adapter)
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            # The served model carries this run's request defaults and limits (generate.*), not class defaults.
            python_model=pyfunc_model(settings),
            artifacts=artifacts,
            registered_model_name=name,
            pip_requirements=["easyanimate"],
        )
        version = str(info.registered_model_version)
        # The evaluation's metrics live on the model version's run (and its logged model).
        eval_metrics = {k.replace("/", "."): float(v) for k, v in metrics.items()}
        mlflow.log_metrics(eval_metrics, model_id=info.model_id)
        tags = {
            **lineage_tags(settings, client, run, upstream_run_id),
            "data_gate_passed": str(bool(data_gate and data_gate.get("success"))) if data_gate else "unknown",
            "eval_passed": str(gate["passed"]),
            "eval_reasons": "; ".join(gate["reasons"]) or "all gates passed",
            "eval_data_dvc_hash": context.get("data_dvc_hash", ""),
            "eval_protocol_hash": context.get("protocol_hash", ""),
            "eval_latent_space": context.get("latent_space", ""),
            "eval_num_val_clips": str(len(context.get("val_clip_ids", []))),
            **{f"skipped.{k}": v for k, v in gate.get("skipped", {}).items()},
            **{k: f"{v:.6g}" for k, v in eval_metrics.items()},
            REGISTER_KEY_TAG: key,
        }
        uri = f"{REGISTRY_SCHEME}{name}/{version}"
        tag_version(client, uri, {**tags, REGISTERED_TAG: "true"})  # dicts keep order: the marker goes last
        mlflow.set_tags({"registered_model": uri})
    return {
        "model": name,
        "version": version,
        "uri": uri,
        "run_id": run.info.run_id,
        **{k: tags[k] for k in REGISTER_SUMMARY_TAGS},
    }


REGISTER_SUMMARY_TAGS = (
    "git_commit",
    "curated_data_dvc_hash",
    "params_hash",
    "pipeline_dvc_hash",
    "lora_dvc_hash",
    "evaluate_run_id",
    "eval_passed",
    "data_gate_passed",
)


def register_lora_adapter(
    settings: Settings, base_model_name: str, base_version: str, parent_run_id: str | None = None
) -> dict | None:
    """Register ``paths.lora`` as a version of ``lora.registered_model`` (a pyfunc whose only artifact is
    the adapter folder; it loads ``models:/BASE/VERSION`` when served) and link the two by tags.

    Its run ``register_lora`` is a child of ``parent_run_id`` (the pipeline run), also while the register
    run is active. The adapter version takes the champion alias when its base version holds it, so
    ``models:/<lora model>@champion`` always pairs with ``models:/<base>@champion``. Returns None when no
    adapter was trained.
    """
    from easyanimate.pipelines.pipeline_easyanimate import read_lora_config

    adapter = registered_adapter_dir(settings)
    if adapter is None:
        print("no LoRA adapter was trained; nothing to register")
        return None
    client = MlflowClient()
    name = settings.lora.registered_model
    base_uri = f"{REGISTRY_SCHEME}{base_model_name}/{base_version}"
    adapter_bytes = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    key = f"{register_key(settings)}-lora-of-{base_version}"
    done = finished_version(client, name, key)
    if done is not None:
        version = str(done.version)
        print(f"models:/{name}/{version} was registered for {base_uri} already; reusing it")
        return _lora_alias(client, settings, name, version, base_model_name, base_version, adapter_bytes)
    with _sibling_run("register_lora", parent_run_id, {"lora_base_model": base_uri}):
        model = pyfunc_model(settings, base_model_uri=base_uri, lora_scale=settings.lora.default_scale)
        info = mlflow.pyfunc.log_model(
            name="lora",
            python_model=model,
            artifacts={"lora": str(adapter)},
            registered_model_name=name,
            pip_requirements=["easyanimate"],
        )
        mlflow.log_metric("lora.adapter_bytes", float(adapter_bytes))
    version = str(info.registered_model_version)
    uri = f"{REGISTRY_SCHEME}{name}/{version}"
    config = read_lora_config(adapter)  # what the file holds, whatever the settings say now
    tag_version(
        client,
        uri,
        {
            "base_model_name": base_model_name,
            "base_model_version": str(base_version),
            "base_model_uri": base_uri,
            "lora_rank": str(config.get("r", "")),
            "lora_alpha": str(config.get("lora_alpha", "")),
            "lora_target_modules": ",".join(sorted(config.get("target_modules") or [])),
            "lora_default_scale": str(settings.lora.default_scale),
            "adapter_bytes": str(adapter_bytes),
            "lora_dvc_hash": dvc_hash(adapter),
            "model.family": settings.model.family,
            REGISTER_KEY_TAG: key,
            REGISTERED_TAG: "true",
        },
    )
    return _lora_alias(client, settings, name, version, base_model_name, base_version, adapter_bytes)


def _lora_alias(
    client: MlflowClient,
    settings: Settings,
    name: str,
    version: str,
    base_model_name: str,
    base_version: str,
    adapter_bytes: int,
) -> dict:
    uri = f"{REGISTRY_SCHEME}{name}/{version}"
    base_uri = f"{REGISTRY_SCHEME}{base_model_name}/{base_version}"
    tag_version(client, base_uri, {"lora_model_uri": uri})
    champion = settings.registry.champion_alias
    alias = None
    if champion in client.get_model_version(base_model_name, str(base_version)).aliases:
        client.set_registered_model_alias(name, champion, version)
        alias = champion
    print(
        f"registered LoRA adapter {uri} ({adapter_bytes / 1024:.0f} KiB) for {base_uri}"
        + (f" as @{alias}" if alias else "")
    )
    return {
        "model": name,
        "version": version,
        "uri": uri,
        "base_model_uri": base_uri,
        "alias": alias,
        "adapter_bytes": adapter_bytes,
    }


# ------------------------------------------------------------------------------------------ promote
def _bool(value: str | None) -> bool | None:
    return {"True": True, "False": False}.get(value or "")  # anything else: not recorded


def _eval_metrics(run_metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("eval.", "eval/", 1): float(v) for k, v in run_metrics.items() if k.startswith("eval.")}


def candidate_from_version(client: MlflowClient, name: str, version: str) -> Candidate:
    """The metrics logged on the version's run and the gate results and hashes tagged on the version."""
    mv = client.get_model_version(name, version)
    tags = mv.tags
    metrics = _eval_metrics(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    return Candidate(
        str(version),
        metrics,
        _bool(tags.get("data_gate_passed")),
        _bool(tags.get("eval_passed")),
        tags.get("eval_reasons", "") if tags.get("eval_passed") != "True" else "",
        tags.get("eval_data_dvc_hash", ""),
        tags.get("eval_protocol_hash", ""),
        tags.get("eval_latent_space", ""),
    )


def current_yardstick(settings: Settings) -> tuple[str, str]:
    """(DVC hash of the curated data, evaluation protocol hash) that every comparison uses now."""
    manifest = settings.paths.curated / "manifest.parquet"
    if not manifest.exists():
        raise FileNotFoundError(
            f"{manifest} is missing: run `dvc pull` (or the curate stage) so challenger and "
            f"champion are scored on the same held-out set (paths.curated)"
        )
    return dvc_hash(settings.paths.curated), family_protocol_hash(settings)


def family_protocol_hash(settings: Settings) -> str:
    """The evaluation protocol of ``settings.model.family`` (each family's evaluation has its own settings)."""
    if settings.model.family == V51:
        from easyanimate.families.v51_evaluate import protocol_hash

        return protocol_hash(settings)
    from easyanimate.evaluation.evaluate import evaluation_protocol_hash

    return evaluation_protocol_hash(settings)


def _reevaluate(settings: Settings, client: MlflowClient, name: str, version: str, workdir: Path):
    """Score a registered version with this family's evaluation on the current held-out set."""
    uri = f"{REGISTRY_SCHEME}{name}/{version}"
    pipeline_dir = pipeline_folder(uri, dst=workdir / f"v{version}")
    out = workdir / f"eval_v{version}"
    if settings.model.family == V51:
        from easyanimate.families.v51 import LORA_WEIGHTS_NAME
        from easyanimate.families.v51_evaluate import evaluate_v51

        adapters = sorted(pipeline_dir.parent.rglob(LORA_WEIGHTS_NAME))
        return evaluate_v51(settings, out, pipeline_dir, adapters[0].parent if adapters else None)
    from easyanimate.evaluation.evaluate import evaluate_pipeline

    return evaluate_pipeline(settings, pipeline_dir, settings.paths.curated, out)


def on_yardstick(
    client: MlflowClient,
    settings: Settings,
    candidate: Candidate,
    yardstick: tuple[str, str],
    workdir: Path,
    as_challenger: bool,
    dry_run: bool,
) -> tuple[Candidate, str]:
    """The candidate's metrics on the current held-out set: stored, cached from an earlier re-evaluation,
    or re-evaluated now from its registered pipeline."""
    data, protocol = yardstick
    if (candidate.data_hash, candidate.protocol_hash) == yardstick:
        return candidate, "stored metrics of its evaluation run"
    name = settings.registry.model_name
    cache_key = REEVAL_TAG.format(data=data, protocol=protocol)
    version_tags = client.get_model_version(name, candidate.version).tags
    cached = version_tags.get(cache_key)
    family = version_tags.get("model.family", NATIVE)
    if family != settings.model.family:  # decide() then refuses the comparison: other protocol, other latents
        return (
            candidate,
            f"stored metrics: a {family} model is not re-scored under model.family {settings.model.family}",
        )
    if cached:
        entry = json.loads(cached)
        source = f"cached re-evaluation on data {data}"
    else:
        report = _reevaluate(settings, client, name, candidate.version, workdir)
        entry = {
            "metrics": report.metrics,
            "passed": report.passed,
            "reasons": report.reasons,
            "latent_space": report.context.get("latent_space", ""),
        }
        if not dry_run:
            client.set_model_version_tag(name, candidate.version, cache_key, json.dumps(entry)[:TAG_VALUE_LIMIT])
        source = f"re-evaluated on data {data} (stored metrics were on {candidate.data_hash or 'unknown data'})"
    updated = replace(
        candidate,
        metrics=entry["metrics"],
        data_hash=data,
        protocol_hash=protocol,
        latent_space=entry.get("latent_space") or candidate.latent_space,
    )
    if as_challenger:  # its evaluation gate is the one on the current held-out set
        updated = replace(updated, eval_gate_passed=entry["passed"], eval_reasons="; ".join(entry["reasons"]))
    return updated, source


def decision_tags(
    decision: Decision,
    challenger: Candidate,
    champion: Candidate | None,
    champion_source: str,
    champion_before: str | None,
    settings: Settings,
) -> dict[str, str]:
    def dump(data) -> str:
        return json.dumps(data, sort_keys=True)[:TAG_VALUE_LIMIT]

    return {
        "promotion": (
            settings.registry.champion_alias if decision.promote else f"rejected: {decision.reason}"[:TAG_VALUE_LIMIT]
        ),
        "promotion.decision": decision.label,
        "promotion.reason": decision.reason[:TAG_VALUE_LIMIT],
        "promotion.champion_version": champion_before or "none",
        "promotion.challenger_metrics": dump(challenger.metrics),
        "promotion.champion_metrics": dump(champion.metrics if champion else {}),
        "promotion.champion_metrics_source": champion_source,
        "promotion.comparison": decision.comparison_json()[:TAG_VALUE_LIMIT],
        "promotion.margins": dump(settings.registry.promotion.model_dump()),
        "promotion.data_dvc_hash": challenger.data_hash,
        "promotion.protocol_hash": challenger.protocol_hash,
        "promotion.latent_space": challenger.latent_space,
        "promotion.champion_latent_space": champion.latent_space if champion else "",
    }


def promote_version(
    settings: Settings,
    version: str | None = None,
    dry_run: bool = False,
    client: MlflowClient | None = None,
    samples: list[str] | None = None,
) -> dict:
    """Decide whether ``version`` (default: the latest) becomes champion; unless ``dry_run``, record it.

    The version gets the challenger alias; on promotion the champion alias moves to it and the old
    champion is tagged with its successor. The decision, both metric sets and the reason are tags.
    """
    from easyanimate.evaluation.report import promotion_markdown

    client = client or setup_mlflow(settings)
    reg = settings.registry
    name = reg.model_name
    version = str(version or latest_version(client, name))
    yardstick = current_yardstick(settings)
    with tempfile.TemporaryDirectory(prefix="easyanimate-promote-") as tmp:
        challenger, challenger_source = on_yardstick(
            client,
            settings,
            candidate_from_version(client, name, version),
            yardstick,
            Path(tmp),
            as_challenger=True,
            dry_run=dry_run,
        )
        current = champion_version(client, settings)
        champion, champion_source = None, "no champion"
        gates_passed = challenger.data_gate_passed is True and challenger.eval_gate_passed is True
        if current is not None and not gates_passed:
            champion_source = "not compared: the challenger failed a gate"
        elif current is not None and current != version:
            champion, champion_source = on_yardstick(
                client,
                settings,
                candidate_from_version(client, name, current),
                yardstick,
                Path(tmp),
                as_challenger=False,
                dry_run=dry_run,
            )
        elif current == version:
            champion, champion_source = challenger, challenger_source
    decision = decide(challenger, champion, reg.promotion)
    tags = decision_tags(decision, challenger, champion, champion_source, current, settings)
    tags["promotion.challenger_metrics_source"] = challenger_source
    if not dry_run:
        client.set_registered_model_alias(name, reg.challenger_alias, version)
        tag_version(client, f"{REGISTRY_SCHEME}{name}/{version}", tags)
        if decision.promote and current != version:
            client.set_registered_model_alias(name, reg.champion_alias, version)
            if current is not None:
                client.set_model_version_tag(name, current, "promotion.replaced_by", version)
    markdown = promotion_markdown(decision, challenger, champion, champion_source, samples or [], dry_run=dry_run)
    return {
        "model": name,
        "version": version,
        "promoted": decision.promote,
        "decision": decision.label,
        "reason": decision.reason,
        "champion_before": current,
        "champion_after": version if decision.promote else current,
        "dry_run": dry_run,
        "challenger_metrics": challenger.metrics,
        "champion_metrics": champion.metrics if champion else {},
        "champion_metrics_source": champion_source,
        "challenger_metrics_source": challenger_source,
        "markdown": markdown,
    }


# ------------------------------------------------------------------------------------------ the stage
def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    """The ``register`` stage: register the evaluated pipeline (alias ``challenger``), promote it only if it
    earns ``champion``, register its LoRA adapter, and write ``promotion.md``, ``registered.json`` and
    ``metrics.json``.

    Runs inside the stage's MLflow run when the stage runner opened one; untracked, it opens its own.
    """
    client = setup_mlflow(settings)
    reg = settings.registry
    out = ctx.report_dir
    with _register_run(settings, ctx.parent_run_id) as run:
        opened_here = run.info.run_id != ctx.run_id
        result = register_pipeline(settings, client, ctx.parent_run_id, ctx.upstream_run_id, ctx.params_path)
        samples = sorted(str(p.resolve()) for p in (evaluation_dir(settings) / "samples").glob("*.gif"))
        promotion = promote_version(settings, result["version"], client=client, samples=samples)
        promoted = promotion["promoted"]
        result.update(
            alias=reg.champion_alias if promoted else reg.challenger_alias,
            promoted=promoted,
            promotion_reason=promotion["reason"],
            champion_version=promotion["champion_after"],
        )
        # The adapter's run sits beside this one, under the same pipeline run (as the other stages' runs).
        pipeline_run = client.get_run(run.info.run_id).data.tags.get(MLFLOW_PARENT_RUN_ID)
        result["lora_model"] = register_lora_adapter(settings, result["model"], result["version"], pipeline_run)
        metrics = {"register/version": float(result["version"]), "register/promoted": float(promoted)}
        artifacts: list[Path] = []
        if ctx.write_reports:
            atomic_write_text(out / "promotion.md", promotion["markdown"])
            atomic_write_json(out / "registered.json", result)
            write_reports(out, metrics)
            artifacts = [out / "promotion.md", out / "registered.json"]
        if opened_here:  # otherwise the stage runner logs the result into its run
            log_metrics(metrics)
            log_files(artifacts, "register")
    print(f"registered {result['model']} version {result['version']} as @{result['alias']}: {promotion['reason']}")
    return StageResult(
        name=register_stage(settings),
        metrics=metrics,
        artifacts=artifacts,
        info=result,
        markdown={"promotion": (f"{result['uri']}: challenger vs champion", promotion["markdown"])},
        run_id=run.info.run_id,
    )
