"""Curation: per-video analysis (the unit the stage fans out), the curate stage entry, and a sequential loop.

Pipeline per video: hash + probe -> probe checks -> ONE decode pass that feeds the scene detector
and, as each clip plan becomes final, hands that clip the few small frames its filters need ->
the configured filters in order (``curate.filters``, cheapest first), stopping at the first rejection ->
captions for the survivors, batched across clips -> cut accepted clips.

Filters and the captioner are stage objects (``filters.base.ClipFilter``, ``captioners.base.Captioner``)
owned by a ``Curator``: one per worker process, whose models are set up once, on the first video that
needs them. Bad input never raises: it becomes one ``quarantined`` record with the ``VideoError.reason``.
Each finished video is stored as ``records/<source-hash>-<settings-hash>.json`` (atomic), so a rerun
skips unchanged videos and a kill loses at most the video in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from easyanimate.config import CurateConfig, Settings
from easyanimate.data import manifest as mf
from easyanimate.data.captioners import Captioner, CaptionRequest, build_captioner
from easyanimate.data.captioners.rewrite import CaptionRewriter
from easyanimate.data.dedup_index import INDEX_FILE, deduplicate
from easyanimate.data.filters import ClipFilter, build_filters, filter_columns
from easyanimate.data.filters.dedup import EMBEDDING_KEY
from easyanimate.data.quality import run_quality_gate
from easyanimate.data.scenes import ClipPlan, detect_scenes, plan_clips, scan_video  # noqa: F401
from easyanimate.data.summary import (
    HISTOGRAM_BINS,
    caption_note,
    manifest_table,
    reject_reason_table,
    score_columns,
    score_histograms,
    skipped_filters,
    summarise,
    uncaptioned_table,
    write_summary,
)
from easyanimate.data.video_io import VideoError, VideoInfo, cut_clip, decode_frames, probe
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.utils import atomic_write_text

log = logging.getLogger(__name__)
RECORD_VERSION = 3  # 2: scenes come from the single decode pass; 3: uncaptioned clips are kept, not rejected
_CAPTION_ONLY_SIDE = 512  # decode size when no filter is configured (the captioner still wants small frames)


def settings_hash(settings: Settings) -> str:
    """Key of the settings a video's records depend on (``curate`` and ``weights``).

    ``curate.device`` says where models run, not what they decide, so it is left out; ``curate.filters``
    counts only when it differs from the default order, so records written before it existed stay valid.
    """
    data = settings.model_dump(mode="json", include={"curate", "weights"})
    data["curate"].pop("device", None)
    if settings.curate.filters == CurateConfig.model_fields["filters"].default:
        data["curate"].pop("filters", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def record_path(out_dir: Path, source_hash: str, settings: Settings) -> Path:
    return Path(out_dir) / "records" / f"{source_hash[:16]}-{settings_hash(settings)}.json"


def resolve_device(name: str) -> str:
    """``curate.device`` -> a torch device; ``auto`` is cuda when torch sees a GPU."""
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise RuntimeError("curate.device is cuda but torch sees no GPU; set curate.device to auto or cpu")
    return "cpu"


def _base(
    source: str, source_hash: str, start: float, end: float, info: VideoInfo | None, score_columns: list[str]
) -> dict:
    return {
        "clip_id": mf.make_clip_id(source_hash, start, end),
        "source": source,
        "scene_id": mf.make_clip_id(source_hash, start, end),
        "start_s": float(start),
        "end_s": float(end),
        "duration_s": round(float(end - start), 3),
        "width": info.width if info else None,
        "height": info.height if info else None,
        "fps": info.fps if info else None,
        **{col: None for col in score_columns},
        "caption": None,
        "caption_status": None,
        "status": "accepted",
        "reject_reason": None,
        "duplicate_file_of": None,
        "clip_path": None,
        "split": None,
    }


def manifest_columns(settings: Settings) -> dict[str, str]:
    """Columns between the manifest's fixed head and tail: the configured filters' (registry order), then
    ``caption_raw`` when captions are rewritten (it sits just before ``caption``)."""
    cols = {c.name: c.dtype for c in filter_columns(settings.curate.filters)}
    if settings.curate.caption.rewrite.enabled:
        cols["caption_raw"] = "string"
    return cols


def _probe_check(info: VideoInfo, settings: Settings) -> str | None:
    p = settings.curate.probe
    pixels = info.width * info.height
    if info.width < p.min_width or info.height < p.min_height or pixels < p.min_pixels:
        return "low_resolution"
    if pixels > p.max_pixels:
        return "high_resolution"
    if not p.min_fps <= info.fps <= p.max_fps:
        return "bad_fps"
    return None


@dataclass
class ClipSamples:
    """The sample times of one clip per consumer (each enabled filter by name, and ``caption``), decoded
    together in the single pass and split back apart."""

    groups: dict[str, list[float]]

    def times(self) -> list[float]:
        return [t for times in self.groups.values() for t in times]

    def split(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        out, i = {}, 0
        for name, times in self.groups.items():
            out[name], i = frames[i : i + len(times)], i + len(times)
        return out


class _CaptionQueue:
    """Survivors wait here so the captioner sees full batches of frames across clips; flushing as
    soon as a batch fills keeps memory at one batch, not one video. A flush captions, rewrites the captions
    (``caption.rewrite``) and runs the filters that need a caption (``ClipFilter.needs_caption``), in order,
    on the captioned clips. A clip no caption source covers stays accepted with ``caption_status``
    uncaptioned (``manifest.how_to_caption`` says what to do)."""

    def __init__(
        self,
        captioner: Captioner,
        batch_size: int,
        rewriter: CaptionRewriter | None = None,
        filters: list[ClipFilter] | tuple = (),
    ):
        self.captioner, self.pending = captioner, []
        self.rewriter, self.filters = rewriter, list(filters)
        self.clips_per_flush = max(1, -(-batch_size // max(1, captioner.frames_per_clip)))

    def add(self, rec: dict, frames: np.ndarray, filter_frames: dict[str, np.ndarray] | None = None) -> None:
        req = CaptionRequest(rec["source"], rec["start_s"], rec["end_s"], frames)
        self.pending.append((rec, req, filter_frames or {}))
        if len(self.pending) >= self.clips_per_flush:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        captions = self.captioner.caption_clips([req for _, req, _ in self.pending])
        captions = [(caption or "").strip() for caption in captions]
        final = self.rewriter.rewrite(captions) if self.rewriter is not None else captions
        for (rec, _, _), raw, caption in zip(self.pending, captions, final):
            if self.rewriter is not None:
                rec["caption_raw"] = raw
            # No caption is not a verdict on the clip: it stays accepted, marked uncaptioned (training refuses it).
            rec["caption"] = (caption or "").strip() or None
            rec["caption_status"] = mf.CAPTIONED if rec["caption"] else mf.UNCAPTIONED
        for f in self.filters:
            # Filters that judge a clip by its caption judge captioned clips only.
            live = [
                (rec, frames)
                for rec, _, frames in self.pending
                if rec["status"] == "accepted" and rec["caption_status"] == mf.CAPTIONED
            ]
            if not live:
                break
            scores = f.score_captioned([frames[f.name] for _, frames in live], [rec["caption"] for rec, _ in live])
            for (rec, _), score in zip(live, scores):
                rec.update(f.record(score))
                if reason := f.accept(score):
                    rec["status"], rec["reject_reason"] = "rejected", reason
        self.pending = []


class Curator:
    """One worker's configured filters and captioner, reused for every video it curates.

    Models load once, in ``setup``, the first time a video needs analysing (a rerun served from records
    loads none). Threads may share a Curator: setup is locked here, model calls inside each filter.
    """

    def __init__(self, settings: Settings, captioner: Captioner | None = None):
        self.settings = settings
        self.filters = build_filters(settings)
        self.captioner = build_captioner(settings) if captioner is None else captioner
        self.rewriter = CaptionRewriter.from_settings(settings)
        # Manifest columns come from the configured filter names (registry order), enabled or not.
        self.score_columns = list(manifest_columns(settings))
        self._lock = threading.Lock()
        self._ready = False

    @property
    def active(self) -> list[ClipFilter]:
        return [f for f in self.filters if f.enabled]

    @property
    def caption_filters(self) -> list[ClipFilter]:
        """Enabled filters that score a clip with its caption (after captioning, batched across clips)."""
        return [f for f in self.active if f.needs_caption]

    def setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            needs_device = any(f.uses_device for f in self.active) or self.captioner.uses_device
            needs_device = needs_device or self.rewriter is not None
            device = resolve_device(self.settings.curate.device) if needs_device else "cpu"
            for f in self.active:
                f.setup(device)
            self.captioner.setup(device)
            if self.rewriter is not None:
                self.rewriter.setup(device)
            self._ready = True

    def analysis_size(self, info: VideoInfo) -> tuple[int, int] | None:
        """The one decode size every clip's frames share: the largest any configured filter needs. A disabled
        filter still counts, so switching it off never moves the other filters' scores."""
        side = max((f.decode_side for f in self.filters), default=_CAPTION_ONLY_SIDE)
        scale = side / max(info.width, info.height)
        if scale >= 1:
            return None
        return (max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2))

    def samples(self, plan: ClipPlan, info: VideoInfo) -> ClipSamples:
        groups = {f.name: f.sample_times(plan, info) for f in self.active}
        groups["caption"] = self.captioner.sample_times(plan, info)
        return ClipSamples(groups)

    def filter_clip(self, frames: dict[str, np.ndarray], rec: dict) -> bool:
        """Fill scores into ``rec`` in run order; False (and the reason) at the first rejection."""
        for f in self.active:
            if f.needs_caption:
                continue  # scored after captioning (_CaptionQueue.flush)
            scores = f.score(frames[f.name])
            rec.update(f.record(scores))
            if reason := f.accept(scores):
                rec["status"], rec["reject_reason"] = "rejected", reason
                return False
        return True

    def analyse(self, video_path: Path, source_hash: str) -> list[dict]:
        """Scores, decisions and captions for every clip of one video, from one decode pass; no encoding."""
        name, cols = video_path.name, self.score_columns
        try:
            info = probe(video_path)
        except VideoError as exc:
            rec = _base(name, source_hash, 0.0, 0.0, None, cols)
            rec.update(status="quarantined", reject_reason=exc.reason)
            return [rec]
        if reason := _probe_check(info, self.settings):
            rec = _base(name, source_hash, 0.0, round(info.duration_s, 3), info, cols)
            rec.update(status="rejected", reject_reason=reason)
            return [rec]
        self.setup()
        size = self.analysis_size(info)
        queue = _CaptionQueue(
            self.captioner, self.settings.curate.caption.batch_size, self.rewriter, self.caption_filters
        )
        evaluated: dict[tuple[float, float], dict] = {}

        def evaluate(plan: ClipPlan, frames: np.ndarray) -> None:
            rec = _base(name, source_hash, plan.start_s, plan.end_s, info, cols)
            split = self.samples(plan, info).split(frames)
            if self.filter_clip(split, rec):
                queue.add(rec, split["caption"], split)
            evaluated[(plan.start_s, plan.end_s)] = rec

        try:
            scenes, _ = scan_video(
                video_path,
                info,
                self.settings.curate.scenes,
                size,
                times_for=lambda plan: self.samples(plan, info).times(),
                on_clip=evaluate,
            )
        except VideoError as exc:
            rec = _base(name, source_hash, 0.0, round(info.duration_s, 3), info, cols)
            rec.update(status="quarantined", reject_reason=exc.reason)
            return [rec]
        records = []
        for plan in plan_clips(scenes, self.settings.curate.scenes):
            rec = evaluated.get((plan.start_s, plan.end_s))
            if rec is None:
                rec = _base(name, source_hash, plan.start_s, plan.end_s, info, cols)
                if not plan.ok:
                    rec.update(status="rejected", reject_reason=plan.reject_reason)
                else:
                    # A cut arrived later than the detector's look-behind and changed this plan after
                    # the pass moved on: decode just this clip's frames (never happens in practice).
                    try:
                        samples = self.samples(plan, info)
                        split = samples.split(
                            decode_frames(video_path, times=samples.times(), size=size, analysis=True)
                        )
                        if self.filter_clip(split, rec):
                            queue.add(rec, split["caption"], split)
                    except VideoError as exc:
                        rec.update(status="quarantined", reject_reason=exc.reason)
            # The final plans carry their scene (clips handed out early during the scan do not).
            rec["scene_id"] = mf.make_clip_id(source_hash, *plan.scene)
            records.append(rec)
        queue.flush()
        return records

    def _curate_uncached(self, video_path: Path, source_hash: str, out_dir: Path) -> list[dict]:
        records = self.analyse(video_path, source_hash)
        for rec in records:
            if rec["status"] != "accepted":
                continue
            rel = f"clips/{rec['clip_id']}.mp4"
            try:
                cut_clip(video_path, out_dir / rel, rec["start_s"], rec["end_s"], self.settings.curate.encode)
                rec["clip_path"] = rel
            except VideoError as exc:
                # Damage inside the file (e.g. a corrupt GOP): lose this clip, keep the rest of the video.
                rec.update(status="quarantined", reject_reason=exc.reason, clip_path=None)
        return records

    def curate(self, video_path: str | Path, out_dir: str | Path) -> list[dict]:
        """Curate one source video; returns its manifest records (never raises for bad input)."""
        video_path, out_dir = Path(video_path), Path(out_dir)
        settings = self.settings
        try:
            source_hash = mf.file_hash(video_path)
        except OSError as exc:
            rec = _base(video_path.name, "unreadable:" + video_path.name, 0.0, 0.0, None, self.score_columns)
            rec.update(status="quarantined", reject_reason="unreadable")
            log.warning("cannot read %s: %s", video_path, exc)
            return [rec]
        rpath = record_path(out_dir, source_hash, settings)
        # Per video: captioning a newly added video must not redo all the others.
        fingerprint = self.captioner.fingerprint_for(video_path.name)
        cached = _load_cached(rpath, out_dir, fingerprint)
        if cached is not None:
            # Same bytes under a new name still reuse the work; report the current name.
            return [{**r, "source": video_path.name} for r in cached]
        t0 = time.perf_counter()
        records = self._curate_uncached(video_path, source_hash, out_dir)
        _atomic_json(
            {
                "version": RECORD_VERSION,
                "source": video_path.name,
                "source_hash": source_hash,
                "settings_hash": settings_hash(settings),
                "captioner": fingerprint,
                "seconds": round(time.perf_counter() - t0, 3),
                "records": records,
            },
            rpath,
        )
        return records


