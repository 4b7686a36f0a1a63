"""Quality gate on the curated manifest: a great_expectations 1.x suite over the ACCEPTED rows.

The gate re-checks, independently of the curator's code path, that every accepted clip satisfies the
configured thresholds and that its file exists and decodes. A failing gate names each failed
expectation with the offending clip ids; the report lands in ``out_dir/gate_report/`` (GX Data Docs)
and ``out_dir/gate.json``.
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
from easyanimate.data.video_io import VideoError, probe

_DURATION_TOL_S = 0.05  # planned spans are rounded to ms; allow rounding noise, not real violations


@dataclass
class GateResult:
    success: bool
    failures: list[str] = field(default_factory=list)
    report_dir: Path | None = None

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


def _expectations(settings: Settings) -> list:
    import great_expectations as gx

    c = settings.curate
    E = gx.expectations
    exps = [
        E.ExpectColumnValuesToBeUnique(column="clip_id"),
        E.ExpectColumnValuesToBeBetween(
            column="duration_s", min_value=c.scenes.min_duration_s - _DURATION_TOL_S,
            max_value=c.scenes.max_duration_s + _DURATION_TOL_S,
        ),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=c.probe.min_width),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=c.probe.min_height),
        E.ExpectColumnValuesToBeBetween(column="pixels", min_value=c.probe.min_pixels, max_value=c.probe.max_pixels),
        E.ExpectColumnValuesToBeBetween(column="fps", min_value=c.probe.min_fps, max_value=c.probe.max_fps),
        E.ExpectColumnValuesToNotBeNull(column="aesthetic"),
        E.ExpectColumnValuesToBeBetween(column="aesthetic", min_value=c.aesthetic.threshold),
        E.ExpectColumnValuesToNotBeNull(column="motion"),
        E.ExpectColumnValuesToBeBetween(column="motion", min_value=c.motion.low, max_value=c.motion.high),
        E.ExpectColumnValuesToNotBeNull(column="caption"),
        E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
        E.ExpectColumnValuesToBeInSet(column="file_ok", value_set=[True]),
    ]
    if c.text.enabled:
        exps += [
            E.ExpectColumnValuesToNotBeNull(column="text_area"),
            E.ExpectColumnValuesToBeBetween(column="text_area", max_value=c.text.max_text_area),
        ]
    return exps


def _describe(er) -> str | None:
    if er.success:
        return None
    cfg = er.expectation_config
    col = cfg.kwargs.get("column")
    ids = sorted({str(row.get("clip_id")) for row in (er.result or {}).get("unexpected_index_list") or []})
    bounds = {k: v for k, v in cfg.kwargs.items() if k in ("min_value", "max_value", "value_set")}
    return f"{cfg.type}({col}{', ' + str(bounds) if bounds else ''}) failed for clip_id {ids}"


def run_quality_gate(
    df: pd.DataFrame, settings: Settings, out_dir: str | Path, clips_dir: str | Path | None = None
) -> GateResult:
    """Validate accepted rows; ``clip_path`` is resolved under ``clips_dir`` (default: ``out_dir``)."""
    out_dir = Path(out_dir)
    clips_root = Path(clips_dir) if clips_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = df[df["status"] == "accepted"].copy()
    if acc.empty:
        result = GateResult(False, ["no accepted clips: the curated dataset is empty"], None)
        _write_json(result, out_dir)
        return result
    # GX validates columns, so compute derived checks first; plain Python types keep GX's pandas
    # backend away from nullable extension dtypes.
    acc["pixels"] = acc["width"].astype("float64") * acc["height"].astype("float64")
    acc["file_ok"] = [_file_ok(clips_root, p) for p in acc["clip_path"]]
    for col in ("clip_id", "caption", "split"):
        acc[col] = acc[col].astype(object).where(acc[col].notna(), None)
    for col in ("width", "height"):
        acc[col] = acc[col].astype("float64")
    acc = acc.reset_index(drop=True)

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # offline machines; never phone home
    import great_expectations as gx

    report_dir = out_dir / "gate_report"
    with tempfile.TemporaryDirectory(prefix="gx-") as root:
        ctx = gx.get_context(mode="file", project_root_dir=root)
        try:
            ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        except Exception:  # cosmetic only
            pass
        batch_def = ctx.data_sources.add_pandas("manifest").add_dataframe_asset("accepted") \
            .add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name="curated_clips"))
        for exp in _expectations(settings):
            suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="accepted_clips", data=batch_def, suite=suite))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name="curation_gate", validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["clip_id"]},
        ))
        run = checkpoint.run(batch_parameters={"dataframe": acc})
        failures = [d for vr in run.run_results.values() for er in vr.results if (d := _describe(er))]
        site = Path(root) / "gx" / "uncommitted" / "data_docs" / "local_site"
        if site.exists():
            tmp = out_dir / ".gate_report.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(site, tmp)
            shutil.rmtree(report_dir, ignore_errors=True)
            tmp.rename(report_dir)
        else:
            report_dir = None
    result = GateResult(bool(run.success) and not failures, failures, report_dir)
    _write_json(result, out_dir)
    return result


def _write_json(result: GateResult, out_dir: Path) -> None:
    path = out_dir / "gate.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1))
    os.replace(tmp, path)
