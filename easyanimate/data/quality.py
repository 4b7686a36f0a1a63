"""Quality gate on the curated manifest: a great_expectations 1.x suite over the ACCEPTED rows.

The gate re-checks, independently of the curator's code path, that every accepted clip satisfies the
configured thresholds and that its file exists and decodes. Captions are not a quality verdict: an accepted clip
is either captioned (non-empty caption) or marked uncaptioned (no caption at all); both pass, the gate checks the
two agree. Uncaptioned clips are listed in ``gate.json``'s ``notes`` with what to do, and training refuses them
(``manifest.require_captions``), so curating one's own footage succeeds and says how to caption it. The suite is the core checks below plus
each configured filter's own ``expectations()``. A failing gate names each failed expectation with the
offending clip ids. ``gate.json`` (pass/fail and failures only, deterministic) is written beside the
manifest; the GX Data Docs report, timestamped on every run, goes to ``report_dir`` (the stage's
reports folder), never into the curated data, whose content hash would otherwise change on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from easyanimate.config import Settings
from easyanimate.data import manifest as mf
from easyanimate.data.video_io import VideoError, probe
from easyanimate.stage_api import StageFailed
from easyanimate.utils import atomic_write_text

_DURATION_TOL_S = 0.05  # planned spans are rounded to ms; allow rounding noise, not real violations


class QualityGateFailed(StageFailed):
    """The curated clips failed the data-quality suite; no training may start."""


@dataclass
class GateResult:
    success: bool
    failures: list[str] = field(default_factory=list)
    report_dir: Path | None = None  # the Data Docs site, when one was written
    notes: list[str] = field(default_factory=list)  # not failures: what to do next (e.g. uncaptioned clips)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["report_dir"] = str(self.report_dir) if self.report_dir else None
        return d


def _file_ok(out_dir: Path, rel) -> bool:
    if rel is None or pd.isna(rel):
        return False
    path = out_dir / str(rel)
    try:
        probe(path)  # also decodes the first frames
        return True
    except VideoError:
        return False


def _expectations(settings: Settings, filters) -> list:
    import great_expectations as gx

    c = settings.curate
    E = gx.expectations
    exps = [
        E.ExpectColumnValuesToBeUnique(column="clip_id"),
        E.ExpectColumnValuesToBeBetween(
            column="duration_s",
            min_value=c.scenes.min_duration_s - _DURATION_TOL_S,
            max_value=c.scenes.max_duration_s + _DURATION_TOL_S,
        ),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=c.probe.min_width),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=c.probe.min_height),
        E.ExpectColumnValuesToBeBetween(column="pixels", min_value=c.probe.min_pixels, max_value=c.probe.max_pixels),
        E.ExpectColumnValuesToBeBetween(column="fps", min_value=c.probe.min_fps, max_value=c.probe.max_fps),
    ]
    for f in filters:
        if f.enabled:
            exps += f.expectations()
    return exps + [
        E.ExpectColumnValuesToBeInSet(column="caption_status", value_set=[mf.CAPTIONED, mf.UNCAPTIONED]),
        E.ExpectColumnValuesToBeInSet(column="caption_consistent", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
        E.ExpectColumnValuesToBeInSet(column="file_ok", value_set=[True]),
    ]


def _describe(er) -> str | None:
    if er.success:
        return None
    cfg = er.expectation_config
    col = cfg.kwargs.get("column")
    ids = sorted({str(row.get("clip_id")) for row in (er.result or {}).get("unexpected_index_list") or []})
    bounds = {k: v for k, v in cfg.kwargs.items() if k in ("min_value", "max_value", "value_set")}
    return f"{cfg.type}({col}{', ' + str(bounds) if bounds else ''}) failed for clip_id {ids}"


def _plain(acc: pd.DataFrame) -> pd.DataFrame:
    """Plain numpy/object columns: GX's pandas backend mishandles nullable extension dtypes."""
    for col in acc.columns:
        dtype = str(acc[col].dtype)
        if dtype in ("string", "str") or dtype.startswith("string["):
            acc[col] = acc[col].astype(object).where(acc[col].notna(), None)
        elif dtype in ("Int64", "Int32", "Float64"):
            acc[col] = acc[col].astype("float64")
    return acc


