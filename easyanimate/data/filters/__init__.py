"""Clip filters. Each takes already-decoded RGB frames and returns a ``FilterResult``.

Decoding is done once per clip by the curator and shared by every filter, so filters never touch
files and are cheap to unit-test on synthetic arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class FilterResult:
    score: float
    passed: bool
    reason: str | None = None  # the manifest reject_reason when not passed


def resize_long_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (never upscale) so the long side is at most ``max_side``."""
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
