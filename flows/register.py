"""Register the evaluated pipeline as a new model version (alias ``challenger``), with its evaluation
metrics and full lineage, then run gated promotion: it becomes ``champion`` only if it earns it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from easyanimate.config import Settings
from easyanimate.utils import atomic_write_json, atomic_write_text
from flows.common import settings_from, setup_mlflow, stage_run, stage_summary_artifact

MODEL_STAGES = ("vae_stage1", "vae_stage2", "dit_stage1", "dit_stage2", "dit_stage3", "lora")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def lineage_tags(settings: Settings, client: MlflowClient, run, upstream_run_id: str | None) -> dict[str, str]:
    """What the version came from: data, code, params, parent checkpoints and the runs that made them."""
    from easyanimate.lineage import RUN_TAG, checkpoint_tags, dvc_hash, git_commit, params_hash, resolve_stage_runs
    from easyanimate.stages import STAGE_NAMES, get_stage, stage_version

    parent_run_id = run.data.tags.get("mlflow.parentRunId")
    upstream = STAGE_NAMES[: STAGE_NAMES.index("register")]
    runs = resolve_stage_runs(client, run.info.experiment_id, {s: stage_version(s, settings) for s in upstream},
                              evaluate_run_id=upstream_run_id, parent_run_id=parent_run_id)
    # A stage run's parent_checkpoint tag is its actual init folder; otherwise its model inputs are its parents.
    parents = {}
    for stage in MODEL_STAGES:
        tagged = client.get_run(runs[stage][0]).data.tags.get("parent_checkpoint") if stage in runs else None
        model_deps = [d for d in get_stage(stage).deps if d in MODEL_STAGES]
        parents[stage] = tagged or ",".join(str(getattr(settings.paths, d)) for d in model_deps)
    tags = {
        "git_commit": git_commit(),
        "curated_data_dvc_hash": dvc_hash(settings.paths.curated),
        "params_hash": params_hash(settings),
        "pipeline_dvc_hash": dvc_hash(settings.paths.pipeline),
        "lora_dvc_hash": dvc_hash(settings.paths.lora) if settings.paths.lora.exists() else "none",
        "evaluate_run_id": upstream_run_id or (runs["evaluate"][0] if "evaluate" in runs else ""),
        "pipeline_run_id": parent_run_id or "",
        "register_run_id": run.info.run_id,
        **checkpoint_tags({s: getattr(settings.paths, s) for s in MODEL_STAGES}, parents),
        **{RUN_TAG.format(stage=s): run_id for s, (run_id, _) in runs.items()},
        "lineage.runs_found_by": json.dumps({s: how for s, (_, how) in runs.items()}, sort_keys=True)[:5000],
    }
    return tags


def register_pipeline(settings: Settings, client: MlflowClient, parent_run_id: str | None = None,
                      upstream_run_id: str | None = None, params_path: str | None = None) -> dict:
    """Log ``paths.pipeline`` (and the LoRA, if any) as a pyfunc model version inside the register
    stage's run: evaluation metrics on that run, gates, hashes and lineage as version tags."""
    from easyanimate.lineage import PARAMS_ARTIFACT
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc
    from easyanimate.stages import report_dir

    evaluation = report_dir(settings, "evaluate")
    gate = _read_json(evaluation / "gate.json")
    metrics = _read_json(evaluation / "metrics.json")
    context = _read_json(evaluation / "eval_context.json") or {}
    if gate is None or metrics is None:
        raise FileNotFoundError(f"{evaluation}/gate.json and metrics.json are missing: run the evaluate stage first")
    data_gate = _read_json(settings.paths.curated / "gate.json")
    name = settings.registry.model_name
    with stage_run(settings, "register", parent_run_id) as active:
        run = client.get_run(active.info.run_id)
        params_file = Path(params_path or "params.yaml")
        if params_file.exists():
            mlflow.log_artifact(str(params_file), artifact_path=str(Path(PARAMS_ARTIFACT).parent))
        mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
        for extra in ("report.md", "val_loss.csv", "eval_context.json"):
            if (evaluation / extra).exists():
                mlflow.log_artifact(str(evaluation / extra), artifact_path="evaluation")
        artifacts = {"pipeline": str(settings.paths.pipeline)}
        if settings.paths.lora.exists():
            artifacts["lora"] = str(settings.paths.lora)
        info = mlflow.pyfunc.log_model(name="pipeline", python_model=EasyAnimatePyfunc(), artifacts=artifacts,
                                       registered_model_name=name, pip_requirements=["easyanimate"])
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
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value)[:5000])
        mlflow.set_tags({"registered_model": f"models:/{name}/{version}"})
        mlflow.log_metric("register.version", float(version))
    return {"model": name, "version": version, "uri": f"models:/{name}/{version}", "run_id": run.info.run_id,
            **{k: tags[k] for k in ("git_commit", "curated_data_dvc_hash", "params_hash", "pipeline_dvc_hash",
                                    "lora_dvc_hash", "evaluate_run_id", "eval_passed", "data_gate_passed")}}


@flow(name="register", log_prints=True)
def register_flow(params_path: str | None = None, parent_run_id: str | None = None,
                  upstream_run_id: str | None = None) -> dict:
    from easyanimate.stages import report_dir
    from flows.lora import register_lora_adapter
    from flows.promote import promote_version

    settings = settings_from(params_path)
    client = setup_mlflow(settings)
    result = register_pipeline(settings, client, parent_run_id, upstream_run_id, params_path)
    samples = sorted(str(p.resolve()) for p in (report_dir(settings, "evaluate") / "samples").glob("*.gif"))
    promotion = promote_version(settings, result["version"], client=client, samples=samples)
    promoted = promotion["promoted"]
    reg = settings.registry
    result.update(alias=reg.champion_alias if promoted else reg.challenger_alias, promoted=promoted,
                  promotion_reason=promotion["reason"], champion_version=promotion["champion_after"])
    result["lora_model"] = register_lora_adapter(settings, result["model"], result["version"], parent_run_id)
    out = report_dir(settings, "register")
    atomic_write_text(out / "promotion.md", promotion["markdown"])
    atomic_write_json(out / "registered.json", result)
    atomic_write_json(out / "metrics.json", {"register/version": float(result["version"]),
                                             "register/promoted": float(promoted)})
    create_markdown_artifact(key="promotion", markdown=promotion["markdown"],
                             description=f"{result['uri']}: challenger vs champion")
    stage_summary_artifact("register", {"version": float(result["version"]), "promoted": float(promoted)})
    print(f"registered {result['model']} version {result['version']} as @{result['alias']}: {promotion['reason']}")
    return result
