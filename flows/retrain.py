"""Scheduled retraining: curate only what is new, continue from the champion, evaluate, promote.

New data arrives as video files in ``paths.raw_videos`` (a watched folder, or a folder a
``dvc update``/``dvc pull`` of a data repo refreshes). Curation is incremental by construction: each
finished video has a record in ``<curated>/records/`` (DVC-tracked with the curated data), so only
videos without one are processed. Training then warm-starts VAE stage 1 and DiT stage 1 from the
current champion's weights (``retrain.from_champion``) instead of fresh models; evaluation and
promotion run as in the pipeline. The training stages never talk to MLflow: this flow resolves the
champion and downloads its pipeline folder (``easyanimate.registry``), then hands the folder over through
``retrain.init_pipeline``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect import flow, task

from easyanimate.config import PARAMS_ENV, Settings, load_settings
from easyanimate.registry import WARM_START_TAG, champion_version, download_pipeline, tag_version
from easyanimate.tracking import setup_mlflow
from easyanimate.utils import atomic_write_text
from flows.common import workspace_session
from flows.pipeline import pipeline_flow


def uncurated_videos(settings: Settings) -> list[str]:
    """Raw videos that have no curation record yet: the ones this run will actually curate."""
    from easyanimate.data.curate import list_videos, record_path
    from easyanimate.data.manifest import file_hash

    raw = settings.paths.raw_videos
    if not raw.is_dir():
        raise FileNotFoundError(f"raw video folder not found: {raw} (paths.raw_videos)")
    return [
        v.name
        for v in list_videos(raw, settings)
        if not record_path(settings.paths.curated, file_hash(v), settings).exists()
    ]


@task(name="download-champion", retries=2, retry_delay_seconds=5)
def download_champion(settings: Settings, version: str) -> Path:
    """The champion's pipeline folder (``model_index.json``, ``vae/``, ``transformer/``…), downloaded once."""
    return download_pipeline(settings, version)


def warm_start_params(params_path: str | None, init_pipeline: Path, settings: Settings, label: str) -> str:
    """A copy of the params file that adds ``retrain.init_pipeline`` (every subflow reads the params file)."""
    source = Path(params_path or os.environ.get(PARAMS_ENV, "params.yaml"))
    params = yaml.safe_load(source.read_text()) if source.exists() else {}
    params = params or {}
    params.setdefault("retrain", {})["init_pipeline"] = str(init_pipeline)
    out = settings.retrain.download_dir / f"params-{label}.yaml"
    atomic_write_text(
        out,
        "# written by flows/retrain.py: "
        + str(source)
        + " + the champion as warm start\n"
        + yaml.safe_dump(params, sort_keys=False),
    )
    load_settings(out)  # fail here, not in the fifth subflow
    return str(out)


@flow(name="retrain", log_prints=True)
def retrain_flow(params_path: str | None = None, from_champion: bool | None = None, version_data: bool = True) -> dict:
    """The whole pipeline, incremental: new videos only, warm start from ``@champion`` when there is one."""
    settings = load_settings(params_path)
    # A scheduled run queues behind whatever command holds the workspace instead of failing.
    with workspace_session(settings, "retrain flow", wait=True):
        return _retrain(settings, params_path, from_champion, version_data)


def _retrain(settings: Settings, params_path: str | None, from_champion: bool | None, version_data: bool) -> dict:
    from easyanimate.warm_start import warm_start_mismatches

    client = setup_mlflow(settings)
    new_videos = uncurated_videos(settings)
    print(f"{len(new_videos)} raw video(s) to curate: {', '.join(new_videos) or 'none (all cached)'}")

    warm = settings.retrain.from_champion if from_champion is None else from_champion
    init_from, run_params = "scratch: retrain.from_champion is false", params_path
    if warm:
        version = champion_version(client, settings)
        name, alias = settings.registry.model_name, settings.registry.champion_alias
        if version is None:
            init_from = f"scratch: no models:/{name}@{alias} yet"
        else:
            pipeline_dir = download_champion(settings, version)
            problems = warm_start_mismatches(settings, pipeline_dir)
            if problems:
                # A deliberate architecture change cannot continue old weights: retrain from scratch, say why.
                init_from = f"scratch: models:/{name}/{version} does not fit the settings ({'; '.join(problems)})"
            else:
                init_from = f"models:/{name}/{version}"
                run_params = warm_start_params(params_path, pipeline_dir, settings, f"{name}-v{version}")
    print(f"training starts from {init_from}")

    summary = pipeline_flow(run_params, version_data=version_data)
    client.set_tag(summary["mlflow_parent_run"], "retrain.init_from", init_from)
    client.set_tag(summary["mlflow_parent_run"], "retrain.new_videos", ",".join(new_videos) or "none")
    if summary["registered_model"]:  # models:/NAME/VERSION
        tag_version(client, summary["registered_model"], {WARM_START_TAG: init_from})
    return {**summary, "init_from": init_from, "new_videos": new_videos}
