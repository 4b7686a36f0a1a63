"""Curation flow: per-video scene split + filters mapped concurrently, then manifest and quality gate."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlflow
from prefect import flow, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from easyanimate.config import CurateConfig, Settings
from flows.common import _retry_on_io, settings_from, stage_run, stage_summary_artifact


class QualityGateFailed(RuntimeError):
    """The curated clips failed the data-quality suite; no training may start."""


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


def list_videos(input_dir: Path, extensions: tuple[str, ...]) -> list[Path]:
    if not input_dir.is_dir():
        raise FileNotFoundError(f"raw video folder not found: {input_dir} (paths.raw_videos)")
    return sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions)


@task(name="curate-video", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_on_io,
      task_run_name="curate-{video.name}")
def curate_video_task(video: Path, settings: Settings) -> list[dict]:
    from easyanimate.data.curate import curate_video

    # Resumable in the library: a finished video's records are reused, so reruns do no work.
    return curate_video(video, settings, settings.paths.curated)


@flow(name="curate-videos")
def curate_videos_flow(videos: list[Path], settings: Settings) -> list[dict]:
    futures = curate_video_task.map(videos, settings=unmapped(settings))
    return [record for future in futures for record in future.result()]


def summarise(df) -> dict:
    counts = Counter(df["status"])
    reasons = Counter(df.loc[df["status"] != "accepted", "reject_reason"].fillna("unknown"))
    metrics = {f"curate/{status}": float(n) for status, n in counts.items()}
    metrics.update({f"curate/reject.{reason}": float(n) for reason, n in reasons.items()})
    metrics["curate/clips_total"] = float(len(df))
    accepted = df[df["status"] == "accepted"]
    for column in ("aesthetic", "motion", "text_area", "duration_s"):
        if len(accepted) and column in accepted:
            metrics[f"curate/accepted_mean_{column}"] = float(accepted[column].mean())
    return metrics


SCORE_COLUMNS = ("aesthetic", "motion", "text_area")
HISTOGRAM_BINS = 10  # equal-width bins between each score's observed min and max


def reject_reason_table(df) -> list[dict]:
    rows = df[df["status"] != "accepted"]
    counts = Counter(zip(rows["status"], rows["reject_reason"].fillna("unknown")))
    return [{"status": s, "reject_reason": r, "clips": n} for (s, r), n in sorted(counts.items())]


def score_histograms(df) -> list[dict]:
    """Counts per bin of every computed score (all scored clips, accepted or not), one row per bin."""
    import numpy as np

    rows = []
    for column in SCORE_COLUMNS:
        values = df[column].dropna().to_numpy(dtype=float)
        if not len(values):
            continue
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        rows += [{"score": column, "bin_low": round(float(lo), 6), "bin_high": round(float(hi), 6), "clips": int(n)}
                 for lo, hi, n in zip(edges[:-1], edges[1:], counts)]
    return rows


def log_summary(df, out_dir: Path) -> None:
    """Reject reasons and score histograms: Prefect table artifacts, MLflow CSV artifacts + metrics."""
    import pandas as pd

    reasons, hist = reject_reason_table(df), score_histograms(df)
    create_table_artifact(key="curate-reject-reasons", table=reasons or [{"status": "-", "reject_reason": "-", "clips": 0}],
                          description="clips per reject/quarantine reason")
    if hist:
        create_table_artifact(key="curate-score-histograms", table=hist,
                              description=f"{HISTOGRAM_BINS}-bin histograms of aesthetic, motion and text_area")
    summary_dir = out_dir / "summary"
    summary_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(reasons, columns=["status", "reject_reason", "clips"]).to_csv(summary_dir / "reject_reasons.csv", index=False)
    pd.DataFrame(hist, columns=["score", "bin_low", "bin_high", "clips"]).to_csv(summary_dir / "score_histograms.csv", index=False)
    mlflow.log_artifacts(str(summary_dir), artifact_path="curate/summary")
    for column in SCORE_COLUMNS:
        # The histogram as an MLflow metric series: step = bin index, value = clips in the bin.
        for step, row in enumerate(r for r in hist if r["score"] == column):
            mlflow.log_metric(f"curate.hist.{column}", row["clips"], step=step)


def publish_gate_report(gate, run) -> None:
    """The Data Docs HTML as a Prefect artifact too: a link to the file and the MLflow copy."""
    index = Path(gate.report_dir) / "index.html" if gate.report_dir else None
    if index is None or not index.exists():
        return
    create_link_artifact(key="curate-gate-report", link=index.resolve().as_uri(),
                         link_text="great_expectations Data Docs", description="curation quality gate report")
    status = "passed" if gate.success else "FAILED"
    create_markdown_artifact(
        key="curate-gate-report-summary",
        markdown=(f"## Curation quality gate {status}\n\nData Docs: `{index.resolve()}`\n\n"
                  f"MLflow run `{run.info.run_id}`, artifact `curate/gate_report/index.html`\n\n"
                  + "\n".join(f"- {f}" for f in gate.failures)),
        description="where the Data Docs report lives",
    )


@flow(name="curate", log_prints=True)
def curate_flow(params_path: str | None = None, input_dir: str | None = None, output_dir: str | None = None,
                preset: str | None = None, parent_run_id: str | None = None) -> dict:
    from easyanimate.data.manifest import write_manifest
    from easyanimate.data.curate import build_manifest
    from easyanimate.data.quality import run_quality_gate
    from easyanimate.stages import write_reports

    settings = settings_from(params_path, preset)
    paths = {}
    if input_dir:
        paths["raw_videos"] = Path(input_dir)
    if output_dir:
        paths["curated"] = Path(output_dir)
    if paths:
        settings = settings.model_copy(update={"paths": settings.paths.model_copy(update=paths)})
    out_dir = settings.paths.curated
    videos = list_videos(settings.paths.raw_videos, settings.curate.video_extensions)

    with stage_run(settings, "curate", parent_run_id, videos=str(len(videos))) as run:
        records = curate_videos_flow.with_options(task_runner=make_task_runner(settings.curate))(videos, settings)
        df = build_manifest(records, settings)
        write_manifest(df, out_dir / "manifest.parquet")
        metrics = summarise(df)
        gate = run_quality_gate(df, settings, out_dir)
        metrics["curate/gate_passed"] = float(gate.success)
        mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()})
        mlflow.log_artifact(str(out_dir / "manifest.parquet"), artifact_path="curate")
        if (out_dir / "gate.json").exists():
            mlflow.log_artifact(str(out_dir / "gate.json"), artifact_path="curate")
        if gate.report_dir and Path(gate.report_dir).exists():
            mlflow.log_artifacts(str(gate.report_dir), artifact_path="curate/gate_report")
        log_summary(df, out_dir)
        publish_gate_report(gate, run)
        if output_dir is None:
            write_reports(settings, "curate", metrics)

        table = (df[["source", "start_s", "end_s", "status", "reject_reason", "aesthetic", "motion", "text_area"]]
                 .round(4).astype(object).where(df.notna(), None).to_dict("records"))
        create_table_artifact(key="curate-manifest", table=table, description="every clip with its scores and reason")
        stage_summary_artifact("curate", metrics)
        if not gate.success:
            report = "\n".join(f"- {f}" for f in gate.failures)
            create_markdown_artifact(key="curate-gate", markdown=f"## Quality gate FAILED\n\n{report}")
            raise QualityGateFailed("curated data failed the quality gate:\n" + report)
        return {"stage": "curate", "run_id": run.info.run_id, "metrics": metrics,
                "manifest": str(out_dir / "manifest.parquet"), "accepted": int((df["status"] == "accepted").sum())}
