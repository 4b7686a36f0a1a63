"""Vision-language captioner loaded from a local folder (``weights.captioner``); never downloads.

Works with image-captioning models that ``AutoModelForImageTextToText`` loads (BLIP-style; chat
VLMs whose processor has a chat template get ``caption.prompt`` as the instruction). Every sampled
frame is captioned and the clip caption is the caption produced most often, ties going to the frame
nearest the middle: a cheap vote that drops captions of a single odd frame. ``caption_clips`` pools
the frames of several clips so each ``generate`` call gets a full batch of ``caption.batch_size``.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np

from easyanimate.config import CaptionConfig, resolve_weight_path


_CACHE: dict[tuple[str, str], "VLMCaptioner"] = {}
_LOCK = threading.Lock()


class VLMCaptioner:
    def __init__(self, model_dir: str | Path, cfg: CaptionConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise FileNotFoundError(f"weights.captioner={str(model_dir)!r}: no such folder; fix weights.captioner")
        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
        self._torch = torch
        self._chat = bool(getattr(self.processor, "chat_template", None))

    @classmethod
    def from_settings(cls, settings) -> "VLMCaptioner":
        """One model per (folder, caption settings) per process: curate_video may be called per video."""
        path = resolve_weight_path(settings.weights.captioner, "weights.captioner")
        key = (str(path), settings.curate.caption.model_dump_json())
        with _LOCK:
            if key not in _CACHE:
                _CACHE[key] = cls(path, settings.curate.caption)
            return _CACHE[key]

    def _inputs(self, images: list[np.ndarray]):
        if self._chat:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.cfg.prompt}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
            return self.processor(images=[[im] for im in images], text=[text] * len(images), return_tensors="pt", padding=True)
        return self.processor(images=images, return_tensors="pt")

    def caption_frames(self, frames: np.ndarray) -> list[str]:
        out: list[str] = []
        bs = self.cfg.batch_size
        with self._torch.inference_mode():
            for i in range(0, len(frames), bs):
                inputs = self._inputs(list(frames[i : i + bs]))
                ids = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
                if self._chat:  # chat models echo the prompt; keep only new tokens
                    ids = ids[:, inputs["input_ids"].shape[1] :]
                out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out

    def caption_clips(self, requests) -> list[str]:
        """One caption per ``CaptionRequest``; frames of all clips share ``generate`` batches."""
        frames = [f for req in requests for f in req.frames]
        caps = self.caption_frames(np.stack(frames)) if frames else []
        out, i = [], 0
        for req in requests:
            out.append(self._vote(caps[i : i + len(req.frames)]))
            i += len(req.frames)
        return out

    def __call__(self, source: str, start_s: float, end_s: float, frames: np.ndarray) -> str:
        return self._vote(self.caption_frames(frames))

    @staticmethod
    def _vote(caps: list[str]) -> str:
        if not caps:
            return ""
        counts = Counter(c for c in caps if c)
        if not counts:
            return ""
        top = max(counts.values())
        mid = (len(caps) - 1) / 2
        winners = [i for i, c in enumerate(caps) if c and counts[c] == top]
        return caps[min(winners, key=lambda i: abs(i - mid))]
