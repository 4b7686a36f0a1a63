"""Register the evaluated pipeline in the MLflow registry; give it the champion alias if it passed."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow

from easyanimate.utils import atomic_write_json
from flows.common import settings_from, setup_mlflow, stage_run, stage_summary_artifact


@flow(name="register", log_prints=True)
def register_flow(params_path: str | None = None, parent_run_id: str | None = None,
                  upstream_run_id: str | None = None) -> dict:
    from easyanimate.lineage import dvc_hash, git_commit, params_hash
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc
    from easyanimate.stages import report_dir

    settings = settings_from(params_path)
    gate = json.loads((report_dir(settings, "evaluate") / "gate.json").read_text())
    metrics = json.loads((report_dir(settings, "evaluate") / "metrics.json").read_text())
    client = setup_mlflow(settings)
    name = settings.registry.model_name
    lineage = {
        "git_commit": git_commit(),
        "curated_data_dvc_hash": dvc_hash(settings.paths.curated),
        "params_hash": params_hash(settings),
        "pipeline_dvc_hash": dvc_hash(settings.paths.pipeline),
        "lora_dvc_hash": dvc_hash(settings.paths.lora) if settings.paths.lora.exists() else "none",
        "evaluate_run_id": upstream_run_id or "",
    }
    with stage_run(settings, "register", parent_run_id) as run:
        artifacts = {"pipeline": str(settings.paths.pipeline)}
        if settings.paths.lora.exists():
            artifacts["lora"] = str(settings.paths.lora)
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=EasyAnimatePyfunc(),
            artifacts=artifacts,
            registered_model_name=name,
            pip_requirements=["easyanimate"],
        )
        version = str(info.registered_model_version)
        for key, value in {**lineage, "eval_passed": str(gate["passed"]),
                           "eval_reasons": "; ".join(gate["reasons"]) or "all gates passed",
                           **{k.replace("/", "."): f"{v:.6g}" for k, v in metrics.items()}}.items():
            client.set_model_version_tag(name, version, key, value)
        promoted = bool(gate["passed"])
        if promoted:
            client.set_registered_model_alias(name, settings.registry.champion_alias, version)
        client.set_model_version_tag(name, version, "promotion",
                                     settings.registry.champion_alias if promoted else "not promoted: evaluation failed")
        mlflow.log_metric("register.version", float(version))
        result = {"model": name, "version": version, "alias": settings.registry.champion_alias if promoted else None,
                  "uri": f"models:/{name}/{version}", "run_id": run.info.run_id, **lineage}
        out = report_dir(settings, "register")
        atomic_write_json(out / "registered.json", result)
        atomic_write_json(out / "metrics.json", {"register/version": float(version), "register/promoted": float(promoted)})
    stage_summary_artifact("register", {"version": float(version), "promoted": float(promoted)})
    print(f"registered {name} version {version}" + (f" as @{result['alias']}" if promoted else " (not promoted)"))
    return result
