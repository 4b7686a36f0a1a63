"""Scene splitting (PySceneDetect) and the clip plan derived from scenes.

EasyAnimate cuts raw videos at shot boundaries so a training clip never spans a cut, then keeps
clips of a bounded length; the tail of every scene is trimmed because fades and dissolves that the
content detector places late would otherwise leak the next shot into the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np

from easyanimate.config import SceneConfig
from easyanimate.data.video_io import VideoError, VideoInfo, analysis_bgr, analysis_frame, analysis_rgb, probe


@dataclass(frozen=True)
class ClipPlan:
    start_s: float
    end_s: float
    reject_reason: str | None = None  # set when the plan itself already disqualifies the clip
    # The scene the clip was cut from: clips of one scene share a train/val split (no near-duplicate leakage).
    scene: tuple[float, float] | None = field(default=None, compare=False)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


def detect_scenes(path: str | Path, cfg: SceneConfig) -> list[tuple[float, float]]:
    """Return ``[(start_s, end_s), ...]`` covering the video; the whole video if no cut is found."""
    scenes, _ = scan_video(path, probe(path), cfg)
    return scenes


def plan_clips(scenes: list[tuple[float, float]], cfg: SceneConfig) -> list[ClipPlan]:
    """Trim, drop-too-short and split-too-long; rejected plans are kept so the manifest shows them."""
    plans: list[ClipPlan] = []
    for start, end in scenes:
        scene = (round(start, 3), round(end, 3))
        end = end - cfg.trim_tail_s
        length = end - start
        if length < cfg.min_duration_s:
            plans.append(ClipPlan(round(start, 3), round(max(end, start), 3), "too_short", scene))
            continue
        # Fewest pieces that respect max; pieces of at most max, cut greedily from the start
        # (the remainder may fall below min and is then rejected, as the brief specifies).
        n_full = math.floor(length / cfg.max_duration_s + 1e-9)
        pos = start
        for _ in range(n_full):
            plans.append(ClipPlan(round(pos, 3), round(pos + cfg.max_duration_s, 3), None, scene))
            pos += cfg.max_duration_s
        rest = end - pos
        if rest > 1e-6:
            reason = None if rest >= cfg.min_duration_s else "too_short"
            plans.append(ClipPlan(round(pos, 3), round(end, 3), reason, scene))
    return plans


# ------------------------------------------------------------------------------------ one decode pass
ClipCallback = Callable[[ClipPlan, np.ndarray], None]
# Frames older than this before the next open clip's start are dropped from the look-back window;
# nearest-frame picks never reach further back than half a frame interval.
_WINDOW_MARGIN_S = 1.0


def detector_size(width: int, height: int) -> tuple[int, int]:
    """The frame size PySceneDetect's ``auto_downscale`` analyses (same rule, same result)."""
    from scenedetect.scene_manager import compute_downscale_factor

    factor = compute_downscale_factor(width)
    if factor <= 1:
        return width, height
    return max(1, round(width / factor)), max(1, round(height / factor))


def nearest_frames(window: Sequence[tuple[float, tuple]], times: Sequence[float]) -> np.ndarray:
    """RGB of the frame nearest each requested time (ties to the earlier frame), in the requested order; the
    window holds ``analysis_frame`` results, each converted once however many requests pick it."""
    stamps = np.fromiter((t for t, _ in window), dtype=float, count=len(window))
    picks = [int(np.argmin(np.abs(stamps - t))) for t in times]
    rgb = {i: analysis_rgb(window[i][1]) for i in dict.fromkeys(picks)}
    return np.stack([rgb[i] for i in picks])


def _decode_tolerant(container, stream):
    """Frames in order; a packet that fails to decode (a damaged GOP) is skipped, a demuxer error
    (a truncated tail) ends the stream: whatever decodes is kept, as PySceneDetect's reader does."""
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.InvalidDataError:
                continue
    except av.error.FFmpegError:
        return


