"""Motion filter: dense optical flow (OpenCV Farneback) between consecutive sampled frames.

Score = mean per-pixel flow magnitude (pixels) divided by the frame diagonal (pixels), averaged over
all consecutive pairs, i.e. "fraction of the frame diagonal moved per sampling interval". Dividing by
the diagonal makes it independent of ``max_side``; sampling at a fixed fps (``motion.sample_fps``)
makes it independent of the source frame rate. Near 0 = frozen/slideshow, large = shaky or cut-heavy.
"""

from __future__ import annotations

import cv2
import numpy as np

from easyanimate.data.filters.base import ClipFilter, Column, resize_long_side


def motion_score(frames: np.ndarray, max_side: int) -> float:
    if len(frames) < 2:
        return 0.0
    grays = [cv2.cvtColor(resize_long_side(f, max_side), cv2.COLOR_RGB2GRAY) for f in frames]
    h, w = grays[0].shape
    diag = float(np.hypot(h, w))
    mags = []
    for a, b in zip(grays[:-1], grays[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(mags)) / diag


class MotionFilter(ClipFilter):
    name = "motion"
    columns = (Column("motion", digits=6),)

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.motion

    @property
    def decode_side(self) -> int:
        return self.cfg.max_side

    def sample_times(self, plan, info) -> list[float]:
        times = [float(t) for t in np.arange(plan.start_s, plan.end_s, 1.0 / self.cfg.sample_fps)]
        if len(times) < 2:  # a clip shorter than one sampling interval: its first and last frame
            times = [plan.start_s, plan.end_s - 1.0 / max(info.fps, 1.0)]
        return times

    def score(self, frames: np.ndarray) -> dict[str, float]:
        return {"motion": motion_score(frames, self.cfg.max_side)}

    def accept(self, scores: dict[str, float]) -> str | None:
        if scores["motion"] < self.cfg.low:
            return "too_static"
        if scores["motion"] > self.cfg.high:
            return "too_fast"
        return None

    def expectations(self) -> list:
        import great_expectations as gx

        E = gx.expectations
        return [
            E.ExpectColumnValuesToNotBeNull(column="motion"),
            E.ExpectColumnValuesToBeBetween(column="motion", min_value=self.cfg.low, max_value=self.cfg.high),
        ]
