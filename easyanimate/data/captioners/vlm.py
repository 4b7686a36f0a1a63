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
from easyanimate.data.captioners.base import Captioner


class VLMCaptioner(Captioner):
    name = "vlm"
    uses_device = True

    def __init__(self, model_dir: str | Path, cfg: CaptionConfig):
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise FileNotFoundError(f"weights.captioner={str(model_dir)!r}: no such folder; fix weights.captioner")
        self.model_dir, self.cfg = model_dir, cfg
        self.frames_per_clip = cfg.num_frames
        self.processor = self.model = None
        self.lock = threading.Lock()  # one model per worker, shared by its threads

    @classmethod
    def from_settings(cls, settings) -> "VLMCaptioner":
        return cls(resolve_weight_path(settings.weights.captioner, "weights.captioner"), settings.curate.caption)

    def setup(self, device: str) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._torch = torch
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_dir, local_files_only=True).eval()
        self.model.to(self.device)
        self._chat = bool(getattr(self.processor, "chat_template", None))

    def _inputs(self, images: list[np.ndarray]):
        if self._chat:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.cfg.prompt}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
            inputs = self.processor(
                images=[[im] for im in images], text=[text] * len(images), return_tensors="pt", padding=True
            )
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        return inputs.to(self.device)

    def caption_frames(self, frames: np.ndarray) -> list[str]:
        if self.model is None:
            raise RuntimeError("VLMCaptioner.setup(device) must run before captioning")
        out: list[str] = []
        bs = self.cfg.batch_size
        with self.lock, self._torch.inference_mode():
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
