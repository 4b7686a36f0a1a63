"""Text filter: share of the frame covered by detected text (easyocr CRAFT detector only).

EasyAnimate drops clips with large burned-in text (subtitles, titles, watermarks) because the
generator learns to hallucinate glyphs. Only detection runs, on the clip's middle frame, resized so
its long side is at most ``text.max_side``; recognition is never loaded.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from easyanimate.config import TextFilterConfig, WeightsConfig, resolve_weight_path
from easyanimate.data.filters import FilterResult, resize_long_side

_READERS: dict[str, object] = {}
_LOCK = threading.Lock()  # the flow runs videos on threads; build the Reader once per process


def get_reader(weights: WeightsConfig):
    model_dir = resolve_weight_path(weights.ocr, "weights.ocr")
    key = str(model_dir)
    with _LOCK:
        if key not in _READERS:
            import easyocr

            _READERS[key] = easyocr.Reader(
                ["en"], gpu=False, model_storage_directory=key, download_enabled=False,
                recognizer=False, verbose=False,
            )
        return _READERS[key]


def text_area(frame: np.ndarray, weights: WeightsConfig, max_side: int) -> float:
    """Union area of detected text boxes / frame area, in [0, 1]."""
    img = resize_long_side(frame, max_side)
    h, w = img.shape[:2]
    reader = get_reader(weights)
    with _LOCK:  # torch CPU inference on a shared model; serialise to keep threads from oversubscribing
        horizontal, free = reader.detect(img)
    mask = np.zeros((h, w), np.uint8)
    for x_min, x_max, y_min, y_max in horizontal[0]:
        cv2.rectangle(mask, (int(x_min), int(y_min)), (int(x_max), int(y_max)), 1, thickness=-1)
    for quad in free[0]:
        cv2.fillPoly(mask, [np.asarray(quad, dtype=np.int32)], 1)
    return float(mask.mean())


def text_filter(frame: np.ndarray, cfg: TextFilterConfig, weights: WeightsConfig) -> FilterResult:
    if not cfg.enabled:
        return FilterResult(0.0, True, None)
    area = text_area(frame, weights, cfg.max_side)
    passed = area <= cfg.max_text_area
    return FilterResult(round(area, 5), passed, None if passed else "too_much_text")
