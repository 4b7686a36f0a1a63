"""MLflow tracking shared by every stage: the stage's (nested) run, its params, tags and results.

Prefect-free, so the CLI, the Prefect flows and tests open stage runs the same way.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
from accelerate.tracking import GeneralTracker
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from easyanimate.config import Settings

PARENT_RUN_ENV = "EASYANIMATE_MLFLOW_PARENT_RUN_ID"


def tracking_uri(settings: Settings) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", settings.registry.tracking_uri)


def setup_mlflow(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri(settings))
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
        metrics = [
            Metric(k.replace("/", "."), float(v), now, step or 0)
            for k, v in values.items()
            if isinstance(v, (int, float))
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


@contextlib.contextmanager
def stage_run(
    settings: Settings, name: str, parent_run_id: str | None = None, **tags: str
) -> Iterator[mlflow.ActiveRun]:
    """A (nested, when a parent is known) MLflow run for one stage, with lineage tags and params."""
    from easyanimate.lineage import git_commit, params_hash
    from easyanimate.stages import get_stage, stage_version

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
    with mlflow.start_run(
        run_name=name, parent_run_id=parent_run_id, nested=parent_run_id is not None, tags=all_tags
    ) as run:
        if spec.params:
            mlflow.log_params(flat_params(settings, spec.params))
        yield run


def log_metrics(metrics: dict) -> None:
    """Scalar metrics of the active run; ``/`` becomes ``.`` (MLflow's key rules)."""
    mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


def log_files(paths, artifact_path: str) -> None:
    """Files and folders (recursively) into the active run under ``artifact_path``; missing ones are skipped."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}")
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
