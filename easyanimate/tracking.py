"""MLflow tracking shared by every stage: the stage's (nested) run, its params, tags and results.

Prefect-free, so the CLI, the Prefect flows and tests open stage runs the same way.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import mlflow
from accelerate.tracking import GeneralTracker
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from easyanimate.config import Settings

PARENT_RUN_ENV = "EASYANIMATE_MLFLOW_PARENT_RUN_ID"


WORKSPACE_TAG = "easyanimate.workspace"
PID_TAG = "easyanimate.pid"
SESSION_TAG = "easyanimate.session"
# Pids repeat (containers start at 1); a per-process id says "this process" without doubt.
SESSION_ID = uuid.uuid4().hex
_reachable: set[str] = set()


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; one line naming the URI. Not an OSError, so nothing retries it."""


def tracking_uri(settings: Settings) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", settings.registry.tracking_uri)


def check_tracking_server(settings: Settings) -> str:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer its health check; also bound
    MLflow's own request timeout and retries by ``registry.http_timeout_s``/``http_retries`` (an operator's
    ``MLFLOW_HTTP_REQUEST_*`` variables win)."""
    uri = tracking_uri(settings)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.registry.http_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.registry.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if not uri.startswith(("http://", "https://")) or uri in _reachable:
        return uri
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=settings.registry.http_timeout_s)
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix MLFLOW_TRACKING_URI / "
            "registry.tracking_uri"
        ) from None
    if response.status_code >= 500:
        raise TrackingUnavailable(f"MLflow tracking server {uri} answered its health check with {response.status_code}")
    _reachable.add(uri)
    return uri


def workspace_tags() -> dict[str, str]:
    """Tags that tie a run to this workspace and process, so a later command can close it if it was killed."""
    from easyanimate.runtime import state_dir

    return {WORKSPACE_TAG: str(state_dir()), PID_TAG: str(os.getpid()), SESSION_TAG: SESSION_ID}


def setup_mlflow(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(check_tracking_server(settings))
    mlflow.set_experiment(settings.registry.experiment)
    return MlflowClient()


def close_dangling_runs(settings: Settings) -> list[str]:
    """Mark KILLED every run of this workspace still RUNNING from another process.

    Call with the workspace lock held: every run-writing command holds it, so such a run's process died
    (``kill -9``, power loss) without ending it. Returns the closed run ids. Skipped (the common case) when the
    lock's previous holder let go of it: only a killed holder can have left a run RUNNING.
    """
    from easyanimate.workspace import previous_holder_released

    if previous_holder_released():
        return []
    client = setup_mlflow(settings)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    if experiment is None:
        return []
    tags = workspace_tags()
    runs = client.search_runs(
        [experiment.experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{WORKSPACE_TAG}` = '{tags[WORKSPACE_TAG]}'",
    )
    closed = []
    for run in runs:
        if run.data.tags.get(SESSION_TAG) == SESSION_ID:
            continue  # this process's own open run (a flow inside a locked command)
        client.set_tag(run.info.run_id, "easyanimate.closed_by", f"pid {tags[PID_TAG]}: its process had died")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


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
        **workspace_tags(),
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
