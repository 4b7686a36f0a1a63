"""Curation flow: the curate stage on any folder (``easyanimate curate IN OUT``, the ``new-raw-data``
deployment), its per-video work fanned out on the configured Prefect task runner."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import settings_from, stage_task, workspace_session


@flow(name="curate", log_prints=True)
def curate_flow(
    params_path: str | None = None,
    input_dir: str | None = None,
    output_dir: str | None = None,
    preset: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    settings = settings_from(params_path, preset)
    paths = {}
    if input_dir:
        paths["raw_videos"] = Path(input_dir)
    if output_dir:
        paths["curated"] = Path(output_dir)
    if paths:
        settings = settings.model_copy(update={"paths": settings.paths.model_copy(update=paths)})
    # A folder curated on the side keeps its reports beside it (never inside it: they would change its hash).
    context = {"report_dir": Path(output_dir).parent / f"{Path(output_dir).name}-reports"} if output_dir else {}
    with workspace_session(settings, f"easyanimate curate {input_dir or ''} {output_dir or ''}".strip()):
        return stage_task("curate", settings, params_path, parent_run_id, **context)
