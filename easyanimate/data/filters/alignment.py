"""Caption-video alignment: CLIP cosine similarity between the clip's caption and its sampled frames.

Needs the caption, so it runs after captioning (``needs_caption``), batched over the clips of a caption batch,
on the aesthetic filter's frames (same times: no extra decode). Weights: ``weights.aesthetic_clip`` (a
transformers ``CLIPModel`` folder with its tokenizer and image processor, the one the LAION scorer uses).
Without them the filter is skipped: its ``alignment`` column stays null and the run summary says why
(``summary/skipped_filters.csv``). Score = mean over frames of cos(text embedding, frame embedding); below
``alignment.min_score`` the clip is rejected (``low_alignment``).
"""

from __future__ import annotations

import numpy as np

from easyanimate.data.filters.base import ClipFilter, Column, uniform_times


class ClipTextImage:
    def __init__(self, model_dir, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self._torch = torch
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _features(out):
        import torch

        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def similarity(self, frames: list[np.ndarray], captions: list[str]) -> np.ndarray:
        """Mean cosine similarity of each caption with its clip's frames."""
        torch = self._torch
        with torch.inference_mode():
            flat = [f for clip in frames for f in clip]
            pixels = self.processor(images=flat, return_tensors="pt")["pixel_values"].to(self.device)
            img = self._features(self.model.get_image_features(pixel_values=pixels)).float()
            tok = self.tokenizer(
                captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            tok.pop("token_type_ids", None)
            txt = self._features(self.model.get_text_features(**tok)).float()
            img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out, i = [], 0
            for clip, t in zip(frames, txt):
                out.append(float((img[i : i + len(clip)] @ t).mean()))
                i += len(clip)
            return np.asarray(out)


class AlignmentFilter(ClipFilter):
    name = "alignment"
    columns = (Column("alignment", digits=4),)
    needs_caption = True

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.alignment
        self.num_frames = settings.curate.aesthetic.num_frames
        self._model_dir = None
        self._model = None
        spec = settings.weights.aesthetic_clip
        if spec:
            from easyanimate.config import resolve_weight_path

            self._model_dir = resolve_weight_path(spec, "weights.aesthetic_clip")

    @property
    def enabled(self) -> bool:
        return self._model_dir is not None

    @property
    def skip_reason(self) -> str | None:
        if self.enabled:
            return None
        return "no CLIP weights: set weights.aesthetic_clip to a local transformers CLIPModel folder"

    @property
    def uses_device(self) -> bool:
        return self.enabled

    @property
    def decode_side(self) -> int:
        return 224

    def sample_times(self, plan, info) -> list[float]:
        return uniform_times(plan.start_s, plan.end_s, self.num_frames)

    def setup(self, device: str) -> None:
        if self.enabled and self._model is None:
            self._model = ClipTextImage(self._model_dir, device)

    def score(self, frames: np.ndarray, caption: str | None = None) -> dict[str, float]:
        return self.score_captioned([frames], [caption or ""])[0]

    def score_captioned(self, frames: list[np.ndarray], captions: list[str]) -> list[dict[str, float]]:
        out = []
        bs = self.cfg.batch_size
        with self.lock:
            for i in range(0, len(frames), bs):
                sims = self._model.similarity(frames[i : i + bs], captions[i : i + bs])
                out += [{"alignment": float(s)} for s in sims]
        return out

    def accept(self, scores: dict[str, float]) -> str | None:
        return None if scores["alignment"] >= self.cfg.min_score else "low_alignment"

    def expectations(self) -> list:
        import great_expectations as gx

        # Only when computed (an enabled filter scores every captioned clip).
        return [gx.expectations.ExpectColumnValuesToBeBetween(column="alignment", min_value=self.cfg.min_score)]
