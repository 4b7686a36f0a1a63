"""The captioner protocol: one caption per clip, from the clip's span and (for models) its sampled frames.

Life cycle, per worker process: ``cls.from_settings(settings)`` (cheap: reads the sidecar, resolves weight
paths) -> ``setup(device)`` once, the first time a video needs captions (loads models) ->
``caption_clips(requests)`` on batches of clips. An empty caption means "no caption": the curator keeps the
clip (its filters decided) with ``caption_status`` uncaptioned, and training refuses it until captioned. Threads of one worker share the instance: a model captioner holds
a lock of its own around model calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from easyanimate.data.filters.base import uniform_times


@dataclass(frozen=True)
class CaptionRequest:
    source: str
    start_s: float
    end_s: float
    frames: np.ndarray  # ``frames_per_clip`` uniformly sampled RGB frames (none for a captioner that needs none)


class Captioner(ABC):
    name: ClassVar[str]
    frames_per_clip: int = 0  # frames it reads per clip (0: captions come from elsewhere)
    uses_device: bool = False  # True when ``setup`` loads a model that ``curate.device`` should place

    @classmethod
    @abstractmethod
    def from_settings(cls, settings) -> "Captioner":
        """An instance for ``settings`` without loading any model."""

    def setup(self, device: str) -> None:
        """Load models; called once per worker before the first caption."""

    def sample_times(self, plan, info) -> list[float]:
        return uniform_times(plan.start_s, plan.end_s, self.frames_per_clip) if self.frames_per_clip else []

    @abstractmethod
    def caption_clips(self, requests: list[CaptionRequest]) -> list[str]:
        """One caption per request, in order."""

    def fingerprint_for(self, source: str) -> str | None:
        """What the captions of ``source`` depend on beyond the settings (stored with its records: a change
        recaptions that video); None when the settings say it all."""
        return None

    def __call__(self, source: str, start_s: float, end_s: float, frames: np.ndarray | None = None) -> str:
        empty = np.zeros((0, 1, 1, 3), np.uint8) if frames is None else frames
        return self.caption_clips([CaptionRequest(source, start_s, end_s, empty)])[0]
