"""Per-video curation (the unit the Prefect flow maps over) and a sequential convenience loop.

Pipeline per video: hash + probe -> probe checks -> ONE decode pass that feeds the scene detector
and, as each clip plan becomes final, hands that clip the few small frames its filters need ->
filters cheapest first (technical aesthetic, motion, OCR text), stopping at the first failure ->
captions for the survivors, batched across clips -> cut accepted clips.

Bad input never raises: it becomes one ``quarantined`` record with the ``VideoError.reason``.
Each finished video is stored as ``records/<source-hash>-<settings-hash>.json`` (atomic), so a rerun
skips unchanged videos and a kill loses at most the video in progress.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from easyanimate.config import Settings
from easyanimate.data import manifest as mf
from easyanimate.data.captioners import CaptionRequest
from easyanimate.data.filters import FilterResult
from easyanimate.data.filters.motion import motion_filter
from easyanimate.data.filters.technical import technical_aesthetic
from easyanimate.data.scenes import ClipPlan, detect_scenes, plan_clips, scan_video  # noqa: F401
from easyanimate.data.video_io import VideoError, VideoInfo, cut_clip, decode_frames, probe

log = logging.getLogger(__name__)
RECORD_VERSION = 2  # 2: scenes come from the single decode pass
# Filters run at this long side at most (technical scores at 512 px, OCR at text.max_side).
_ANALYSIS_MIN_SIDE = 512


def settings_hash(settings: Settings) -> str:
    return settings.section_hash("curate", "weights")


def record_path(out_dir: Path, source_hash: str, settings: Settings) -> Path:
    return Path(out_dir) / "records" / f"{source_hash[:16]}-{settings_hash(settings)}.json"


def _captioner_fingerprint(captioner, source: str) -> str | None:
    # Per video when the captioner can tell: captioning a newly added video must not redo all the others.
    per_source = getattr(captioner, "fingerprint_for", None)
    return per_source(source) if per_source is not None else getattr(captioner, "fingerprint", None)


def _base(source: str, source_hash: str, start: float, end: float, info: VideoInfo | None) -> dict:
    return {
        "clip_id": mf.make_clip_id(source_hash, start, end), "source": source,
        "scene_id": mf.make_clip_id(source_hash, start, end),
        "start_s": float(start), "end_s": float(end), "duration_s": round(float(end - start), 3),
        "width": info.width if info else None, "height": info.height if info else None,
        "fps": info.fps if info else None,
        "aesthetic": None, "text_area": None, "motion": None, "caption": None,
        "status": "accepted", "reject_reason": None, "clip_path": None, "split": None,
    }


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


def _uniform(start: float, end: float, n: int) -> list[float]:
    step = (end - start) / n
    return [start + (i + 0.5) * step for i in range(n)]


def _analysis_size(info: VideoInfo, settings: Settings) -> tuple[int, int] | None:
    side = max(_ANALYSIS_MIN_SIDE, settings.curate.text.max_side, settings.curate.motion.max_side)
    scale = side / max(info.width, info.height)
    if scale >= 1:
        return None
    return (max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2))


def _aesthetic(frames: np.ndarray, settings: Settings) -> FilterResult:
    cfg = settings.curate.aesthetic
    if cfg.scorer == "laion":
        from easyanimate.data.filters.laion import laion_aesthetic

        return laion_aesthetic(frames, cfg, settings.weights)
    return technical_aesthetic(frames, cfg)


@dataclass(frozen=True)
class ClipSamples:
    """The sample times every filter of one clip needs, decoded together and split back apart."""

    aesthetic: list[float]
    middle: list[float]
    motion: list[float]
    caption: list[float]

    @classmethod
    def for_plan(cls, plan: ClipPlan, info: VideoInfo, settings: Settings) -> "ClipSamples":
        c = settings.curate
        motion = [float(t) for t in np.arange(plan.start_s, plan.end_s, 1.0 / c.motion.sample_fps)]
        if len(motion) < 2:
            motion = [plan.start_s, plan.end_s - 1.0 / max(info.fps, 1.0)]
        caption = _uniform(plan.start_s, plan.end_s, c.caption.num_frames) if c.caption.captioner == "vlm" else []
        return cls(_uniform(plan.start_s, plan.end_s, c.aesthetic.num_frames), [(plan.start_s + plan.end_s) / 2],
                   motion, caption)

    def times(self) -> list[float]:
        return self.aesthetic + self.middle + self.motion + self.caption

    def split(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        out, i = {}, 0
        for name in ("aesthetic", "middle", "motion", "caption"):
            n = len(getattr(self, name))
            out[name], i = frames[i : i + n], i + n
        if not len(out["caption"]):
            out["caption"] = out["aesthetic"]
        return out


def _filter_clip(frames: dict[str, np.ndarray], settings: Settings, rec: dict) -> bool:
    """Fill scores into ``rec``, cheapest filter first; False (and the reason) at the first failure."""
    c = settings.curate

    def reject(reason: str) -> bool:
        rec["status"], rec["reject_reason"] = "rejected", reason
        return False

    res = _aesthetic(frames["aesthetic"], settings)
    rec["aesthetic"] = res.score
    if not res.passed:
        return reject(res.reason)
    res = motion_filter(frames["motion"], c.motion)
    rec["motion"] = res.score
    if not res.passed:
        return reject(res.reason)
    if c.text.enabled:
        from easyanimate.data.filters.text import text_filter  # imports torch/easyocr only when used

        res = text_filter(frames["middle"][0], c.text, settings.weights)
        rec["text_area"] = res.score
        if not res.passed:
            return reject(res.reason)
    return True


def caption_clips(captioner, items: list[CaptionRequest]) -> list[str]:
    """Captions for several clips at once: batched when the captioner can, else one call per clip."""
    batched = getattr(captioner, "caption_clips", None)
    if batched is not None:
        return list(batched(items))
    return [captioner(it.source, it.start_s, it.end_s, it.frames) for it in items]


class _CaptionQueue:
    """Survivors wait here so the captioner sees full batches of frames across clips; flushing as
    soon as a batch fills keeps memory at one batch, not one video."""

    def __init__(self, captioner, settings: Settings):
        self.captioner, self.pending = captioner, []
        c = settings.curate.caption
        frames_per_clip = c.num_frames if c.captioner == "vlm" else 1
        self.clips_per_flush = max(1, -(-c.batch_size // frames_per_clip))

    def add(self, rec: dict, frames: np.ndarray) -> None:
        self.pending.append((rec, CaptionRequest(rec["source"], rec["start_s"], rec["end_s"], frames)))
        if len(self.pending) >= self.clips_per_flush:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        captions = caption_clips(self.captioner, [req for _, req in self.pending])
        for (rec, _), caption in zip(self.pending, captions):
            rec["caption"] = (caption or "").strip()
            if not rec["caption"]:
                rec["status"], rec["reject_reason"] = "rejected", "no_caption"
        self.pending = []


def analyse_video(video_path: Path, source_hash: str, settings: Settings, captioner) -> list[dict]:
    """Scores, decisions and captions for every clip of one video, from one decode pass; no encoding."""
    name = video_path.name
    try:
        info = probe(video_path)
    except VideoError as exc:
        rec = _base(name, source_hash, 0.0, 0.0, None)
        rec.update(status="quarantined", reject_reason=exc.reason)
        return [rec]
    if reason := _probe_check(info, settings):
        rec = _base(name, source_hash, 0.0, round(info.duration_s, 3), info)
        rec.update(status="rejected", reject_reason=reason)
        return [rec]
    size = _analysis_size(info, settings)
    queue = _CaptionQueue(captioner, settings)
    evaluated: dict[tuple[float, float], dict] = {}

    def evaluate(plan: ClipPlan, frames: np.ndarray) -> None:
        rec = _base(name, source_hash, plan.start_s, plan.end_s, info)
        split = ClipSamples.for_plan(plan, info, settings).split(frames)
        if _filter_clip(split, settings, rec):
            queue.add(rec, split["caption"])
        evaluated[(plan.start_s, plan.end_s)] = rec

    try:
        scenes, _ = scan_video(video_path, info, settings.curate.scenes, size,
                               times_for=lambda plan: ClipSamples.for_plan(plan, info, settings).times(),
                               on_clip=evaluate)
    except VideoError as exc:
        rec = _base(name, source_hash, 0.0, round(info.duration_s, 3), info)
        rec.update(status="quarantined", reject_reason=exc.reason)
        return [rec]
    records = []
    for plan in plan_clips(scenes, settings.curate.scenes):
        rec = evaluated.get((plan.start_s, plan.end_s))
        if rec is None:
            rec = _base(name, source_hash, plan.start_s, plan.end_s, info)
            if not plan.ok:
                rec.update(status="rejected", reject_reason=plan.reject_reason)
            else:
                # A cut arrived later than the detector's look-behind and changed this plan after
                # the pass moved on: decode just this clip's frames (never happens in practice).
                try:
                    samples = ClipSamples.for_plan(plan, info, settings)
                    split = samples.split(decode_frames(video_path, times=samples.times(), size=size))
                    if _filter_clip(split, settings, rec):
                        queue.add(rec, split["caption"])
                except VideoError as exc:
                    rec.update(status="quarantined", reject_reason=exc.reason)
        # The final plans carry their scene (clips handed out early during the scan do not).
        rec["scene_id"] = mf.make_clip_id(source_hash, *plan.scene)
        records.append(rec)
    queue.flush()
    return records


def _curate_uncached(video_path: Path, source_hash: str, settings: Settings, out_dir: Path, captioner) -> list[dict]:
    records = analyse_video(video_path, source_hash, settings, captioner)
    for rec in records:
        if rec["status"] != "accepted":
            continue
        rel = f"clips/{rec['clip_id']}.mp4"
        try:
            cut_clip(video_path, out_dir / rel, rec["start_s"], rec["end_s"], settings.curate.encode)
            rec["clip_path"] = rel
        except VideoError as exc:
            # Damage inside the file (e.g. a corrupt GOP): lose this clip, keep the rest of the video.
            rec.update(status="quarantined", reject_reason=exc.reason, clip_path=None)
    return records


def _atomic_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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


def curate_video(video_path: str | Path, settings: Settings, out_dir: str | Path, captioner=None) -> list[dict]:
    """Curate one source video; returns its manifest records (never raises for bad input)."""
    video_path, out_dir = Path(video_path), Path(out_dir)
    if captioner is None:
        from easyanimate.data.captioners import build_captioner

        captioner = build_captioner(settings)
    try:
        source_hash = mf.file_hash(video_path)
    except OSError as exc:
        rec = _base(video_path.name, "unreadable:" + video_path.name, 0.0, 0.0, None)
        rec.update(status="quarantined", reject_reason="unreadable")
        log.warning("cannot read %s: %s", video_path, exc)
        return [rec]
    rpath = record_path(out_dir, source_hash, settings)
    fingerprint = _captioner_fingerprint(captioner, video_path.name)
    cached = _load_cached(rpath, out_dir, fingerprint)
    if cached is not None:
        # Same bytes under a new name still reuse the work; report the current name.
        return [{**r, "source": video_path.name} for r in cached]
    t0 = time.perf_counter()
    records = _curate_uncached(video_path, source_hash, settings, out_dir, captioner)
    _atomic_json(
        {"version": RECORD_VERSION, "source": video_path.name, "source_hash": source_hash,
         "settings_hash": settings_hash(settings), "captioner": fingerprint,
         "seconds": round(time.perf_counter() - t0, 3), "records": records},
        rpath,
    )
    return records


def build_manifest(records: list[dict], settings: Settings) -> pd.DataFrame:
    """Records of all videos -> manifest with train/val splits; duplicate clip ids (same bytes twice) dropped."""
    df = mf.to_frame(records)
    df = df.drop_duplicates(subset="clip_id", keep="first").reset_index(drop=True)
    df["split"] = mf.assign_splits(df, settings.curate.val_fraction)
    return df


def list_videos(input_dir: str | Path, settings: Settings) -> list[Path]:
    exts = {e.lower() for e in settings.curate.video_extensions}
    return sorted(p for p in Path(input_dir).iterdir() if p.is_file() and p.suffix.lower() in exts)


def curate_dataset(input_dir: str | Path, out_dir: str | Path, settings: Settings, progress: bool = True) -> pd.DataFrame:
    """Sequential loop over ``input_dir``; writes ``out_dir/manifest.parquet`` and returns it."""
    from rich.progress import Progress

    out_dir = Path(out_dir)
    videos = list_videos(input_dir, settings)
    from easyanimate.data.captioners import build_captioner

    captioner = build_captioner(settings)
    records: list[dict] = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("curating", total=len(videos))
        for video in videos:
            bar.update(task, description=f"curating {video.name}")
            records.extend(curate_video(video, settings, out_dir, captioner=captioner))
            bar.advance(task)
    df = build_manifest(records, settings)
    mf.write_manifest(df, out_dir / "manifest.parquet")
    return df
