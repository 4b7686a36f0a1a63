"""Reconstruct a video file through a trained Slice VAE (what ``easyanimate vae reconstruct`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from easyanimate.models.vae.slice_vae import TEMPORAL_COMPRESSION, SliceVAE


def valid_length(available: int, wanted: int | None = None) -> int:
    """Longest SliceVAE-valid frame count <= min(available, wanted): 1, or a multiple of 4 that is >= 8."""
    n = available if wanted is None else min(available, wanted)
    if n < 1:
        raise ValueError("no frames to reconstruct")
    n -= n % TEMPORAL_COMPRESSION
    return n if n >= 2 * TEMPORAL_COMPRESSION else 1


def read_video_for_vae(path: str | Path, size: int, fps: float, frames: int | None, multiple: int) -> np.ndarray:
    """Frames of ``path`` sampled at ``fps``, short side scaled to ``size``, centre-cropped to multiples of
    ``multiple`` (the VAE's spatial compression), trimmed to a valid length. uint8 ``(T, H, W, 3)``."""
    from easyanimate.data.video_io import decode_frames, probe

    if size < multiple:
        raise ValueError(f"size must be >= {multiple} (the VAE's spatial compression); got {size}")
    info = probe(path)
    times = list(np.arange(0.0, info.duration_s, 1.0 / fps))
    if frames is not None:
        times = times[: valid_length(len(times), frames)]
    scale = size / min(info.width, info.height)
    w, h = max(size, round(info.width * scale)), max(size, round(info.height * scale))
    video = decode_frames(path, times=times, size=(w, h))
    ch, cw = h - h % multiple, w - w % multiple
    top, left = (h - ch) // 2, (w - cw) // 2
    video = video[: valid_length(len(video), frames), top : top + ch, left : left + cw]
    return np.ascontiguousarray(video)


def reconstruct_file(
    vae: SliceVAE,
    src: str | Path,
    dst: str | Path,
    size: int,
    fps: float,
    frames: int | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Write the VAE's reconstruction of ``src`` to ``dst`` (mp4); returns the input frames it used."""
    from easyanimate.data.video_io import write_video

    video = read_video_for_vae(src, size, fps, frames, vae.spatial_compression)
    recon = vae.reconstruct_video(video, callback=callback)
    write_video(recon, dst, fps=fps)
    return video
