"""Clip captioners. A captioner is any callable ``(source_name, start_s, end_s, frames) -> str``.

``frames`` are uniformly sampled RGB frames of the clip (``caption.num_frames`` of them). An empty
string means "no caption", which the curator rejects with reason ``no_caption``. A captioner may also
offer ``caption_clips(requests) -> captions`` to caption several clips per model call (the VLM does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class CaptionRequest:
    source: str
    start_s: float
    end_s: float
    frames: np.ndarray


class Captioner(Protocol):
    def __call__(self, source: str, start_s: float, end_s: float, frames: np.ndarray) -> str: ...


def build_captioner(settings) -> Captioner:
    """The captioner named by ``curate.caption.captioner``."""
    if settings.curate.caption.captioner == "vlm":
        from easyanimate.data.captioners.vlm import VLMCaptioner

        return VLMCaptioner.from_settings(settings)
    from easyanimate.data.captioners.sidecar import SidecarCaptioner

    return SidecarCaptioner.from_path(settings.paths.captions)
