"""Caption retrieval: does a video generated for a training caption land nearest that caption's own clip?

The check that text conditioning and training work (issue: "closer, in latent MSE, to its own clip than to any
other clip for at least 3 of 4 captions"). For each distinct training caption the pipeline generates a video
(fixed seed) as latents; every training clip is encoded at the same geometry in windows of the generated length;
the distance from a generated video to a clip is the smallest latent MSE over that clip's windows (the model
was trained on random windows, so any of them is a fair target). A caption is a hit when its own clip(s) are
strictly nearest.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from easyanimate.config import Settings
from easyanimate.data.datasets import ClipFrames, to_model_range


@dataclass
class RetrievalResult:
    captions: list[str]
    clip_ids: list[str]
    distances: np.ndarray  # (captions, clips) latent MSE
    own: list[set[int]]  # per caption: indices of the clips that carry it

    @property
    def hits(self) -> list[bool]:
        out = []
        for row, own in zip(self.distances, self.own):
            others = [d for j, d in enumerate(row) if j not in own]
            out.append(bool(not others or min(row[j] for j in own) < min(others)))
        return out

    @property
    def rate(self) -> float:
        return float(np.mean(self.hits)) if self.captions else float("nan")

    def table(self) -> list[dict]:
        rows = []
        for caption, row, own, hit in zip(self.captions, self.distances, self.own, self.hits):
            nearest = int(np.argmin(row))
            rows.append(
                {
                    "caption": caption,
                    "hit": hit,
                    "own_mse": float(min(row[j] for j in own)),
                    "nearest_clip": self.clip_ids[nearest],
                    "nearest_mse": float(row[nearest]),
                }
            )
        return rows


@torch.no_grad()
def clip_windows(vae, clip: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Scaled posterior means of every non-overlapping ``num_frames`` window: (n, C, t, h, w)."""
    starts = range(0, clip.shape[0] - num_frames + 1, num_frames)
    windows = torch.stack([clip[s : s + num_frames] for s in starts])
    return vae.encode(to_model_range(windows)).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def caption_retrieval(settings: Settings, pipe, clips: list[ClipFrames]) -> RetrievalResult:
    """Generate one video per distinct caption of ``clips`` (already at the generated size) and measure it
    against every clip."""
    g = settings.generate
    by_caption: dict[str, set[int]] = defaultdict(set)
    for j, clip in enumerate(clips):
        if clip.caption:
            by_caption[clip.caption].add(j)
    captions = sorted(by_caption)[: settings.evaluate.retrieval_max_captions]
    usable = [j for j, c in enumerate(clips) if c.frames.shape[0] >= g.num_frames]
    if len(usable) != len(clips):
        short = [clips[j].clip_id for j in range(len(clips)) if j not in usable]
        raise ValueError(f"clips {short} have fewer than generate.num_frames={g.num_frames} frames")
    wrong = [c.clip_id for c in clips if tuple(c.frames.shape[-2:]) != (g.height, g.width)]
    if wrong:
        raise ValueError(f"clips {wrong} are not at the generated size {g.height}x{g.width}")
    targets = [clip_windows(pipe.vae, c.frames, g.num_frames) for c in clips]
    distances = np.zeros((len(captions), len(clips)))
    for i, caption in enumerate(captions):
        generator = torch.Generator().manual_seed(settings.evaluate.seed + i)
        latents = pipe(
            caption,
            generator=generator,
            output_type="latent",
            **settings.generate.pipeline_kwargs(settings.dit.model.max_text_tokens),
        ).frames[0]
        for j, windows in enumerate(targets):
            mse = ((windows - latents.unsqueeze(0).to(windows.dtype)) ** 2).flatten(1).mean(1)
            distances[i, j] = float(mse.min())
    return RetrievalResult(captions, [c.clip_id for c in clips], distances, [by_caption[c] for c in captions])