def scan_video(
    path: str | Path,
    info: VideoInfo,
    cfg: SceneConfig,
    size: tuple[int, int] | None = None,
    times_for: Callable[[ClipPlan], list[float]] | None = None,
    on_clip: ClipCallback | None = None,
) -> tuple[list[tuple[float, float]], dict[tuple[float, float], bool]]:
    """ONE sequential decode that both detects scenes and hands every clip its sampled frames.

    Each decoded frame is shrunk once to ``size`` (the analysis size the filters share) in its decoder's
    YUV form (``video_io.analysis_frame``); a further downscale of it, as BGR, feeds PySceneDetect's
    ``ContentDetector``, driven frame by frame here instead of through PySceneDetect's own (second)
    decoder. Decoded frames wait in a look-back window until the clip plan covering them is final, then
    ``on_clip(plan, frames)`` receives the RGB frames nearest ``times_for(plan)`` (the only frames ever
    converted to RGB) and the window is trimmed. Memory is therefore bounded by about ``max_duration_s``
    of analysis-size frames, whatever the video length.

    A clip is final when no later cut can change it: at a cut, or when the playhead is past its end
    + ``trim_tail_s`` + the detector's event look-behind (``event_buffer_length`` frames). Returns the
    scenes and the plans that were handed out; a caller compares them with ``plan_clips(scenes)`` and
    decodes separately only for plans a late cut changed (never happens within the look-behind).
    """
    from scenedetect import ContentDetector, FrameTimecode
    from scenedetect.common import Timecode

    path = Path(path)
    detector = ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_scene_len)
    # PySceneDetect's own choice for this source, or for the analysis size when that is smaller still.
    det_size = min(detector_size(info.width, info.height), detector_size(*(size or (info.width, info.height))))
    lag_s = (detector.event_buffer_length + 1) / info.fps
    wants_frames = on_clip is not None and times_for is not None
    window: list[tuple[float, np.ndarray]] = []
    handed: dict[tuple[float, float], bool] = {}
    cuts: list[float] = []
    state = {"scene_start": None, "piece_start": None}

    def hand_out(plan: ClipPlan) -> None:
        handed[(plan.start_s, plan.end_s)] = True
        if wants_frames and plan.ok:
            on_clip(plan, nearest_frames(window, times_for(plan)))

    def trim_window(before_s: float) -> None:
        keep = next((i for i, (t, _) in enumerate(window) if t >= before_s - _WINDOW_MARGIN_S), len(window))
        del window[:keep]

    def close_scene(end_s: float) -> None:
        start, piece = state["scene_start"], state["piece_start"]
        for plan in plan_clips([(start, end_s)], cfg):
            if plan.start_s >= round(piece, 3) - 1e-6 and (plan.start_s, plan.end_s) not in handed:
                hand_out(plan)
        state["scene_start"] = state["piece_start"] = end_s
        trim_window(end_s)

    def release_full_pieces(horizon_s: float) -> None:
        # Pieces of the open scene that every possible later cut leaves at full length.
        piece = state["piece_start"]
        while piece + cfg.max_duration_s + cfg.trim_tail_s <= horizon_s:
            hand_out(ClipPlan(round(piece, 3), round(piece + cfg.max_duration_s, 3)))
            piece += cfg.max_duration_s  # same accumulation as plan_clips
        if piece != state["piece_start"]:
            state["piece_start"] = piece
            trim_window(piece)

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise VideoError("not_a_video", f"{path.name}: {exc}") from None
    last_t, last_timecode, decoded, first_t = 0.0, None, 0, 0.0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = Fraction(stream.average_rate or stream.guessed_rate or Fraction(info.fps).limit_denominator(1001))
        time_base = Fraction(stream.time_base)
        # int * int / int is correctly rounded, i.e. exactly float(pts * time_base) (which decode_frames
        # uses, so nearest-frame ties break the same way) without a Fraction per frame.
        tb_num, tb_den = time_base.numerator, time_base.denominator
        for frame in _decode_tolerant(container, stream):
            if frame.pts is None:
                continue
            t = frame.pts * tb_num / tb_den
            if state["scene_start"] is None:  # scenes start at the first frame, as in PySceneDetect
                state["scene_start"] = state["piece_start"] = first_t = t
            compact = analysis_frame(frame, size)
            if wants_frames:
                window.append((t, compact))
            small = analysis_bgr(compact, det_size)
            timecode = FrameTimecode(Timecode(pts=frame.pts, time_base=time_base), fps=rate)
            for cut in detector.process_frame(timecode, small):
                cuts.append(cut.seconds)
                close_scene(cut.seconds)
            release_full_pieces(t - lag_s)
            last_t, last_timecode, decoded = t, timecode, decoded + 1
        if decoded == 0:
            raise VideoError("unreadable", f"{path.name}: no frames decoded")
        for cut in detector.post_process(last_timecode):
            cuts.append(cut.seconds)
            close_scene(cut.seconds)
        video_end = round(last_t + 1.0 / float(rate), 6)
        close_scene(video_end)
    finally:
        container.close()
    bounds = [first_t, *sorted(set(cuts)), video_end]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])], handed
