"""Clip captioners: the registry (``curate.caption.captioner`` -> class) and the one the settings name.

Protocol: ``captioners.base.Captioner``. Adding a captioner: a module with a ``Captioner`` subclass, one
line here, and its name in ``CaptionConfig.captioner``.
"""

from __future__ import annotations

from easyanimate.data.captioners.base import Captioner, CaptionRequest
from easyanimate.data.captioners.sidecar import SidecarCaptioner
from easyanimate.data.captioners.vlm import VLMCaptioner

CAPTIONERS: dict[str, type[Captioner]] = {
    "sidecar": SidecarCaptioner,
    "vlm": VLMCaptioner,
}


def build_captioner(settings) -> Captioner:
    """A fresh captioner named by ``curate.caption.captioner`` (its model loads later, in ``setup``)."""
    name = settings.curate.caption.captioner
    if name not in CAPTIONERS:
        raise ValueError(f"curate.caption.captioner: unknown captioner {name!r}; registered: {', '.join(CAPTIONERS)}")
    return CAPTIONERS[name].from_settings(settings)


__all__ = ["CAPTIONERS", "CaptionRequest", "Captioner", "build_captioner"]
