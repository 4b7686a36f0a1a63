"""Text filter: share of the frame covered by detected text (easyocr CRAFT detector only).

EasyAnimate drops clips with large burned-in text (subtitles, titles, watermarks) because the
generator learns to hallucinate glyphs. Only detection runs, on the clip's middle frame, resized so
its long side is at most ``text.max_side``; recognition is never loaded. The detector runs on
``curate.device``.
"""

from __future__ import annotations

import cv2
import numpy as np

from easyanimate.config import resolve_weight_path
from easyanimate.data.filters.base import ClipFilter, Column, resize_long_side


def load_reader(model_dir, device: str):
    import easyocr

    return easyocr.Reader(
        ["en"],
        gpu=device.startswith("cuda"),
        model_storage_directory=str(model_dir),
        download_enabled=False,
        recognizer=False,
        verbose=False,
    )


def text_area(frame: np.ndarray, reader, max_side: int) -> float:
    """Union area of the text boxes ``reader`` detects / frame area, in [0, 1]."""
    img = resize_long_side(frame, max_side)
    h, w = img.shape[:2]
    horizontal, free = reader.detect(img)
    mask = np.zeros((h, w), np.uint8)
    for x_min, x_max, y_min, y_max in horizontal[0]:
        cv2.rectangle(mask, (int(x_min), int(y_min)), (int(x_max), int(y_max)), 1, thickness=-1)
    for quad in free[0]:
        cv2.fillPoly(mask, [np.asarray(quad, dtype=np.int32)], 1)
    return float(mask.mean())


class TextFilter(ClipFilter):
    name = "text"
    columns = (Column("text_area", digits=5),)

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.text
        self.reader = None
        self._model_dir = resolve_weight_path(settings.weights.ocr, "weights.ocr") if self.cfg.enabled else None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def uses_device(self) -> bool:
        return self.cfg.enabled

    @property
    def decode_side(self) -> int:
        return self.cfg.max_side

    def sample_times(self, plan, info) -> list[float]:
        return [(plan.start_s + plan.end_s) / 2]

    def setup(self, device: str) -> None:
        if self.reader is None:
            self.reader = load_reader(self._model_dir, device)

    def score(self, frames: np.ndarray) -> dict[str, float]:
        with self.lock:  # one detector per worker; its threads take turns instead of oversubscribing the cores
            return {"text_area": text_area(frames[0], self.reader, self.cfg.max_side)}

    def accept(self, scores: dict[str, float]) -> str | None:
        return None if scores["text_area"] <= self.cfg.max_text_area else "too_much_text"

    def expectations(self) -> list:
        import great_expectations as gx

        E = gx.expectations
        return [
            E.ExpectColumnValuesToNotBeNull(column="text_area"),
            E.ExpectColumnValuesToBeBetween(column="text_area", max_value=self.cfg.max_text_area),
        ]
