"""Evaluation flow: assemble the candidate pipeline, score it on held-out clips, decide its gate."""

from __future__ import annotations

import json

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import log_stage_result, settings_from, stage_run, versioned_stage_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str | None = None, parent_run_id: str | None = None,
                  upstream_run_id: str | None = None) -> dict:
    from easyanimate.evaluation.report import evaluation_markdown
    from easyanimate.lineage import dvc_hash
    from easyanimate.stages import report_dir, run_evaluate_stage

    settings = settings_from(params_path)

    def body() -> dict:
        tags = {"upstream_run_id": upstream_run_id or "", "curated_data_dvc_hash": dvc_hash(settings.paths.curated)}
        with stage_run(settings, "evaluate", parent_run_id, **tags) as run:
            result = run_evaluate_stage(settings)
            log_stage_result(result)
            context_file = report_dir(settings, "evaluate") / "eval_context.json"
            context = json.loads(context_file.read_text()) if context_file.exists() else {}
            mlflow.set_tags({"eval_passed": str(result.info["passed"]),
                             "eval_reasons": "; ".join(result.info["reasons"]) or "all gates passed",
                             "eval_protocol_hash": context.get("protocol_hash", ""),
                             "eval_num_val_clips": str(len(context.get("val_clip_ids", []))),
                             **{f"skipped.{k}": v for k, v in result.info["skipped"].items()}})
            return {"stage": "evaluate", "run_id": run.info.run_id, "metrics": result.metrics,
                    "passed": result.info["passed"], "reasons": result.info["reasons"],
                    "skipped": result.info["skipped"], "samples": [str(p) for p in result.artifacts
                                                                    if "samples" in str(p)]}

    out = versioned_stage_task("evaluate", settings, body)()
    markdown = evaluation_markdown(out["metrics"], out["passed"], out["reasons"], out["skipped"], out["samples"])
    samples_uri = f"runs:/{out['run_id']}/evaluate"
    create_markdown_artifact(key="evaluation", markdown=f"{markdown}\nMLflow artifacts: `{samples_uri}`",
                             description="held-out metrics, gate and samples")
    return out
