"""The parent flow: curate → VAE 1, 2 → DiT 1, 2, 3 → LoRA → evaluate → register, then version data with DVC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from prefect import flow

from easyanimate.stages import STAGE_NAMES, stage_version
from flows.common import flat_params, settings_from, setup_mlflow
from flows.curate import curate_flow
from flows.evaluate import evaluate_flow
from flows.lora import lora_flow
from flows.register import register_flow
from flows.train_dit import train_dit_flow
from flows.train_vae import train_vae_flow


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
    setup_mlflow(settings)
    results: dict[str, dict] = {}
    with mlflow.start_run(run_name="pipeline", tags={"preset": settings.preset}) as parent:
        mlflow.log_params(flat_params(settings, ("curate", "vae", "dit", "lora", "generate", "evaluate")))
        if Path(params_path or "params.yaml").exists():
            mlflow.log_artifact(str(params_path or "params.yaml"), artifact_path="config")
        mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
        pid = parent.info.run_id

        def version(name: str) -> str:
            return stage_version(name, settings)

        results["curate"] = curate_flow.with_options(version=version("curate"))(params_path, parent_run_id=pid)
        upstream = results["curate"]["run_id"]
        for stage in (1, 2):
            name = f"vae_stage{stage}"
            results[name] = train_vae_flow.with_options(version=version(name))(stage, params_path, pid, upstream)
            upstream = results[name]["run_id"]
        for stage in (1, 2, 3):
            name = f"dit_stage{stage}"
            results[name] = train_dit_flow.with_options(version=version(name))(stage, params_path, pid, upstream)
            upstream = results[name]["run_id"]
        results["lora"] = lora_flow.with_options(version=version("lora"))(params_path, pid, upstream)
        results["evaluate"] = evaluate_flow.with_options(version=version("evaluate"))(
            params_path, pid, results["dit_stage3"]["run_id"])
        results["register"] = register_flow(params_path, pid, results["evaluate"]["run_id"])
        if version_data:
            results["dvc"] = {"status": dvc_version_outputs(push=True)}
            mlflow.set_tag("dvc", results["dvc"]["status"])
        samples = [s for s in results["evaluate"].get("samples", []) if s.endswith(".mp4")]
        mlflow.set_tags({"registered_model": results["register"]["uri"], "stages": ",".join(STAGE_NAMES)})
    summary = {
        "generated_video": os.path.abspath(samples[0]) if samples else None,
        "registered_model": results["register"]["uri"],
        "alias": results["register"]["alias"],
        "mlflow_parent_run": pid,
        "results": results,
    }
    print(f"generated video: {summary['generated_video']}")
    print(f"registered model: {summary['registered_model']} alias={summary['alias']}")
    return summary
