"""Evaluation flow: assemble the candidate pipeline, score it on held-out clips, decide its gate."""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import log_stage_result, settings_from, stage_run, versioned_stage_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str | None = None, parent_run_id: str | None = None,
                  upstream_run_id: str | None = None) -> dict:
    from easyanimate.lineage import dvc_hash
    from easyanimate.stages import run_evaluate_stage

    settings = settings_from(params_path)

    def body() -> dict:
        tags = {"upstream_run_id": upstream_run_id or "", "curated_data_dvc_hash": dvc_hash(settings.paths.curated)}
        with stage_run(settings, "evaluate", parent_run_id, **tags) as run:
            result = run_evaluate_stage(settings)
            log_stage_result(result)
            mlflow.set_tags({"eval_passed": str(result.info["passed"]),
                             "eval_reasons": "; ".join(result.info["reasons"]) or "all gates passed",
                             **{f"skipped.{k}": v for k, v in result.info["skipped"].items()}})
            return {"stage": "evaluate", "run_id": run.info.run_id, "metrics": result.metrics,
                    "passed": result.info["passed"], "reasons": result.info["reasons"],
                    "skipped": result.info["skipped"], "samples": [str(p) for p in result.artifacts]}

    out = versioned_stage_task("evaluate", settings, body)()
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(out["metrics"].items()))
    skipped = "\n".join(f"- {k}: {v}" for k, v in out["skipped"].items())
    verdict = "PASSED" if out["passed"] else "FAILED: " + "; ".join(out["reasons"])
    create_markdown_artifact(
        key="evaluation",
        markdown=f"## Evaluation {verdict}\n\n| metric | value |\n|---|---|\n{rows}\n\n### Not computed\n{skipped}\n\n"
                 f"Samples: {', '.join(out['samples'])}",
    )
    return out
