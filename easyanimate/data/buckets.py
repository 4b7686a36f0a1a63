"""Aspect-ratio and frame-count buckets, as in PixArt / EasyAnimate training.

Square centre crops of 16:9 video throw away 44% of every frame and teach the model one shape. Instead each
clip goes to the bucket whose aspect ratio is nearest its own, is resized to *cover* that bucket and loses only
the small remainder to a centre crop. Bucket sizes hold about ``resolution**2`` pixels (the stage's compute
budget) and are multiples of what the latent model needs (VAE spatial compression x DiT patch size, x the
motion module's grid when it reshapes), so every bucket patchifies exactly.

Frame buckets do the same in time: a clip shorter than the stage's ``num_frames`` is cut into windows of the
largest allowed frame count it fills instead of being dropped from video batches.

Samples of different buckets cannot be stacked, so every batch is drawn from one bucket (:func:`draw_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from easyanimate.config import parse_aspect_ratio


def _round_to(value: float, multiple: int) -> int:
    # floor(x + 0.5), not round(): Python's banker's rounding would make 1.5 and 2.5 both round to 2.
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def bucket_size(aspect: float, pixels: int, multiple: int) -> tuple[int, int]:
    """``(height, width)`` with ``width / height ~ aspect`` and ``height * width ~ pixels``, both multiples."""
    height = math.sqrt(pixels / aspect)
    return _round_to(height, multiple), _round_to(height * aspect, multiple)


@dataclass(frozen=True)
class BucketTable:
    """The ``(height, width)`` sizes one training stage uses, in the order their aspect ratios were listed."""

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, resolution: int, aspect_ratios: Sequence[str], multiple: int) -> "BucketTable":
        if multiple < 1:
            raise ValueError(f"bucket size multiple must be >= 1, got {multiple}")
        if resolution < multiple:
            raise ValueError(f"resolution {resolution} is smaller than the bucket size multiple {multiple}")
        sizes: list[tuple[int, int]] = []
        for spec in aspect_ratios:
            size = bucket_size(parse_aspect_ratio(spec), resolution * resolution, multiple)
            if size not in sizes:  # nearby ratios can share a size at small budgets
                sizes.append(size)
        if not sizes:
            raise ValueError("no aspect-ratio buckets configured")
        return cls(tuple(sizes))

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        """The size whose aspect ratio is nearest ``width / height`` (in log space: 2:1 and 1:2 are equally far
        from 1:1); ties go to the earlier-listed bucket."""
        if height <= 0 or width <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        target = math.log(width / height)
        return min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - target))


def frame_buckets_for(num_frames: int, allowed: Sequence[int]) -> tuple[int, ...]:
    """The frame counts a stage samples videos at: ``allowed`` up to ``num_frames``, and ``num_frames`` itself."""
    return tuple(sorted({f for f in allowed if 1 < f <= num_frames} | {num_frames}))


def frame_bucket(length: int, buckets: Sequence[int]) -> int | None:
    """The largest bucket a ``length``-frame clip fills, or None if it is shorter than every bucket."""
    fitting = [b for b in buckets if b <= length]
    return max(fitting) if fitting else None


def group_indices(keys: Sequence[Hashable]) -> list[np.ndarray]:
    """Indices of equal keys, one array per key, keys in sorted order (so groups do not depend on input order)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [np.asarray(groups[k]) for k in sorted(groups)]


def draw_batch(groups: Sequence[np.ndarray], rng: np.random.Generator, batch_size: int) -> list[int]:
    """``batch_size`` indices from ONE group, so the samples stack.

    The group is drawn with probability proportional to its size, so every sample is equally likely overall,
    as without buckets. With a single group this draws exactly what ``rng.integers(n, size=batch_size)`` did
    before buckets existed, so unbucketed runs keep their batches.
    """
    if not groups:
        raise ValueError("no samples to draw a batch from")
    if len(groups) == 1:
        return [int(i) for i in groups[0][rng.integers(len(groups[0]), size=batch_size)]]
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    group = groups[int(rng.choice(len(groups), p=sizes / sizes.sum()))]
    return [int(i) for i in group[rng.integers(len(group), size=batch_size)]]
