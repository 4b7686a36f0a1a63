"""Image embeddings from a local transformers folder (``weights.frame_embedding``): CLIP or DINOv2.

A ``CLIPModel`` folder gives its projected image features; a vision-only model (``CLIPVisionModel``,
``Dinov2Model``, other ViTs) its pooled output (the CLS token when it has no pooler). Embeddings are
L2-normalised float32 numpy arrays. Weights come only from the local path; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _tensor(out):
    """Features from whatever the model returned (a tensor, or an output object in some versions)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return out.last_hidden_state[:, 0]


class ImageEmbedder:
    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self._torch = torch
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval().to(self.device)

    def embed(self, frames: np.ndarray | list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
            if hasattr(self.model, "get_image_features"):
                emb = _tensor(self.model.get_image_features(pixel_values=pixels))
            else:
                emb = _tensor(self.model(pixel_values=pixels))
            emb = emb.float()
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return emb.cpu().numpy()
