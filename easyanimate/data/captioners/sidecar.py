"""Captions from a hand-written YAML sidecar (``paths.captions``).

Format: a list of ``{file: name.mp4, start: s, end: s, caption: "..."}`` (``start``/``end`` optional:
the entry then covers the whole file). A clip gets the caption of the entry overlapping it the most.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from easyanimate.data.captioners.base import Captioner


@dataclass(frozen=True)
class CaptionEntry:
    file: str
    caption: str
    start: float = 0.0
    end: float = float("inf")


@dataclass
class SidecarCaptioner(Captioner):
    name = "sidecar"

    entries: list[CaptionEntry] = field(default_factory=list)
    # Hash of the sidecar's bytes (informational; the per-video ``fingerprint_for`` is what records store).
    fingerprint: str | None = None

    @classmethod
    def from_settings(cls, settings) -> "SidecarCaptioner":
        return cls.from_path(settings.paths.captions)

    @classmethod
    def from_path(cls, path: str | Path | None) -> "SidecarCaptioner":
        # A missing sidecar is not an error: every clip is then rejected as no_caption, visibly.
        if path is None or not Path(path).exists():
            return cls([], fingerprint="sidecar:none")
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or []
        if isinstance(raw, dict):  # also accept {captions: [...]}
            raw = raw.get("captions", [])
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "file" not in item or "caption" not in item:
                raise ValueError(f"{path}: entry {i} needs 'file' and 'caption' keys, got {item!r}")
            entries.append(
                CaptionEntry(
                    file=str(item["file"]),
                    caption=str(item["caption"]).strip(),
                    start=float(item.get("start") or 0.0),
                    end=float(item["end"]) if item.get("end") is not None else float("inf"),
                )
            )
        return cls(entries, fingerprint="sidecar:" + hashlib.sha256(text.encode()).hexdigest()[:16])

    def fingerprint_for(self, source: str) -> str:
        """Hash of the entries that caption ``source``; the file name is left out so a renamed copy still matches."""
        mine = sorted((e.start, e.end, e.caption) for e in self.entries if e.file == source)
        return "sidecar:" + hashlib.sha256(repr(mine).encode()).hexdigest()[:16]

    def caption_clips(self, requests) -> list[str]:
        return [self(r.source, r.start_s, r.end_s) for r in requests]

    def __call__(self, source: str, start_s: float, end_s: float, frames: np.ndarray | None = None) -> str:
        best, best_overlap = "", 0.0
        for e in self.entries:
            if e.file != source:
                continue
            overlap = min(end_s, e.end) - max(start_s, e.start)
            if overlap > best_overlap:
                best, best_overlap = e.caption, overlap
        return best
