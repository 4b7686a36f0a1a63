"""The one Prefect wrapper every stage shares: a versioned, cached task around ``easyanimate.stages.run_stage``.

Flows add only what is Prefect's: task caching and retries, the task runner that fans out per-item
work, and artifacts (tables, markdown, links) published from the stage's result.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from prefect import flow, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from easyanimate.config import CurateConfig, Settings, load_settings
from easyanimate.stage_api import StageResult
from easyanimate.stages import (
    get_stage,
    make_context,
    outputs_present,
    raise_for_failure,
    run_stage,
    stage_inputs_hash,
    stage_version,
)
from easyanimate.tracking import close_dangling_runs
from easyanimate.workspace import workspace_lock

IO_ERRORS = (OSError, TimeoutError, ConnectionError)


def settings_from(params_path: str | None, preset: str | None = None) -> Settings:
    return load_settings(params_path, preset=preset)


@contextlib.contextmanager
def workspace_session(settings: Settings, command: str, wait: bool = False) -> Iterator[None]:
    """Every flow that writes holds the workspace lock (re-entrant: the CLI took it already) and first
    closes the MLflow runs a killed earlier process left RUNNING."""
    with workspace_lock(command, wait=wait):
        closed = close_dangling_runs(settings)
        if closed:
            print(f"marked {len(closed)} MLflow run(s) of a killed earlier process KILLED: {', '.join(closed)}")
        yield


def _retry_on_io(task, task_run, state) -> bool:
    """Retry only transient I/O failures; a bad config or a NaN loss fails at once."""
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:
        return False
    return False


def make_task_runner(cfg: CurateConfig):
    if cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ImportError("curate.task_runner=dask needs the 'scale' extra: pip install -e '.[scale]'") from exc
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.max_workers, "threads_per_worker": 1})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def prefect_map(name: str, settings: Settings) -> Callable[..., list[Any]]:
    """``StageContext.map`` on Prefect: one retried task per item, on the configured task runner."""

    def map_items(fn: Callable[..., Any], items: list[Any], **shared: Any) -> list[Any]:
        item_task = task(
            fn,
            name=f"{name}-item",
            retries=2,
            retry_delay_seconds=2,
            retry_condition_fn=_retry_on_io,
            task_run_name=lambda: _item_run_name(name),
        )

        @flow(name=f"{name}-items", task_runner=make_task_runner(settings.curate))
        def fan_out() -> list[Any]:
            futures = item_task.map(items, **{k: unmapped(v) for k, v in shared.items()})
            return [future.result() for future in futures]

        return fan_out()

    return map_items


def _item_run_name(stage: str) -> str:
    from prefect.runtime import task_run

    first = next(iter(task_run.parameters.values()), "")
    return f"{stage}-{getattr(first, 'name', first)}"


def publish_artifacts(result: StageResult) -> None:
    for key, (description, rows) in result.tables.items():
        create_table_artifact(key=key, table=rows, description=description)
    for key, (description, markdown) in result.markdown.items():
        create_markdown_artifact(key=key, markdown=markdown, description=description)
    for key, (uri, text) in result.links.items():
        create_link_artifact(key=key, link=uri, link_text=text)
    rows = "\n".join(
        f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
        for k, v in sorted(result.metrics.items())
    )
    create_markdown_artifact(
        key=result.name.replace("_", "-"),
        description=f"{result.name} metrics",
        markdown=f"## {result.name}\n\n| metric | value |\n|---|---|\n{rows}\n",
    )


def stage_task(
    name: str,
    settings: Settings,
    params_path: str | None = None,
    parent_run_id: str | None = None,
    upstream_run_id: str | None = None,
    **context: Any,
) -> dict:
    """Run stage ``name`` as a Prefect task inside its own MLflow run.

    ``version`` follows the stage's derived code version and settings; a cached stage's key adds the content
    of its inputs, so an unchanged rerun is a cache hit. Missing outputs force a refresh, not a stale hit.
    """
    spec = get_stage(name)
    inputs = stage_inputs_hash(name, settings) if spec.cached or spec.trains else None

    def body() -> dict:
        ctx = make_context(
            name,
            settings,
            inputs_hash=inputs,
            parent_run_id=parent_run_id,
            upstream_run_id=upstream_run_id,
            params_path=params_path,
            map=prefect_map(name, settings),
            **context,
        )
        result = run_stage(name, settings, ctx, track=True)
        publish_artifacts(result)
        raise_for_failure(result)
        return result.summary()

    options: dict = {}
    if spec.cached:
        key = f"{name}-{inputs}"
        options = {
            "persist_result": True,
            "cache_key_fn": lambda *_: key,
            "refresh_cache": not outputs_present(name, settings),
        }
    return task(
        body,
        name=name,
        version=stage_version(name, settings),
        retries=2,
        retry_delay_seconds=2,
        retry_condition_fn=_retry_on_io,
        log_prints=True,
        **options,
    )()


@flow(name="stage", log_prints=True, flow_run_name="{name}")
def stage_flow(
    name: str, params_path: str | None = None, parent_run_id: str | None = None, upstream_run_id: str | None = None
) -> dict:
    """Any one stage of the DAG (``easyanimate run NAME``; each ``dvc.yaml`` stage calls it)."""
    settings = settings_from(params_path)
    with workspace_session(settings, f"easyanimate run {name}"):
        return stage_task(name, settings, params_path, parent_run_id, upstream_run_id)
