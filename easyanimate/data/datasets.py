"""Training and evaluation samples built from the curated manifest.

Each accepted clip is decoded once at the training resolution and frame rate and kept in memory as
a uint8 tensor; batches are drawn from it. Images are single frames of the same clips, so one model
learns from both (EasyAnimate treats an image as a one-frame video).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from easyanimate.data.manifest import read_manifest
from easyanimate.data.video_io import decode_frames


@dataclass
class ClipFrames:
    clip_id: str
    caption: str
    aesthetic: float
    frames: torch.Tensor  # uint8 (T, 3, H, W)


def _resize_keep_aspect(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def load_clip_frames(
    curated_dir: str | Path,
    split: str,
    resolution: int,
    sample_fps: float,
    min_aesthetic: float | None = None,
    max_seconds: float | None = None,
) -> list[ClipFrames]:
    """Decode the accepted clips of ``split`` as square ``resolution`` crops sampled at ``sample_fps``."""
    curated_dir = Path(curated_dir)
    manifest = read_manifest(curated_dir / "manifest.parquet")
    rows = manifest[(manifest["status"] == "accepted") & (manifest["split"] == split)]
    if min_aesthetic is not None:
        rows = rows[rows["aesthetic"] >= min_aesthetic]
    clips = []
    for row in rows.itertuples():
        duration = float(row.duration_s) if max_seconds is None else min(float(row.duration_s), max_seconds)
        times = list(np.arange(0.0, duration, 1.0 / sample_fps))
        size = _resize_keep_aspect(int(row.width), int(row.height), resolution)
        frames = decode_frames(curated_dir / row.clip_path, times=times, size=size)
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        top = (tensor.shape[2] - resolution) // 2
        left = (tensor.shape[3] - resolution) // 2
        tensor = tensor[:, :, top : top + resolution, left : left + resolution].contiguous()
        clips.append(ClipFrames(row.clip_id, row.caption or "", float(row.aesthetic), tensor))
    return clips


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., T, 3, H, W) -> float in [-1, 1] laid out (..., 3, T, H, W)."""
    x = frames.float().div(127.5).sub(1.0)
    return x.transpose(-4, -3)


class ClipSampler:
    """Draws reproducible batches: seeded per step, so a resumed run sees the same batches."""

    def __init__(self, clips: list[ClipFrames], num_frames: int, image_ratio: float, seed: int):
        if not clips:
            raise ValueError("no training clips: the curated manifest has no accepted clips for this split")
        self.clips = clips
        self.num_frames = num_frames
        self.image_ratio = image_ratio
        self.seed = seed
        self.video_clips = [c for c in clips if c.frames.shape[0] >= num_frames]
        if num_frames > 1 and image_ratio < 1 and not self.video_clips:
            raise ValueError(f"no clip has {num_frames} frames at the sampling rate; lower num_frames")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng([self.seed, step])
        as_images = self.num_frames == 1 or rng.random() < self.image_ratio
        pool = self.clips if as_images else self.video_clips
        length = 1 if as_images else self.num_frames
        samples, captions = [], []
        for _ in range(batch_size):
            clip = pool[rng.integers(len(pool))]
            start = int(rng.integers(clip.frames.shape[0] - length + 1))
            samples.append(clip.frames[start : start + length])
            captions.append(clip.caption)
        return to_model_range(torch.stack(samples)), captions
