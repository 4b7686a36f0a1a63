"""The parent flow: every stage of ``easyanimate.stages.STAGES`` in order, then DVC versions the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from prefect import flow

from easyanimate.stages import family_role, stage_names_for, stages_for, upstream_stages
from easyanimate.tracking import flat_params, setup_mlflow, workspace_tags
from flows.common import settings_from, stage_task, workspace_session


def dvc_version_outputs(push: bool = True) -> str:
    """Record what this run produced in ``dvc.lock`` (so ``dvc repro`` is a no-op) and push it."""
    if not Path("dvc.yaml").exists() or not Path(".dvc").is_dir():
        return "skipped: not a DVC project"
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["commit", "--force", "--quiet"], check=True)
    if push:
        subprocess.run(dvc + ["push", "--quiet"], check=True)
    return "committed and pushed" if push else "committed"


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params_path: str | None = None, version_data: bool = True) -> dict:
    settings = settings_from(params_path)
    with workspace_session(settings, "easyanimate pipeline"):
        return _run_pipeline(settings, params_path, version_data)


def _run_pipeline(settings, params_path: str | None, version_data: bool) -> dict:
    setup_mlflow(settings)
    results: dict[str, dict] = {}
    with mlflow.start_run(run_name="pipeline", tags={"preset": settings.preset, **workspace_tags()}) as parent:
        mlflow.log_params(flat_params(settings, ("curate", "vae", "dit", "lora", "generate", "evaluate")))
        if Path(params_path or "params.yaml").exists():
            mlflow.log_artifact(str(params_path or "params.yaml"), artifact_path="config")
        mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
        pid = parent.info.run_id
        family = settings.model.family
        names = stage_names_for(family)
        for spec in stages_for(family):
            upstream = upstream_stages(spec.name)
            upstream_run = results[upstream[-1]]["run_id"] if upstream else None
            results[spec.name] = stage_task(spec.name, settings, params_path, pid, upstream_run)
        if version_data:
            results["dvc"] = {"status": dvc_version_outputs(push=True)}
            mlflow.set_tag("dvc", results["dvc"]["status"])
        last = results[names[-1]]
        samples = [s for s in results[family_role(family, "evaluate")].get("samples", []) if s.endswith(".mp4")]
        mlflow.set_tags({"registered_model": last.get("uri", ""), "stages": ",".join(names), "model.family": family})
    summary = {
        "generated_video": os.path.abspath(samples[0]) if samples else None,
        "registered_model": last.get("uri"),
        "alias": last.get("alias"),
        "mlflow_parent_run": pid,
        "results": results,
    }
    print(f"generated video: {summary['generated_video']}")
    print(f"registered model: {summary['registered_model']} alias={summary['alias']}")
    return summary