def run_quality_gate(
    df: pd.DataFrame,
    settings: Settings,
    out_dir: str | Path,
    clips_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    filters=None,
) -> GateResult:
    """Validate accepted rows; ``clip_path`` is resolved under ``clips_dir`` (default: ``out_dir``).

    ``out_dir/gate.json`` always; the Data Docs site only when ``report_dir`` is given (replaced whole).
    ``filters`` defaults to the instances ``curate.filters`` names.
    """
    out_dir = Path(out_dir)
    clips_root = Path(clips_dir) if clips_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if filters is None:
        from easyanimate.data.filters import build_filters

        filters = build_filters(settings)
    acc = df[df["status"] == "accepted"].copy()
    if acc.empty:
        rejected = df["reject_reason"].fillna("unknown").value_counts()
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items()))
        message = "no accepted clips: the curated dataset is empty" + (
            f" ({len(df)} clips: {why}; see summary/reject_reasons.csv)" if len(df) else " (no input videos)"
        )
        result = GateResult(False, [message], None)
        if report_dir is not None:  # no suite ran: a previous run's report would describe other data
            shutil.rmtree(report_dir, ignore_errors=True)
        _write_json(result, out_dir)
        return result
    # GX validates columns, so compute derived checks first.
    acc["pixels"] = acc["width"].astype("float64") * acc["height"].astype("float64")
    acc["file_ok"] = [_file_ok(clips_root, p) for p in acc["clip_path"]]
    if "caption_status" not in acc:  # a manifest from before the column: a caption means captioned
        acc["caption_status"] = [mf.CAPTIONED if pd.notna(c) else mf.UNCAPTIONED for c in acc["caption"]]
    text = acc["caption"].astype("string").str.strip()
    has_caption = (text.notna() & (text != "")).fillna(False)
    acc["caption_consistent"] = ((acc["caption_status"] == mf.CAPTIONED) & has_caption) | (
        (acc["caption_status"] == mf.UNCAPTIONED) & acc["caption"].isna()
    )
    acc["caption_consistent"] = acc["caption_consistent"].fillna(False).astype(bool)
    notes = [note] if (note := _caption_note(df)) else []
    acc = _plain(acc).reset_index(drop=True)

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # offline machines; never phone home
    import great_expectations as gx

    with tempfile.TemporaryDirectory(prefix="gx-") as root:
        ctx = gx.get_context(mode="file", project_root_dir=root)
        try:
            ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        except Exception:  # cosmetic only
            pass
        batch_def = (
            ctx.data_sources.add_pandas("manifest")
            .add_dataframe_asset("accepted")
            .add_batch_definition_whole_dataframe("all")
        )
        suite = ctx.suites.add(gx.ExpectationSuite(name="curated_clips"))
        for exp in _expectations(settings, filters):
            suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="accepted_clips", data=batch_def, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if report_dir is not None else []
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name="curation_gate",
                validation_definitions=[vd],
                actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["clip_id"]},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": acc})
        failures = [d for vr in run.run_results.values() for er in vr.results if (d := _describe(er))]
        site = Path(root) / "gx" / "uncommitted" / "data_docs" / "local_site"
        written = None
        if report_dir is not None:
            report_dir = Path(report_dir)
            shutil.rmtree(report_dir, ignore_errors=True)
            if site.exists():
                report_dir.parent.mkdir(parents=True, exist_ok=True)
                tmp = report_dir.with_name(f".{report_dir.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(site, tmp)
                tmp.rename(report_dir)
                written = report_dir
    result = GateResult(bool(run.success) and not failures, failures, written, notes)
    _write_json(result, out_dir)
    return result


def _caption_note(df: pd.DataFrame) -> str | None:
    missing = int(mf.uncaptioned_mask(df).sum())
    if not missing:
        return None
    return "not trainable yet: " + mf.uncaptioned_message(missing, int((df["status"] == "accepted").sum()))


def _write_json(result: GateResult, out_dir: Path) -> None:
    # Only what the data decides: no paths, no timestamps, so an unchanged dataset keeps its content hash.
    data = {"success": result.success, "failures": result.failures}
    if result.notes:  # only when there are some: a captioned dataset's gate.json stays as it was
        data["notes"] = result.notes
    atomic_write_text(out_dir / "gate.json", json.dumps(data, indent=1))