def _atomic_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _load_cached(path: Path, out_dir: Path, fingerprint: str | None) -> list[dict] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("version") != RECORD_VERSION or data.get("captioner") != fingerprint:
        return None  # sidecar captions changed: redo rather than serve stale captions
    records = data["records"]
    if any(r["status"] == "accepted" and not (out_dir / r["clip_path"]).exists() for r in records):
        return None  # someone deleted clips; recreate them
    return records


def analyse_video(
    video_path: Path, source_hash: str, settings: Settings, captioner: Captioner | None = None
) -> list[dict]:
    """One video's records without cutting clips (a throwaway Curator: models load for this call)."""
    return Curator(settings, captioner).analyse(Path(video_path), source_hash)


def curate_video(
    video_path: str | Path,
    settings: Settings,
    out_dir: str | Path,
    captioner: Captioner | None = None,
    curator: Curator | None = None,
) -> list[dict]:
    """Curate one source video with ``curator`` (or a fresh one: pass a Curator when curating several)."""
    return (curator or Curator(settings, captioner)).curate(video_path, out_dir)


def dedup_enabled(settings: Settings) -> bool:
    return "dedup" in settings.curate.filters and settings.curate.dedup.enabled


def mark_duplicate_files(records: list[dict]) -> list[dict]:
    """Records of all videos (in input order) with each input file whose bytes equal an earlier one's reduced to
    one ``rejected`` row: reason ``duplicate_file``, ``duplicate_file_of`` = the earlier file's ``source``.

    Clip ids address content (source hash + span), so such a file's records repeat the earlier file's ids; its
    row gets an id of its own (from its name) so the manifest keeps it."""
    by_source: dict[str, list[dict]] = {}
    for rec in records:
        by_source.setdefault(rec["source"], []).append(rec)
    owner: dict[str, str] = {}
    out: list[dict] = []
    for source, recs in by_source.items():
        first = next((owner[r["clip_id"]] for r in recs if r["clip_id"] in owner), None)
        if first is None or first == source:
            owner.update({r["clip_id"]: source for r in recs})
            out += recs
            continue
        head = recs[0]
        row = {key: None for rec in recs for key in rec}
        row.update(
            clip_id=mf.make_clip_id(f"duplicate_file:{source}:{head['clip_id']}", 0.0, 0.0),
            source=source,
            start_s=0.0,
            end_s=max(float(r["end_s"]) for r in recs),
            width=head.get("width"),
            height=head.get("height"),
            fps=head.get("fps"),
            status="rejected",
            reject_reason="duplicate_file",
            duplicate_file_of=first,
        )
        row["duration_s"] = round(row["end_s"], 3)
        out.append(row)
    return out


