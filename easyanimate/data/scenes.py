"""Scene splitting (PySceneDetect) and the clip plan derived from scenes.

EasyAnimate cuts raw videos at shot boundaries so a training clip never spans a cut, then keeps
clips of a bounded length; the tail of every scene is trimmed because fades and dissolves that the
content detector places late would otherwise leak the next shot into the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from easyanimate.config import SceneConfig


@dataclass(frozen=True)
class ClipPlan:
    start_s: float
    end_s: float
    reject_reason: str | None = None  # set when the plan itself already disqualifies the clip

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


def detect_scenes(path: str | Path, cfg: SceneConfig) -> list[tuple[float, float]]:
    """Return ``[(start_s, end_s), ...]`` covering the video; the whole video if no cut is found."""
    from scenedetect import ContentDetector, open_video, SceneManager

    video = open_video(str(path), backend="opencv")
    manager = SceneManager()
    manager.auto_downscale = True  # detection on a downscaled frame is as accurate and much faster
    manager.add_detector(ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_scene_len))
    manager.detect_scenes(video)
    scenes = [(float(a.seconds), float(b.seconds)) for a, b in manager.get_scene_list()]
    if not scenes:
        duration = float(video.duration.seconds) if video.duration is not None else 0.0
        scenes = [(0.0, duration)]
    return scenes


def plan_clips(scenes: list[tuple[float, float]], cfg: SceneConfig) -> list[ClipPlan]:
    """Trim, drop-too-short and split-too-long; rejected plans are kept so the manifest shows them."""
    plans: list[ClipPlan] = []
    for start, end in scenes:
        end = end - cfg.trim_tail_s
        length = end - start
        if length < cfg.min_duration_s:
            plans.append(ClipPlan(round(start, 3), round(max(end, start), 3), "too_short"))
            continue
        # Fewest pieces that respect max; pieces of at most max, cut greedily from the start
        # (the remainder may fall below min and is then rejected, as the brief specifies).
        n_full = math.floor(length / cfg.max_duration_s + 1e-9)
        pos = start
        for _ in range(n_full):
            plans.append(ClipPlan(round(pos, 3), round(pos + cfg.max_duration_s, 3)))
            pos += cfg.max_duration_s
        rest = end - pos
        if rest > 1e-6:
            reason = None if rest >= cfg.min_duration_s else "too_short"
            plans.append(ClipPlan(round(pos, 3), round(end, 3), reason))
    return plans
