"""LAION "improved aesthetic predictor": an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Weights only come from local paths: ``weights.aesthetic_clip`` (a transformers ``CLIPModel`` folder)
and ``weights.aesthetic_head`` (safetensors of the MLP, keys ``layers.{0,2,4,6,7}.{weight,bias}`` as
in the original ``sac+logos+ava1-l14-linearMSE`` checkpoint converted to safetensors). The aesthetic
filter builds one per worker in its ``setup``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _head(in_dim: int):
    from torch import nn

    # Same layout as the published predictor so its state dict loads unchanged.
    return nn.Sequential(
        nn.Linear(in_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class LaionAesthetic:
    def __init__(self, clip_dir: str | Path, head_path: str | Path, device: str = "cpu"):
        import torch
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPModel

        self._torch = torch
        self.device = torch.device(device)
        self.clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval().to(self.device)
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
        self.head.to(self.device)

    def score_frames(self, frames: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
            emb = self.clip.get_image_features(pixel_values=pixels)
            if not isinstance(emb, torch.Tensor):  # some versions return a model output object
                emb = emb.pooler_output
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head(emb).squeeze(-1).float().cpu().numpy()
