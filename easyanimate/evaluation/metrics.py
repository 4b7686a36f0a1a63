"""Video quality metrics on uint8 frames (T, H, W, 3)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(reference, test, data_range=255))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean per-frame SSIM (frames are tiny in the tiny preset, so the window shrinks to fit)."""
    side = min(reference.shape[1], reference.shape[2])
    window = min(7, side if side % 2 else side - 1)
    return float(
        np.mean(
            [
                structural_similarity(r, t, channel_axis=-1, data_range=255, win_size=window)
                for r, t in zip(reference, test)
            ]
        )
    )


def flicker(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, in [0, 1]; 0 for a single frame."""
    if frames.shape[0] < 2:
        return 0.0
    diff = np.abs(np.diff(frames.astype(np.float32), axis=0))
    return float(diff.mean() / 255.0)
