"""Motion filter: dense optical flow (OpenCV Farneback) between consecutive sampled frames.

Score = mean per-pixel flow magnitude (pixels) divided by the frame diagonal (pixels), averaged over
all consecutive pairs, i.e. "fraction of the frame diagonal moved per sampling interval". Dividing by
the diagonal makes it independent of ``max_side``; sampling at a fixed fps (``motion.sample_fps``)
makes it independent of the source frame rate. Near 0 = frozen/slideshow, large = shaky or cut-heavy.
"""

from __future__ import annotations

import cv2
import numpy as np

from easyanimate.config import MotionFilterConfig
from easyanimate.data.filters import FilterResult, resize_long_side


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


def motion_filter(frames: np.ndarray, cfg: MotionFilterConfig) -> FilterResult:
    score = motion_score(frames, cfg.max_side)
    if score < cfg.low:
        return FilterResult(round(score, 6), False, "too_static")
    if score > cfg.high:
        return FilterResult(round(score, 6), False, "too_fast")
    return FilterResult(round(score, 6), True, None)
