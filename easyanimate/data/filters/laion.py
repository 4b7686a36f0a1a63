"""LAION "improved aesthetic predictor": an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Weights only come from local paths: ``weights.aesthetic_clip`` (a transformers ``CLIPModel`` folder)
and ``weights.aesthetic_head`` (safetensors of the MLP, keys ``layers.{0,2,4,6,7}.{weight,bias}`` as
in the original ``sac+logos+ava1-l14-linearMSE`` checkpoint converted to safetensors).
"""

from __future__ import annotations

import threading

import numpy as np

from easyanimate.config import AestheticFilterConfig, WeightsConfig, resolve_weight_path
from easyanimate.data.filters import FilterResult

_CACHE: dict[tuple[str, str], "LaionAesthetic"] = {}
_LOCK = threading.Lock()


def _head(in_dim: int):
    from torch import nn

    # Same layout as the published predictor so its state dict loads unchanged.
    return nn.Sequential(
        nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


class LaionAesthetic:
    def __init__(self, clip_dir, head_path):
        import torch
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPModel

        self._torch = torch
        self.clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
        state = load_file(str(head_path))
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        in_dim = state["0.weight"].shape[1]
        if in_dim != self.clip.config.projection_dim:
            raise ValueError(
                f"weights.aesthetic_head expects {in_dim}-d embeddings but weights.aesthetic_clip projects to "
                f"{self.clip.config.projection_dim}"
            )
        self.head = _head(in_dim).eval()
        self.head.load_state_dict(state)

    @classmethod
    def from_weights(cls, weights: WeightsConfig) -> "LaionAesthetic":
        clip_dir = resolve_weight_path(weights.aesthetic_clip, "weights.aesthetic_clip")
        head = resolve_weight_path(weights.aesthetic_head, "weights.aesthetic_head")
        key = (str(clip_dir), str(head))
        with _LOCK:
            if key not in _CACHE:
                _CACHE[key] = cls(clip_dir, head)
            return _CACHE[key]

    def score_frames(self, frames: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
            emb = self.clip.get_image_features(pixel_values=pixels)
            if not isinstance(emb, torch.Tensor):  # some versions return a model output object
                emb = emb.pooler_output
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head(emb).squeeze(-1).float().numpy()


def laion_aesthetic(frames: np.ndarray, cfg: AestheticFilterConfig, weights: WeightsConfig) -> FilterResult:
    score = float(LaionAesthetic.from_weights(weights).score_frames(frames).mean())
    passed = score >= cfg.threshold
    return FilterResult(round(score, 4), passed, None if passed else "low_aesthetic")
