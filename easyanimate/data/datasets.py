"""Training and evaluation samples built from the curated manifest.

Each accepted clip is decoded once at the training resolution and frame rate and kept in memory as
a uint8 tensor; batches are drawn from it. Images are single frames of the same clips, so one model
learns from both (EasyAnimate treats an image as a one-frame video).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from easyanimate.data.manifest import read_manifest, require_captions
from easyanimate.data.video_io import decode_frames

if TYPE_CHECKING:  # only a type: the VAE stages' code (and version) does not depend on DiT bucketing
    from easyanimate.data.buckets import BucketTable


@dataclass
class ClipFrames:
    clip_id: str
    caption: str
    aesthetic: float
    frames: torch.Tensor  # uint8 (T, 3, H, W)


def cover_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` to resize a ``height x width`` frame to so that it covers ``bucket`` with its aspect
    ratio kept; only the remainder along one side is then cropped away."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))


def center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre ``size=(h, w)`` crop of the last two dimensions."""
    h, w = size
    top, left = (frames.shape[-2] - h) // 2, (frames.shape[-1] - w) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {h}x{w} from frames of {frames.shape[-2]}x{frames.shape[-1]}")
    return frames[..., top : top + h, left : left + w]


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
    square_crop: bool = True,
    buckets: BucketTable | None = None,
) -> list[ClipFrames]:
    """Decode the accepted clips of ``split`` sampled at ``sample_fps``, short side scaled to ``resolution``.

    ``square_crop`` keeps the square centre; without it the whole frame is kept (aspect ratio preserved) so a
    sampler can take random crops. With ``buckets`` (whose sizes already encode the resolution) each clip is
    resized to cover the bucket nearest its aspect ratio and centre-cropped to it: no distortion, little loss.

    Every training and evaluation stage reads clips here, so this is where uncaptioned clips are refused: if any
    accepted clip of the manifest (any split) has no caption, ``manifest.UncaptionedClips`` names how many and
    how to caption them, before anything is decoded.
    """
    curated_dir = Path(curated_dir)
    manifest = read_manifest(curated_dir / "manifest.parquet")
    require_captions(manifest)
    rows = manifest[(manifest["status"] == "accepted") & (manifest["split"] == split)]
    if min_aesthetic is not None:
        rows = rows[rows["aesthetic"] >= min_aesthetic]
    clips = []
    for row in rows.itertuples():
        duration = float(row.duration_s) if max_seconds is None else min(float(row.duration_s), max_seconds)
        times = list(np.arange(0.0, duration, 1.0 / sample_fps))
        if buckets is not None:
            bucket = buckets.nearest(int(row.height), int(row.width))
            height, width = cover_size(int(row.height), int(row.width), bucket)
            frames = decode_frames(curated_dir / row.clip_path, times=times, size=(width, height))
            tensor = center_crop(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2), bucket)
            clips.append(ClipFrames(row.clip_id, row.caption or "", float(row.aesthetic), tensor.contiguous()))
            continue
        size = _resize_keep_aspect(int(row.width), int(row.height), resolution)
        frames = decode_frames(curated_dir / row.clip_path, times=times, size=size)
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if not square_crop:
            clips.append(ClipFrames(row.clip_id, row.caption or "", float(row.aesthetic), tensor.contiguous()))
            continue
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
    """Draws reproducible batches: seeded per step, so a resumed run sees the same batches.

    With ``crop_size`` each sample is a random ``crop_size`` square of its clip (clips may then differ in size,
    e.g. the same clip decoded at several scales), and ``hflip`` mirrors half of the samples: the augmentation
    that lets a convolutional VAE learn from a handful of clips without memorising them.
    """

    def __init__(
        self,
        clips: list[ClipFrames],
        num_frames: int,
        image_ratio: float,
        seed: int,
        crop_size: int | None = None,
        hflip: bool = False,
    ):
        if not clips:
            raise ValueError("no training clips: the curated manifest has no accepted clips for this split")
        if crop_size is not None:
            small = [c.clip_id for c in clips if min(c.frames.shape[-2:]) < crop_size]
            if small:
                raise ValueError(f"clips {small} are smaller than crop_size {crop_size}")
        self.clips = clips
        self.num_frames = num_frames
        self.image_ratio = image_ratio
        self.seed = seed
        self.crop_size = crop_size
        self.hflip = hflip
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
            sample = clip.frames[start : start + length]
            if self.crop_size is not None:
                top = int(rng.integers(sample.shape[-2] - self.crop_size + 1))
                left = int(rng.integers(sample.shape[-1] - self.crop_size + 1))
                sample = sample[..., top : top + self.crop_size, left : left + self.crop_size]
            if self.hflip and rng.random() < 0.5:
                sample = sample.flip(-1)
            samples.append(sample)
            captions.append(clip.caption)
        return to_model_range(torch.stack(samples)), captions
