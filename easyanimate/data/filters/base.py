"""The clip-filter protocol: everything the curator, the manifest, the quality gate and the summaries need
to know about one filter lives on its class, so a new filter is one file plus one registry line.

Life cycle, per worker process: ``cls(settings)`` (cheap: reads its settings section, resolves weight
paths so a bad path fails before any decoding) -> ``setup(device)`` once, the first time a video needs
analysing (loads models) -> for every clip, ``score(frames)`` on the frames it asked for with
``sample_times`` and ``accept(scores)``. Threads of one worker share the instance: a filter that runs a
model holds ``self.lock`` around model calls.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import cv2
import numpy as np

if TYPE_CHECKING:
    from easyanimate.config import Settings
    from easyanimate.data.scenes import ClipPlan
    from easyanimate.data.video_io import VideoInfo


@dataclass(frozen=True)
class Column:
    """One manifest column a filter writes."""

    name: str
    dtype: str = "float64"  # pandas dtype in the manifest
    digits: int | None = None  # stored rounded to this many decimals; the decision uses the exact value
    histogram: bool = True  # summarised: a histogram over all scored clips and a mean over accepted ones


class ClipFilter(ABC):
    """Base class of clip filters; subclasses set ``name`` and ``columns`` and implement the methods below."""

    name: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]]
    # True: scored after captioning, with the caption, in batches (``score_captioned``), not in ``score``.
    needs_caption: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """A disabled filter keeps its (empty) manifest columns and decode size but scores nothing."""
        return True

    @property
    def skip_reason(self) -> str | None:
        """Why this configured filter does not run (None when it runs); the run summary lists it."""
        return None if self.enabled else f"curate.{self.name}.enabled is false"

    @property
    def uses_device(self) -> bool:
        """True when ``setup`` loads a model that ``curate.device`` should place."""
        return False

    @property
    @abstractmethod
    def decode_side(self) -> int:
        """Long side (px) its frames need; the single decode pass uses the largest of the configured filters."""

    @abstractmethod
    def sample_times(self, plan: ClipPlan, info: VideoInfo) -> list[float]:
        """Seconds into the source video of the frames ``score`` gets for this clip."""

    def setup(self, device: str) -> None:
        """Load models; called once per worker before the first ``score``."""

    @abstractmethod
    def score(self, frames: np.ndarray) -> dict[str, float]:
        """Exact (unrounded) values of its columns for one clip's frames."""

    def score_captioned(self, frames: list[np.ndarray], captions: list[str]) -> list[dict[str, float]]:
        """Exact values of its columns for several clips, each with its caption (``needs_caption`` filters)."""
        raise NotImplementedError(f"filter {self.name!r} does not score captions")

    @abstractmethod
    def accept(self, scores: dict[str, float]) -> str | None:
        """None when the clip passes, else the manifest ``reject_reason``."""

    def expectations(self) -> list:
        """great_expectations expectations every ACCEPTED clip must meet (the quality gate re-checks them)."""
        return []

    def record(self, scores: dict[str, float]) -> dict[str, float]:
        """The manifest values of ``scores`` (rounded as each column declares)."""
        out = {}
        for col in self.columns:
            value = scores.get(col.name)
            out[col.name] = round(value, col.digits) if value is not None and col.digits is not None else value
        return out


def uniform_times(start: float, end: float, n: int) -> list[float]:
    """``n`` times at the centres of ``n`` equal slices of [start, end)."""
    step = (end - start) / n
    return [start + (i + 0.5) * step for i in range(n)]


def resize_long_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (never upscale) so the long side is at most ``max_side``."""
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