def build_manifest(records: list[dict], settings: Settings, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Records of all videos -> manifest with train/val splits; a file with the same bytes as an earlier one
    becomes one ``duplicate_file`` row (``mark_duplicate_files``).

    With the ``dedup`` filter, near-duplicates are then rejected in one dataset-level pass, in manifest order,
    against the index ``out_dir/dedup_index.parquet`` (updated there; without ``out_dir`` an empty in-memory
    index), before splits are assigned."""
    records = mark_duplicate_files(records)
    df = mf.to_frame(records, manifest_columns(settings))
    df = df.drop_duplicates(subset="clip_id", keep="first").reset_index(drop=True)  # never drops a file now
    if dedup_enabled(settings):
        embeddings = {r["clip_id"]: r[EMBEDDING_KEY] for r in records if r.get(EMBEDDING_KEY)}
        index_path = Path(out_dir) / INDEX_FILE if out_dir is not None else None
        df = deduplicate(df, settings, index_path, embeddings)
    df["split"] = mf.assign_splits(df, settings.curate.val_fraction)
    return df


def list_videos(input_dir: str | Path, settings: Settings) -> list[Path]:
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"raw video folder not found: {input_dir} (paths.raw_videos)")
    exts = {e.lower() for e in settings.curate.video_extensions}
    return sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in exts)


def curate_dataset(
    input_dir: str | Path, out_dir: str | Path, settings: Settings, progress: bool = True
) -> pd.DataFrame:
    """Sequential loop over ``input_dir`` with one Curator; writes ``out_dir/manifest.parquet`` and returns it."""
    from rich.progress import Progress

    out_dir = Path(out_dir)
    videos = list_videos(input_dir, settings)
    # Text-file captions (<video>.txt) are looked up beside the videos.
    settings = settings.model_copy(update={"paths": settings.paths.model_copy(update={"raw_videos": Path(input_dir)})})
    curator = Curator(settings)
    records: list[dict] = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("curating", total=len(videos))
        for video in videos:
            bar.update(task, description=f"curating {video.name}")
            records.extend(curator.curate(video, out_dir))
            bar.advance(task)
    for row in skipped_filters(curator.filters):
        log.warning("curate: filter %s skipped: %s", row["filter"], row["reason"])
    df = build_manifest(records, settings, out_dir)
    mf.write_manifest(df, out_dir / "manifest.parquet")
    if note := caption_note(df):
        log.warning("curate: %s", note)
    return df


# ------------------------------------------------------------------------------------ the stage's fan-out
# The Curator of this worker process for the stage run in progress. Items that ``ctx.map`` sends to one
# worker (a Dask process, or the threads of the thread runner) share it, so models load once per worker.
_WORKER_CURATORS: dict[tuple[str, str], Curator] = {}
_WORKER_LOCK = threading.Lock()


def worker_curator(settings: Settings, run_key: str) -> Curator:
    key = (run_key, hashlib.sha256(settings.model_dump_json().encode()).hexdigest())
    with _WORKER_LOCK:
        curator = _WORKER_CURATORS.get(key)
        if curator is None:
            _WORKER_CURATORS.clear()  # a worker serves one curation run at a time: free the last run's models
            curator = _WORKER_CURATORS[key] = Curator(settings)
        return curator


def release_worker_curators(run_key: str) -> None:
    with _WORKER_LOCK:
        for key in [k for k in _WORKER_CURATORS if k[0] == run_key]:
            del _WORKER_CURATORS[key]


def curate_video_job(video: Path, settings: Settings, run_key: str = "") -> list[dict]:
    """One ``ctx.map`` item: curate ``video`` into ``paths.curated`` with this worker's Curator (resumable:
    a finished video's records are reused, so retries and reruns redo nothing)."""
    return worker_curator(settings, run_key).curate(video, settings.paths.curated)


# ------------------------------------------------------------------------------------ the stage entry
def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    """The curate stage: every video in ``paths.raw_videos`` -> ``paths.curated`` (clips, records, manifest,
    gate.json, summary/); the Data Docs report under ``ctx.report_dir``. A failed quality gate is
    ``failure``: the runner logs everything, then raises."""
    out_dir = settings.paths.curated
    videos = list_videos(settings.paths.raw_videos, settings)
    filters = build_filters(settings)  # an unknown filter or a missing weight path fails before any decoding
    run_key = uuid.uuid4().hex
    try:
        per_video = ctx.map(curate_video_job, videos, settings=settings, run_key=run_key)
    finally:
        release_worker_curators(run_key)  # in-process workers (sequential, threads) free their models now
    df = build_manifest([rec for recs in per_video for rec in recs], settings, out_dir)
    manifest = mf.write_manifest(df, out_dir / "manifest.parquet")

    # Earlier versions wrote the timestamped Data Docs into the curated folder, changing its hash every run.
    shutil.rmtree(out_dir / "gate_report", ignore_errors=True)
    gate = run_quality_gate(df, settings, out_dir, report_dir=Path(ctx.report_dir) / "gate_report", filters=filters)
    metrics = summarise(df, filters)
    metrics["curate/gate_passed"] = float(gate.success)
    skipped = skipped_filters(filters)
    for row in skipped:
        log.warning("curate: filter %s skipped: %s", row["filter"], row["reason"])
        metrics[f"curate/skipped.{row['filter']}"] = 1.0
    reasons, hist = reject_reason_table(df), score_histograms(df, filters)
    uncaptioned, note = uncaptioned_table(df), caption_note(df)
    if note:
        print(f"curate: {note}")  # the runner's console and logs (Prefect tasks log prints)
    summary_dir = write_summary(out_dir / "summary", reasons, hist, skipped, uncaptioned, note)
    _log_histograms(ctx, hist, score_columns(filters))
    if ctx.write_reports:
        write_reports(Path(ctx.report_dir), metrics)

    accepted = int((df["status"] == "accepted").sum())
    tables = {
        "curate-reject-reasons": (
            "clips per reject/quarantine reason",
            reasons or [{"status": "-", "reject_reason": "-", "clips": 0}],
        ),
        "curate-manifest": ("every clip with its scores and reason", manifest_table(df, filters)),
    }
    if skipped:
        tables["curate-skipped-filters"] = ("configured filters that did not run, and why", skipped)
    if uncaptioned:
        tables["curate-uncaptioned"] = ("accepted clips without a caption (training refuses them)", uncaptioned)
    if hist:
        names = ", ".join(dict.fromkeys(row["score"] for row in hist))
        tables["curate-score-histograms"] = (f"{HISTOGRAM_BINS}-bin histograms of {names}", hist)
    markdown, links = {}, {}
    report = "\n".join(f"- {f}" for f in gate.failures)
    index = gate.report_dir / "index.html" if gate.report_dir else None
    if index is not None and index.exists():
        links["curate-gate-report"] = (index.resolve().as_uri(), "great_expectations Data Docs")
        where = f"MLflow run `{ctx.run_id}`, artifact `curate/gate_report/index.html`\n\n" if ctx.run_id else ""
        markdown["curate-gate-report-summary"] = (
            "where the Data Docs report lives",
            f"## Curation quality gate {'passed' if gate.success else 'FAILED'}\n\n"
            f"Data Docs: `{index.resolve()}`\n\n{where}{report}",
        )
    if note:
        markdown["curate-next-steps"] = ("uncaptioned clips: how to caption them", f"## Next step\n\n{note}\n")
    failure = None
    if not gate.success:
        markdown["curate-gate"] = ("curation quality gate failures", f"## Quality gate FAILED\n\n{report}")
        failure = "curated data failed the quality gate:\n" + report
    artifacts = [manifest, out_dir / "gate.json", *([gate.report_dir] if gate.report_dir else []), summary_dir]
    return StageResult(
        name="curate",
        metrics=metrics,
        outputs={"curated": out_dir},
        artifacts=artifacts,
        info={
            "manifest": str(manifest),
            "accepted": accepted,
            "uncaptioned": len(uncaptioned),
            **({"next_step": note} if note else {}),
        },
        tables=tables,
        markdown=markdown,
        links=links,
        failure=failure,
    )


def _log_histograms(ctx: StageContext, hist: list[dict], columns: list[str]) -> None:
    """Each histogram as a metric series of the stage's run (step = bin index, value = clips in the bin)."""
    for tracker in ctx.trackers:
        for column in columns:
            for step, row in enumerate(r for r in hist if r["score"] == column):
                tracker.log({f"curate.hist.{column}": row["clips"]}, step=step)
