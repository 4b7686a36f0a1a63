"""Captions written by hand: a YAML sidecar (``paths.captions``) and per-video text files.

YAML format: a list of ``{file: name.mp4, start: s, end: s, caption: "..."}`` (``start``/``end`` optional:
the entry then covers the whole file). A clip gets the caption of the entry overlapping it the most.
A clip no YAML entry overlaps takes the text of ``<video name>.txt`` beside the video in ``paths.raw_videos``
(``manifest.CAPTION_SIDECAR_SUFFIX``; whitespace collapsed): one caption for the whole video, the simplest way
to caption one's own footage. A clip with neither stays uncaptioned (kept by curation, refused by training).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from easyanimate.data.captioners.base import Captioner
from easyanimate.data.manifest import CAPTION_SIDECAR_SUFFIX


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
    # Folder of the videos, where ``<video>.txt`` captions are looked up (None: YAML entries only).
    text_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings) -> "SidecarCaptioner":
        captioner = cls.from_path(settings.paths.captions)
        captioner.text_dir = Path(settings.paths.raw_videos)
        return captioner

    @classmethod
    def from_path(cls, path: str | Path | None) -> "SidecarCaptioner":
        # A missing sidecar is not an error: clips without a caption are kept as uncaptioned, visibly.
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

    def text_caption(self, source: str) -> str:
        """The caption in ``<source name>.txt`` beside the video ("" when there is none)."""
        if self.text_dir is None:
            return ""
        path = self.text_dir / (Path(source).stem + CAPTION_SIDECAR_SUFFIX)
        try:
            return " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        except OSError:  # no file (the usual case), or unreadable: no caption, reported as uncaptioned
            return ""

    def fingerprint_for(self, source: str) -> str:
        """Hash of what captions ``source`` (its YAML entries and its text file); the file name is left out so a
        renamed copy still matches."""
        mine = sorted((e.start, e.end, e.caption) for e in self.entries if e.file == source)
        return "sidecar:" + hashlib.sha256(repr((mine, self.text_caption(source))).encode()).hexdigest()[:16]

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
        return best or self.text_caption(source)
