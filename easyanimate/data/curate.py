"""Per-video curation (the unit the Prefect flow maps over) and a sequential convenience loop.

Pipeline per video: hash + probe -> probe checks -> scene split -> clip plan -> for each candidate
clip ONE decode of only the frames its filters need -> filters cheapest first (technical aesthetic,
motion, OCR text, caption), stopping at the first failure -> cut accepted clips.

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
from pathlib import Path

import numpy as np
import pandas as pd

from easyanimate.config import Settings
from easyanimate.data import manifest as mf
from easyanimate.data.filters import FilterResult
from easyanimate.data.filters.motion import motion_filter
from easyanimate.data.filters.technical import technical_aesthetic
from easyanimate.data.scenes import ClipPlan, detect_scenes, plan_clips
from easyanimate.data.video_io import VideoError, VideoInfo, cut_clip, decode_frames, probe

log = logging.getLogger(__name__)
RECORD_VERSION = 1
# Filters run at this long side at most (technical scores at 512 px, OCR at text.max_side).
_ANALYSIS_MIN_SIDE = 512


def settings_hash(settings: Settings) -> str:
    return settings.section_hash("curate", "weights")


def record_path(out_dir: Path, source_hash: str, settings: Settings) -> Path:
    return Path(out_dir) / "records" / f"{source_hash[:16]}-{settings_hash(settings)}.json"


def _captioner_fingerprint(captioner) -> str | None:
    return getattr(captioner, "fingerprint", None)


def _base(source: str, source_hash: str, start: float, end: float, info: VideoInfo | None) -> dict:
    return {
        "clip_id": mf.make_clip_id(source_hash, start, end), "source": source,
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


def _evaluate_clip(video_path: Path, plan: ClipPlan, info: VideoInfo, settings: Settings, captioner, rec: dict) -> None:
    """Fill scores into ``rec`` and set its status; the single decode feeds every filter."""
    c = settings.curate
    a_times = _uniform(plan.start_s, plan.end_s, c.aesthetic.num_frames)
    mid = [(plan.start_s + plan.end_s) / 2]
    m_times = list(np.arange(plan.start_s, plan.end_s, 1.0 / c.motion.sample_fps))
    if len(m_times) < 2:
        m_times = [plan.start_s, plan.end_s - 1.0 / max(info.fps, 1.0)]
    cap_times = _uniform(plan.start_s, plan.end_s, c.caption.num_frames) if c.caption.captioner == "vlm" else []
    frames = decode_frames(video_path, times=a_times + mid + m_times + cap_times, size=_analysis_size(info, settings))
    i = 0
    a_frames, i = frames[i : i + len(a_times)], i + len(a_times)
    mid_frame, i = frames[i], i + 1
    m_frames, i = frames[i : i + len(m_times)], i + len(m_times)
    cap_frames = frames[i:] if cap_times else a_frames

    def reject(reason: str) -> None:
        rec["status"], rec["reject_reason"] = "rejected", reason

    res = _aesthetic(a_frames, settings)
    rec["aesthetic"] = res.score
    if not res.passed:
        return reject(res.reason)
    res = motion_filter(m_frames, c.motion)
    rec["motion"] = res.score
    if not res.passed:
        return reject(res.reason)
    if c.text.enabled:
        from easyanimate.data.filters.text import text_filter  # imports torch/easyocr only when used

        res = text_filter(mid_frame, c.text, settings.weights)
        rec["text_area"] = res.score
        if not res.passed:
            return reject(res.reason)
    caption = (captioner(rec["source"], plan.start_s, plan.end_s, cap_frames) or "").strip()
    rec["caption"] = caption
    if not caption:
        return reject("no_caption")


def _curate_uncached(video_path: Path, source_hash: str, settings: Settings, out_dir: Path, captioner) -> list[dict]:
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
    try:
        scenes = detect_scenes(video_path, settings.curate.scenes)
    except Exception as exc:  # scenedetect/OpenCV could not read what PyAV could
        log.warning("scene detection failed on %s: %s", name, exc)
        rec = _base(name, source_hash, 0.0, round(info.duration_s, 3), info)
        rec.update(status="quarantined", reject_reason="scene_detect_failed")
        return [rec]
    records = []
    for plan in plan_clips(scenes, settings.curate.scenes):
        rec = _base(name, source_hash, plan.start_s, plan.end_s, info)
        if not plan.ok:
            rec.update(status="rejected", reject_reason=plan.reject_reason)
            records.append(rec)
            continue
        try:
            _evaluate_clip(video_path, plan, info, settings, captioner, rec)
            if rec["status"] == "accepted":
                rel = f"clips/{rec['clip_id']}.mp4"
                cut_clip(video_path, out_dir / rel, plan.start_s, plan.end_s, settings.curate.encode)
                rec["clip_path"] = rel
        except VideoError as exc:
            # Damage inside the file (e.g. a corrupt GOP): lose this clip, keep the rest of the video.
            rec.update(status="quarantined", reject_reason=exc.reason, clip_path=None)
        records.append(rec)
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
    fingerprint = _captioner_fingerprint(captioner)
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
