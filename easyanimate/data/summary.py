"""What a curation run reports: metrics, reject reasons, score histograms and the clip table.

The score columns come from the configured filters (``Column.histogram``), so a new filter's scores are
summarised without touching this module.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from easyanimate.data.manifest import uncaptioned_mask, uncaptioned_message
from easyanimate.utils import atomic_write_text

HISTOGRAM_BINS = 10  # equal-width bins between each score's observed min and max


def score_columns(filters) -> list[str]:
    """Summarised columns in filter run order."""
    return [col.name for f in filters for col in f.columns if col.histogram]


def skipped_filters(filters) -> list[dict]:
    """Configured filters that did not run, with the reason (e.g. no weights): the run summary lists them."""
    return [{"filter": f.name, "reason": f.skip_reason} for f in filters if f.skip_reason]


def summarise(df: pd.DataFrame, filters) -> dict:
    counts = Counter(df["status"])
    reasons = Counter(df.loc[df["status"] != "accepted", "reject_reason"].fillna("unknown"))
    metrics = {f"curate/{status}": float(n) for status, n in counts.items()}
    metrics.update({f"curate/reject.{reason}": float(n) for reason, n in reasons.items()})
    metrics["curate/clips_total"] = float(len(df))
    # Accepted clips no caption source covered: kept, but training refuses them until they are captioned.
    metrics["curate/uncaptioned"] = float(uncaptioned_mask(df).sum())
    accepted = df[df["status"] == "accepted"]
    for column in (*score_columns(filters), "duration_s"):
        if len(accepted) and column in accepted:
            metrics[f"curate/accepted_mean_{column}"] = float(accepted[column].mean())
    return metrics


def uncaptioned_table(df: pd.DataFrame) -> list[dict]:
    """The accepted clips that have no caption (source, span, clip file), in manifest order."""
    rows = df[uncaptioned_mask(df)]
    view = rows[["source", "start_s", "end_s", "clip_path"]].astype(object)
    return view.where(view.notna(), None).to_dict("records")


def caption_note(df: pd.DataFrame) -> str | None:
    """How many accepted clips are uncaptioned and how to caption them (None when every one has a caption)."""
    missing = int(uncaptioned_mask(df).sum())
    if not missing:
        return None
    return uncaptioned_message(missing, int((df["status"] == "accepted").sum()))


def reject_reason_table(df: pd.DataFrame) -> list[dict]:
    rows = df[df["status"] != "accepted"]
    counts = Counter(zip(rows["status"], rows["reject_reason"].fillna("unknown")))
    return [{"status": s, "reject_reason": r, "clips": n} for (s, r), n in sorted(counts.items())]


def score_histograms(df: pd.DataFrame, filters) -> list[dict]:
    """Counts per bin of every computed score (all scored clips, accepted or not), one row per bin."""
    rows = []
    for column in score_columns(filters):
        if column not in df:
            continue
        values = df[column].dropna().to_numpy(dtype=float)
        if not len(values):
            continue
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        rows += [
            {"score": column, "bin_low": round(float(lo), 6), "bin_high": round(float(hi), 6), "clips": int(n)}
            for lo, hi, n in zip(edges[:-1], edges[1:], counts)
        ]
    return rows


def manifest_table(df: pd.DataFrame, filters) -> list[dict]:
    """Every clip with its scores and reason (JSON-able: NA becomes None)."""
    cols = ["source", "start_s", "end_s", "status", "reject_reason", "caption_status", *score_columns(filters)]
    view = df[[c for c in cols if c in df]].round(4).astype(object)
    return view.where(view.notna(), None).to_dict("records")


def write_summary(
    summary_dir: Path,
    reasons: list[dict],
    hist: list[dict],
    skipped: list[dict] | None = None,
    uncaptioned: list[dict] | None = None,
    note: str | None = None,
) -> Path:
    """``reject_reasons.csv``, ``score_histograms.csv``, ``skipped_filters.csv``, ``uncaptioned.csv`` and
    ``next_steps.txt`` (what to do about uncaptioned clips; empty when there are none). Deterministic: they
    live beside the manifest; each is written atomically."""
    summary_dir = Path(summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "reject_reasons.csv": pd.DataFrame(reasons, columns=["status", "reject_reason", "clips"]),
        "score_histograms.csv": pd.DataFrame(hist, columns=["score", "bin_low", "bin_high", "clips"]),
        "skipped_filters.csv": pd.DataFrame(skipped or [], columns=["filter", "reason"]),
        "uncaptioned.csv": pd.DataFrame(uncaptioned or [], columns=["source", "start_s", "end_s", "clip_path"]),
    }
    for name, table in tables.items():
        atomic_write_text(summary_dir / name, table.to_csv(index=False))
    atomic_write_text(summary_dir / "next_steps.txt", (note + "\n") if note else "")
    return summary_dir
