"""What every stage flow shares: MLflow runs, the accelerate→MLflow tracker, versioned cached tasks."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from accelerate.tracking import GeneralTracker
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact

from easyanimate.config import Settings, load_settings
from easyanimate.lineage import git_commit, params_hash
from easyanimate.stages import StageResult, get_stage, outputs_present, stage_inputs_hash, stage_version

PARENT_RUN_ENV = "EASYANIMATE_MLFLOW_PARENT_RUN_ID"
IO_ERRORS = (OSError, TimeoutError, ConnectionError)


# ------------------------------------------------------------------------------------------ MLflow
def setup_mlflow(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", settings.registry.tracking_uri))
    mlflow.set_experiment(settings.registry.experiment)
    return MlflowClient()


def _flatten(prefix: str, node: Any, out: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(node)[:6000]


def flat_params(settings: Settings, sections: tuple[str, ...]) -> dict[str, str]:
    data = settings.model_dump(mode="json")
    out: dict[str, str] = {}
    for section in sections:
        node: Any = data
        for part in section.split("."):
            node = node[part]
        _flatten(section, node, out)
    return out


class MLflowRunTracker(GeneralTracker):
    """accelerate tracker that writes into an already-open MLflow run (the stage's nested run)."""

    name = "mlflow_run"
    requires_logging_directory = False

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.client = MlflowClient()

    @property
    def tracker(self) -> MlflowClient:
        return self.client

    def store_init_configuration(self, values: dict) -> None:
        params = [Param(f"train.{k}", str(v)[:6000]) for k, v in values.items()]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), float(v), now, step or 0) for k, v in values.items()
                   if isinstance(v, (int, float))]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


@contextlib.contextmanager
def stage_run(settings: Settings, name: str, parent_run_id: str | None = None, **tags: str) -> Iterator[mlflow.ActiveRun]:
    """A (nested, when a parent is known) MLflow run for one stage, with lineage tags and params."""
    setup_mlflow(settings)
    parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    spec = get_stage(name)
    all_tags = {
        "stage": name,
        "stage_version": stage_version(name, settings),
        "git_commit": git_commit(),
        "params_hash": params_hash(settings),
        "preset": settings.preset,
        **tags,
    }
    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id, nested=parent_run_id is not None,
                          tags=all_tags) as run:
        if spec.params:
            mlflow.log_params(flat_params(settings, spec.params))
        yield run


def log_stage_result(result: StageResult) -> None:
    mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in result.metrics.items()
                        if isinstance(v, (int, float))})
    for artifact in result.artifacts:
        if Path(artifact).exists():
            mlflow.log_artifact(str(artifact), artifact_path=result.name)


# ------------------------------------------------------------------------------------------ Prefect
def _retry_on_io(task, task_run, state) -> bool:
    """Retry only transient I/O failures; a bad config or a NaN loss fails at once."""
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:
        return False
    return False


def versioned_stage_task(name: str, settings: Settings, fn: Callable[..., dict]) -> Any:
    """Wrap ``fn`` as the stage's Prefect task.

    ``version`` follows the stage's code and settings; the cache key adds the content of its inputs,
    so an unchanged rerun is a cache hit. Missing outputs force a refresh instead of a stale hit.
    """
    version = stage_version(name, settings)
    key = f"{name}-{stage_inputs_hash(name, settings)}"
    return task(
        fn,
        name=name,
        version=version,
        retries=2,
        retry_delay_seconds=2,
        retry_condition_fn=_retry_on_io,
        persist_result=True,
        cache_key_fn=lambda *_: key,
        refresh_cache=not outputs_present(name, settings),
        log_prints=True,
    )


def settings_from(params_path: str | None, preset: str | None = None) -> Settings:
    return load_settings(params_path, preset=preset)


def stage_summary_artifact(name: str, metrics: dict, extra: str = "") -> None:
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                     for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        key=name.replace("_", "-"),
        markdown=f"## {name}\n\n| metric | value |\n|---|---|\n{rows}\n\n{extra}",
        description=f"{name} metrics",
    )


def run_training_stage(name: str, settings: Settings, parent_run_id: str | None = None,
                       upstream_run_id: str | None = None) -> dict:
    """Run one training stage as a versioned, cached Prefect task inside its own MLflow run."""
    from easyanimate.lineage import dvc_hash
    from easyanimate.stages import TRAINING_RUNNERS

    def body() -> dict:
        tags = {"upstream_run_id": upstream_run_id or "", "curated_data_dvc_hash": dvc_hash(settings.paths.curated)}
        with stage_run(settings, name, parent_run_id, **tags) as run:
            result = TRAINING_RUNNERS[name](settings, trackers=[MLflowRunTracker(run.info.run_id)])
            if result.info.get("parent"):
                mlflow.set_tag("parent_checkpoint", result.info["parent"])
            log_stage_result(result)
            return {"stage": name, "run_id": run.info.run_id, "metrics": result.metrics,
                    "outputs": {k: str(v) for k, v in result.outputs.items()}}

    out = versioned_stage_task(name, settings, body)()
    stage_summary_artifact(name, out["metrics"])
    return out
