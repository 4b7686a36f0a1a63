"""Slice VAE: a MagViT-style causal 3D-conv video VAE (EasyAnimate, arXiv 2405.18991, Sec. 2.2).

Compression is 8x spatial and 4x temporal. An image (T=1) is encoded to one latent frame and decoded back to
one frame, so the same VAE serves image and video training.

Causality: every 3D conv pads time only from the past (the first frame is replicated, so an image and frame 0
of a video see identical context) and GroupNorm runs per frame, so latent/output frame t never depends on later
frames.

Temporal striding is *end-aligned*: a stride-2 conv with kernel 3 gets ``kernel - stride = 1`` frame of past
padding (plus one more when the length is odd, i.e. only for an image), so output ``i`` covers input frames
``2i-1 .. 2i+1``. This still yields ``ceil(T/2)`` outputs (1 -> 1), but unlike padding 2 frames it lets the last
frames of a clip reach a latent: latent ``k`` sees frames ``<= 4k+3`` and decodes to frames ``4k .. 4k+3``.

Slicing with feature sharing: with ``use_slicing`` the encoder walks time in slices of ``encoder_slice_frames``
frames and the decoder in slices of ``decoder_slice_latents`` latents. Each causal conv caches the last
``kernel_t - stride_t`` frames of its (padded) input and prepends them to the next slice instead of padding. As
slice starts are multiples of the total temporal stride, the sliced pass is numerically the unsliced one, with
activation memory bounded by the slice size.

Spatial tiling (off by default; ``enable_tiling()`` as in diffusers' ``AutoencoderKL``) bounds memory in space for
frames larger than ``tile_sample_size``: the frame is cut into overlapping latent-aligned tiles, each tile runs the
whole time-sliced encode (or decode) with its own causal caches, and tiles are blended with linear ramps across
their overlaps. Unlike slicing this is not exact: a tile's convs see zero padding instead of their neighbours and
its per-frame GroupNorm statistics are the tile's, not the frame's; the overlap blend hides the resulting seams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

from easyanimate.config import VAE_TEMPORAL_COMPRESSION, frame_count_problem

__all__ = ["SliceVAE", "CausalConv3d", "TEMPORAL_COMPRESSION"]

TEMPORAL_COMPRESSION = VAE_TEMPORAL_COMPRESSION  # the one frame rule lives in config.frame_count_problem


class CausalConv3d(nn.Conv3d):
    """Conv3d with past-only temporal padding and an optional cross-slice feature cache."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        st, sh, sw = (stride,) * 3 if isinstance(stride, int) else stride
        if kt < st:
            raise ValueError("temporal kernel must be >= temporal stride")
        # Spatial padding is symmetric and done by the conv; temporal padding is done by hand in forward().
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=(st, sh, sw), padding=(0, kh // 2, kw // 2))
        # Frames of past context an output needs at a stride-aligned slice boundary.
        self.keep_frames = kt - st
        self._cache_enabled = False
        self._cache: torch.Tensor | None = None

    def _reset_cache(self, enabled: bool = False) -> None:
        self._cache_enabled = enabled
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.stride[0]
        if self._cache_enabled and self._cache is not None:
            # Continuation slice: real past frames replace the padding, which is only exact on stride boundaries.
            if x.shape[2] % st:
                raise RuntimeError(f"slice of {x.shape[2]} frames is not a multiple of temporal stride {st}")
            x = torch.cat([self._cache, x], dim=2)
        else:
            # Odd lengths (an image) get extra padding so there are ceil(T/stride) outputs, the last ending at T-1.
            pad = self.keep_frames + (-x.shape[2]) % st
            if pad:
                x = torch.cat([x[:, :, :1].expand(-1, -1, pad, -1, -1), x], dim=2)
        if self._cache_enabled and self.keep_frames:
            # clone() so the cache does not pin the whole concatenated slice in memory.
            self._cache = x[:, :, -self.keep_frames :].clone()
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # PyTorch's heuristic sends small-batch Conv3d (N*C*T*H <= 20480) to the im2col slow_conv3d kernel,
            # 3-7x slower than oneDNN on CPU at these sizes; call oneDNN directly (autograd supported).
            return torch.ops.aten.mkldnn_convolution(
                x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
        return super().forward(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame separately, so statistics never mix frames (causal + slice-exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin, eps=1e-6)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.norm2 = FrameGroupNorm(groups, cout, eps=1e-6)
        self.conv2 = CausalConv3d(cout, cout, 3)
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample3d(nn.Module):
    """Stride-2 spatial conv, optionally also stride-2 causal in time."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Nearest x2 spatial (and x2 temporal by frame repetition) followed by a causal conv.

    The conv already maps to the next (narrower) level's width: it runs at the upsampled resolution, so doing
    the channel reduction here instead of in the next resblock roughly halves the decoder's cost.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, is_image: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2.0, mode="nearest")
        x = x.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2)
        # Latent k -> frames 2k, 2k+1: per-frame, so it slices exactly. An image stays one frame.
        if self.temporal and not is_image:
            x = x.repeat_interleave(2, dim=2)
        return self.conv(x)


def _causal_convs(module: nn.Module) -> list[CausalConv3d]:
    return [m for m in module.modules() if isinstance(m, CausalConv3d)]


def _checkpoint_with_cache(module: nn.Module, *args):
    """Gradient checkpoint `module(*args)` while keeping the causal-conv caches consistent.

    The backward recompute runs later, when caches hold other slices' frames (or are reset), so the recompute is
    given the cache state seen by the original forward and the live state is restored afterwards.
    """
    convs = _causal_convs(module)
    before = [(c._cache_enabled, c._cache) for c in convs]
    calls = [0]

    def run(*inner):
        live = [(c._cache_enabled, c._cache) for c in convs]
        for c, (en, cache) in zip(convs, before):
            c._cache_enabled, c._cache = en, cache
        try:
            return module(*inner)
        finally:
            # The first call is the real forward whose cache updates must stick; recomputes must not leak.
            if calls[0] > 0:
                for c, (en, cache) in zip(convs, live):
                    c._cache_enabled, c._cache = en, cache
            calls[0] += 1

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class _Stage(nn.Module):
    """Resblocks followed by an optional resampler; the unit of gradient checkpointing."""

    def __init__(self, blocks: list[nn.Module], sampler: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.sampler = sampler

    def forward(self, x: torch.Tensor, is_image: bool = False) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if isinstance(self.sampler, Upsample3d):
            x = self.sampler(x, is_image)
        elif self.sampler is not None:
            x = self.sampler(x)
        return x


def _temporal_levels(n_resample: int) -> set[int]:
    # The two temporal x2 steps go in the two lowest-resolution resampling stages (as in MagViT-v2), keeping
    # full frame rate where spatial detail is highest.
    return set(range(n_resample - 2, n_resample))


class Encoder3d(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.gradient_checkpointing = False
        chs = list(block_out_channels)
        self.conv_in = CausalConv3d(in_channels, chs[0], 3)
        temporal = _temporal_levels(len(chs) - 1)
        stages, cin = [], chs[0]
        for i, c in enumerate(chs):
            blocks = [ResBlock3d(cin if j == 0 else c, c, groups) for j in range(layers_per_block)]
            sampler = Downsample3d(c, i in temporal) if i < len(chs) - 1 else None
            stages.append(_Stage(blocks, sampler))
            cin = c
        self.down = nn.ModuleList(stages)
        self.mid = _Stage([ResBlock3d(cin, cin, groups), ResBlock3d(cin, cin, groups)], None)
        self.norm_out = FrameGroupNorm(groups, cin, eps=1e-6)
        self.conv_out = CausalConv3d(cin, out_channels, 3)

    def _call(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpoint_with_cache(stage, x)
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            x = self._call(stage, x)
        x = self._call(self.mid, x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder3d(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.gradient_checkpointing = False
        chs = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(in_channels, chs[0], 3)
        self.mid = _Stage([ResBlock3d(chs[0], chs[0], groups), ResBlock3d(chs[0], chs[0], groups)], None)
        n_up = len(chs) - 1
        # Mirror the encoder: its last temporal downsample is undone by the first upsample.
        temporal = {n_up - 1 - i for i in _temporal_levels(n_up)}
        stages, cin = [], chs[0]
        for i, c in enumerate(chs):
            blocks = [ResBlock3d(cin if j == 0 else c, c, groups) for j in range(layers_per_block + 1)]
            sampler = Upsample3d(c, chs[i + 1], i in temporal) if i < n_up else None
            stages.append(_Stage(blocks, sampler))
            cin = chs[i + 1] if i < n_up else c
        self.up = nn.ModuleList(stages)
        self.norm_out = FrameGroupNorm(groups, cin, eps=1e-6)
        self.conv_out = CausalConv3d(cin, out_channels, 3)

    def _call(self, stage: nn.Module, x: torch.Tensor, is_image: bool) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpoint_with_cache(stage, x, is_image)
        return stage(x, is_image)

    def forward(self, z: torch.Tensor, is_image: bool) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._call(self.mid, x, is_image)
        for stage in self.up:
            x = self._call(stage, x, is_image)
        return self.conv_out(F.silu(self.norm_out(x)))


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Full-size ``tile`` spans covering ``[0, length)`` with at least ``overlap`` shared positions between
    neighbours, spread evenly from edge to edge (no small remainder tile with little context)."""
    if length <= tile:
        return [(0, length)]
    n = -(-(length - overlap) // (tile - overlap))
    return [(s, s + tile) for s in (round(k * (length - tile) / (n - 1)) for k in range(n))]


def _axis_weights(spans: list[tuple[int, int]], scale: int) -> torch.Tensor:
    """Per-tile blend weights along one axis at ``scale`` x the span units: (n_tiles, length * scale).

    Each tile ramps linearly up across its overlap with the previous tile and down across its overlap with the
    next one, so two neighbours sum to 1 in their overlap; weights are > 0 on the whole span so any overlap
    pattern normalises. Zero outside the span.
    """
    length = spans[-1][1] * scale
    weights = torch.zeros(len(spans), length, dtype=torch.float64)
    for k, (start, end) in enumerate(spans):
        pos = torch.arange((end - start) * scale, dtype=torch.float64) + 0.5
        w = torch.ones_like(pos)
        if k > 0:
            up = (spans[k - 1][1] - start) * scale
            w = w * (pos / up).clamp(max=1.0)
        if k < len(spans) - 1:
            down = (end - spans[k + 1][0]) * scale
            w = w * ((pos.flip(0)) / down).clamp(max=1.0)
        weights[k, start * scale : end * scale] = w
    return weights


class _TileGrid:
    """Overlapping spatial tiles of a latent grid and the weights that blend them into one seamless result.

    Tiles are visited row-major and blended *sequentially* into the destination: ``dst = lerp(dst, tile, alpha)``
    with ``alpha = w_tile / (sum of the weights of the tiles written so far)``. After the last tile every
    position holds the normalised weighted average ``sum(w * tile) / sum(w)``, without a weight buffer and
    without keeping earlier tiles: each tile can be streamed straight into a preallocated (even uint8) output.
    The weights are separable (``w = a_row(y) * b_col(x)``), so the running sum after tile (i, j) is
    ``sum_{r<i} a_r(y) * sum_c b_c(x) + a_i(y) * sum_{c<=j} b_c(x)``.
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int):
        self.rows = _tile_spans(height, tile, overlap)
        self.cols = _tile_spans(width, tile, overlap)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def __iter__(self) -> Iterator[tuple[int, int, slice, slice]]:
        for i, (y0, y1) in enumerate(self.rows):
            for j, (x0, x1) in enumerate(self.cols):
                yield i, j, slice(y0, y1), slice(x0, x1)

    def alphas(self, scale: int = 1) -> dict[tuple[int, int], torch.Tensor | None]:
        """``alpha`` per tile, (tile_h * scale, tile_w * scale) float64; None where it is 1 everywhere."""
        a, b = _axis_weights(self.rows, scale), _axis_weights(self.cols, scale)
        a_before = torch.cat([torch.zeros_like(a[:1]), torch.cumsum(a, 0)[:-1]])
        b_total, b_through = b.sum(0), torch.cumsum(b, 0)
        out = {}
        for i, j, ys, xs in self:
            ys, xs = slice(ys.start * scale, ys.stop * scale), slice(xs.start * scale, xs.stop * scale)
            written = a_before[i, ys, None] * b_total[None, xs] + a[i, ys, None] * b_through[j, None, xs]
            alpha = a[i, ys, None] * b[j, None, xs] / written
            out[(i, j)] = None if bool((alpha == 1).all()) else alpha
        return out


def _scaled(span: slice, factor: int) -> slice:
    return slice(span.start * factor, span.stop * factor)


def _blend_into(dst: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor | None) -> None:
    """One sequential blend step of ``_TileGrid`` (``alpha`` broadcasts over the trailing (H, W) of ``dst``)."""
    if alpha is None:
        dst.copy_(tile)
    else:
        dst.lerp_(tile, alpha.to(device=tile.device, dtype=tile.dtype))


def _block_means(x: torch.Tensor, spatial: int) -> torch.Tensor:
    """Mean of each latent cell's pixels: ``spatial`` x ``spatial`` per frame, then the 4 frames a latent frame
    decodes to (a video's latent k covers frames 4k..4k+3; an image is its own latent frame). Exact under slicing:
    slices start on multiples of 4 frames."""
    b, c, t, h, w = x.shape
    x = F.avg_pool2d(x.transpose(1, 2).reshape(b * t, c, h, w), spatial).reshape(b, t, c, h // spatial, w // spatial)
    if t > 1:
        x = x.reshape(b, t // TEMPORAL_COMPRESSION, TEMPORAL_COMPRESSION, c, h // spatial, w // spatial).mean(2)
    return x.transpose(1, 2)


def _temporal_ramp(like: torch.Tensor) -> torch.Tensor:
    """Unit-norm, zero-mean linear ramp over the 4 frames of a latent frame, shaped to broadcast over (B, 1, 4, ...)."""
    ramp = torch.arange(TEMPORAL_COMPRESSION, dtype=like.dtype, device=like.device) - (TEMPORAL_COMPRESSION - 1) / 2
    return (ramp / ramp.norm()).view(1, 1, TEMPORAL_COMPRESSION, 1, 1, 1)


def _block_slopes(x: torch.Tensor, spatial: int) -> torch.Tensor:
    """(B, 1, T/4, h, w): each cell's luminance projected on the temporal ramp of its latent frame's 4 frames,
    i.e. how much it brightens or darkens across them (motion seen at block scale). Zero for an image."""
    b, c, t, h, w = x.shape
    if t == 1:
        return x.new_zeros(b, 1, 1, h // spatial, w // spatial)
    luma = F.avg_pool2d(x.mean(1).reshape(b * t, 1, h, w), spatial).reshape(
        b, 1, t // TEMPORAL_COMPRESSION, TEMPORAL_COMPRESSION, h // spatial, w // spatial
    )
    return (luma * _temporal_ramp(x).transpose(2, 3)).sum(3)


def _upsample_cells(z: torch.Tensor, spatial: int) -> torch.Tensor:
    b, c, t, h, w = z.shape
    return (
        F.interpolate(
            z.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=float(spatial), mode="bilinear", align_corners=False
        )
        .reshape(b, t, c, h * spatial, w * spatial)
        .transpose(1, 2)
    )


def _expand_means(z: torch.Tensor, spatial: int, is_image: bool) -> torch.Tensor:
    """Inverse of _block_means up to detail: bilinear in space per frame, each latent frame held for its 4 frames
    (nothing from later latents, so decoding stays causal and slice-exact)."""
    y = _upsample_cells(z, spatial)
    return y if is_image else y.repeat_interleave(TEMPORAL_COMPRESSION, dim=2)


def _expand_slopes(slopes: torch.Tensor, spatial: int, is_image: bool) -> torch.Tensor:
    """Inverse of _block_slopes for every colour channel alike: bilinear in space, the ramp over the 4 frames."""
    if is_image:
        return torch.zeros_like(_upsample_cells(slopes, spatial))
    y = _upsample_cells(slopes, spatial)  # (B, 1, T/4, H, W)
    b, _, t, h, w = y.shape
    return (y.unsqueeze(3) * _temporal_ramp(y).transpose(2, 3)).reshape(b, 1, t * TEMPORAL_COMPRESSION, h, w)


class SliceVAE(ModelMixin, ConfigMixin, AutoencoderMixin):
    """Causal 3D video VAE with slice-wise encoding/decoding and cross-slice feature sharing.

    `encode`/`decode` do not apply `scaling_factor`; like diffusers' AutoencoderKL, callers multiply latents by
    `config.scaling_factor` before the diffusion model and divide before `decode`.

    Runtime switches follow diffusers' autoencoders: ``use_slicing`` (on; ``enable_slicing``/``disable_slicing``, or
    per call via ``use_slicing=``) and ``use_tiling`` (off; ``enable_tiling``/``disable_tiling``). Tile geometry
    comes from the config (``tile_sample_size``, ``tile_overlap_factor``) into the diffusers-named attributes
    ``tile_sample_min_size`` and ``tile_overlap_factor``, which may be changed at run time.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
        layers_per_block: int = 1,
        norm_groups: int = 8,
        scaling_factor: float = 0.18215,
        encoder_slice_frames: int = 8,
        decoder_slice_latents: int = 2,
        tile_sample_size: int = 256,
        tile_overlap_factor: float = 0.25,
        pixel_shortcut: bool = False,
        pixel_shortcut_motion: bool = False,
    ):
        super().__init__()
        if pixel_shortcut and latent_channels < in_channels:
            raise ValueError(f"pixel_shortcut needs latent_channels >= in_channels ({in_channels})")
        if pixel_shortcut_motion and not (pixel_shortcut and latent_channels > in_channels):
            raise ValueError(
                f"pixel_shortcut_motion needs pixel_shortcut and latent_channels > in_channels ({in_channels})"
            )
        if len(block_out_channels) < 3:
            raise ValueError("block_out_channels needs >= 3 levels: two resampling stages carry the 4x temporal factor")
        if encoder_slice_frames <= 0 or encoder_slice_frames % TEMPORAL_COMPRESSION:
            # Slice starts must fall on the total temporal stride for the cached pass to equal the full one.
            raise ValueError(f"encoder_slice_frames must be a positive multiple of {TEMPORAL_COMPRESSION}")
        if decoder_slice_latents <= 0:
            raise ValueError("decoder_slice_latents must be positive")
        self.gradient_checkpointing = False
        self.use_slicing = True
        self.use_tiling = False
        self.tile_sample_min_size = tile_sample_size
        self.tile_overlap_factor = tile_overlap_factor
        self._check_tiling()
        self.encoder = Encoder3d(in_channels, 2 * latent_channels, block_out_channels, layers_per_block, norm_groups)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)
        self.decoder = Decoder3d(latent_channels, in_channels, block_out_channels, layers_per_block, norm_groups)

    # Config keys that change how (not what) the model computes: slicing is exact and tiling is off by default.
    EXECUTION_CONFIG_KEYS = frozenset(
        {"encoder_slice_frames", "decoder_slice_latents", "tile_sample_size", "tile_overlap_factor"}
    )

    @torch.no_grad()
    def latent_space_id(self) -> str:
        """sha256 of everything that decides the scaled latents: the encoder-side weights and the config (scaling
        factor included). DiTs trained on VAEs with different ids live in different latent spaces, so their
        latent-space metrics (the DiT validation loss) cannot be compared."""
        digest = hashlib.sha256()
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in self.EXECUTION_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True, default=list).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith(("encoder.", "quant_conv.")):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def init_posterior_logvar(self, logvar: float) -> None:
        """Make the posterior log-variance a constant ``logvar`` (for training from scratch; it stays learnable)."""
        half = self.config.latent_channels
        self.quant_conv.weight[half:].zero_()
        self.quant_conv.bias[half:].fill_(logvar)

    # ----------------------------------------------------------------- geometry
    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        return TEMPORAL_COMPRESSION

    @property
    def tile_latent_min_size(self) -> int:
        return self.tile_sample_min_size // self.spatial_compression

    def _check_tiling(self) -> None:
        size, factor = self.tile_sample_min_size, self.tile_overlap_factor
        if size <= 0 or size % self.spatial_compression:
            raise ValueError(f"tile_sample_size must be a positive multiple of {self.spatial_compression}; got {size}")
        # Above 1/2 a third tile could overlap the first; more overlap buys nothing the ramps do not already give.
        if not 0 <= factor <= 0.5:
            raise ValueError(f"tile_overlap_factor must be in [0, 0.5]; got {factor}")

    def _tile_grid(self, latent_height: int, latent_width: int) -> _TileGrid | None:
        """Tiles for a latent of this size, or None when tiling is off or the frame fits in one tile."""
        if not self.use_tiling:
            return None
        self._check_tiling()
        tile = self.tile_latent_min_size
        if latent_height <= tile and latent_width <= tile:
            return None
        # Any overlap asked for is at least one latent (round(0.5) would give none: hard seams).
        overlap = max(1, round(tile * self.tile_overlap_factor)) if self.tile_overlap_factor > 0 else 0
        return _TileGrid(latent_height, latent_width, tile, min(overlap, tile - 1))

    @staticmethod
    def check_num_frames(num_frames: int) -> None:
        t = int(num_frames)
        if frame_count_problem(t):
            raise ValueError(
                f"SliceVAE needs num_frames == 1 (image) or a multiple of {TEMPORAL_COMPRESSION} that is >= "
                f"{2 * TEMPORAL_COMPRESSION} (video); got {t}"
            )

    @staticmethod
    def latent_num_frames(num_frames: int) -> int:
        SliceVAE.check_num_frames(num_frames)
        return 1 if num_frames == 1 else num_frames // TEMPORAL_COMPRESSION

    def _check_input(self, x: torch.Tensor, name: str, channels: int, spatial_multiple: int) -> None:
        if x.ndim != 5:
            raise ValueError(f"{name} must be (B, C, T, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels; got {x.shape[1]}")
        h, w = x.shape[-2:]
        if h % spatial_multiple or w % spatial_multiple or h == 0 or w == 0:
            raise ValueError(f"{name} height/width must be positive multiples of {spatial_multiple}; got {h}x{w}")

    @contextlib.contextmanager
    def _feature_cache(self, *modules: nn.Module) -> Iterator[None]:
        """Enable cross-slice caches for the given modules; always cleared on exit so no state leaks."""
        convs = [c for m in modules for c in _causal_convs(m)]
        for c in convs:
            c._reset_cache(enabled=True)
        try:
            yield
        finally:
            for c in convs:
                c._reset_cache(enabled=False)

    # ------------------------------------------------------------------ encode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(x))
        if self.config.pixel_shortcut:
            # The first latent channels carry the block means of the pixels; the network learns the residual.
            shortcut = _block_means(x, self.spatial_compression)
            if self.config.pixel_shortcut_motion:
                shortcut = torch.cat([shortcut, _block_slopes(x, self.spatial_compression)], dim=1)
            n = shortcut.shape[1]
            moments = torch.cat([moments[:, :n] + shortcut, moments[:, n:]], dim=1)
        return moments

    def _encode_frames(self, x: torch.Tensor, use_slicing: bool) -> torch.Tensor:
        t, step = x.shape[2], self.config.encoder_slice_frames
        if not use_slicing or t <= step:
            return self._encode(x)
        with self._feature_cache(self.encoder):
            return torch.cat([self._encode(x[:, :, i : i + step]) for i in range(0, t, step)], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True, use_slicing: bool | None = None):
        """Latent distribution of ``x`` in [-1, 1]; ``use_slicing=None`` follows ``self.use_slicing``."""
        self._check_input(x, "x", self.config.in_channels, self.spatial_compression)
        self.check_num_frames(x.shape[2])
        use_slicing = self.use_slicing if use_slicing is None else use_slicing
        sc = self.spatial_compression
        grid = self._tile_grid(x.shape[-2] // sc, x.shape[-1] // sc)
        if grid is None:
            moments = self._encode_frames(x, use_slicing)
        else:
            moments, alphas = None, grid.alphas()
            for i, j, ys, xs in grid:
                tile = self._encode_frames(x[..., _scaled(ys, sc), _scaled(xs, sc)], use_slicing)
                if moments is None:
                    moments = tile.new_zeros(*tile.shape[:3], x.shape[-2] // sc, x.shape[-1] // sc)
                _blend_into(moments[..., ys, xs], tile, alphas[i, j])
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # ------------------------------------------------------------------ decode
    def _decode(self, z: torch.Tensor, is_image: bool) -> torch.Tensor:
        sample = self.decoder(self.post_quant_conv(z), is_image)
        if self.config.pixel_shortcut:
            c, sc = self.config.in_channels, self.spatial_compression
            sample = sample + _expand_means(z[:, :c], sc, is_image)
            if self.config.pixel_shortcut_motion:
                sample = sample + _expand_slopes(z[:, c : c + 1], sc, is_image)
        return sample

    def _decode_latents(self, z: torch.Tensor, is_image: bool, use_slicing: bool) -> torch.Tensor:
        t, step = z.shape[2], self.config.decoder_slice_latents
        if not use_slicing or t <= step:
            return self._decode(z, is_image)
        with self._feature_cache(self.decoder):
            return torch.cat([self._decode(z[:, :, i : i + step], is_image) for i in range(0, t, step)], dim=2)

    def decode(self, z: torch.Tensor, return_dict: bool = True, use_slicing: bool | None = None):
        """Frames in [-1, 1] from latents ``z``; ``use_slicing=None`` follows ``self.use_slicing``."""
        self._check_input(z, "z", self.config.latent_channels, 1)
        if z.shape[2] < 1:
            raise ValueError("z must have at least one latent frame")
        # Image vs video is a property of the whole latent, never of a slice (a 1-latent tail slice is video).
        is_image = z.shape[2] == 1
        use_slicing = self.use_slicing if use_slicing is None else use_slicing
        sc = self.spatial_compression
        grid = self._tile_grid(z.shape[-2], z.shape[-1])
        if grid is None:
            sample = self._decode_latents(z, is_image, use_slicing)
        else:
            sample, alphas = None, grid.alphas(sc)
            for i, j, ys, xs in grid:
                tile = self._decode_latents(z[..., ys, xs], is_image, use_slicing)
                if sample is None:
                    sample = tile.new_zeros(*tile.shape[:3], z.shape[-2] * sc, z.shape[-1] * sc)
                _blend_into(sample[..., _scaled(ys, sc), _scaled(xs, sc)], tile, alphas[i, j])
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    # --------------------------------------------------------------- streaming
    @torch.no_grad()
    def reconstruct_video(
        self,
        frames: np.ndarray,
        out: np.ndarray | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Encode then decode uint8 ``(T, H, W, 3)`` frames slice by slice, writing into uint8 ``out``.

        Only one encoder slice of float input and one decoder slice of float output exist at a time, so peak
        memory beyond the uint8 frames themselves (and the latents, 1/24 of their size) does not grow with T. With
        tiling enabled and frames larger than the tile, those slices are also cut to one spatial tile: each tile
        runs all its time slices (its own causal caches), and decoded tiles are blended straight into ``out``
        (``_TileGrid``), so memory stays bounded in space too. Uses the posterior mode. ``callback(done, total)``
        counts slices (encoder and decoder, per tile) for progress bars. Same result as
        ``decode(encode(x).mode())`` up to one uint8 level (tiled: blending reads back already-rounded pixels).
        """
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"frames must be uint8 (T, H, W, {self.config.in_channels}); got {frames.dtype} {frames.shape}"
            )
        t, h, w, _ = frames.shape
        self.check_num_frames(t)
        sc = self.spatial_compression
        if h % sc or w % sc:
            raise ValueError(f"frame height/width must be multiples of {sc}; got {h}x{w}")
        if out is None:
            out = np.empty_like(frames)
        elif out.shape != frames.shape or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 of shape {frames.shape}")
        enc_step, dec_step = self.config.encoder_slice_frames, self.config.decoder_slice_latents
        latent_t, latent_h, latent_w = self.latent_num_frames(t), h // sc, w // sc
        # Untiled is the one-tile grid: every alpha is None and the tile is the whole frame.
        grid = self._tile_grid(latent_h, latent_w) or _TileGrid(latent_h, latent_w, max(latent_h, latent_w), 0)
        total = len(grid) * (-(-t // enc_step) + -(-latent_t // dec_step))
        done = 0
        device, dtype = self.device, self.dtype

        def tick() -> None:
            nonlocal done
            done += 1
            if callback:
                callback(done, total)

        def to_input(chunk: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(chunk).to(device=device, dtype=dtype).div_(127.5).sub_(1.0)
            return x.permute(3, 0, 1, 2).unsqueeze(0)  # (1, C, t, h, w)

        moments = torch.zeros(
            1, 2 * self.config.latent_channels, latent_t, latent_h, latent_w, device=device, dtype=dtype
        )
        alphas = grid.alphas()
        for i, j, ys, xs in grid:
            with self._feature_cache(self.encoder):
                done_latents = 0
                for f in range(0, t, enc_step):
                    m = self._encode(to_input(frames[f : f + enc_step, _scaled(ys, sc), _scaled(xs, sc)]))
                    _blend_into(moments[:, :, done_latents : done_latents + m.shape[2], ys, xs], m, alphas[i, j])
                    done_latents += m.shape[2]
                    tick()
        z = DiagonalGaussianDistribution(moments).mode()
        del moments
        is_image = t == 1
        frames_per_latent = 1 if is_image else TEMPORAL_COMPRESSION
        alphas = grid.alphas(sc)
        for i, j, ys, xs in grid:
            alpha = alphas[i, j]
            if alpha is not None:
                alpha = alpha.to(device=device, dtype=torch.float32)[None, :, :, None]  # over (f, h, w, C)
            py, px = _scaled(ys, sc), _scaled(xs, sc)
            with self._feature_cache(self.decoder):
                for k in range(0, latent_t, dec_step):
                    y = self._decode(z[:, :, k : k + dec_step, ys, xs], is_image)[0]
                    start = k * frames_per_latent
                    region = out[start : start + y.shape[1], py, px]
                    pixels = y.float().clamp_(-1, 1).add_(1).mul_(127.5).permute(1, 2, 3, 0)
                    if alpha is not None:
                        # Blend with the overlap already written by earlier tiles (read back as uint8).
                        pixels = torch.from_numpy(region).to(device=device, dtype=torch.float32).lerp_(pixels, alpha)
                    region[...] = pixels.round_().to(torch.uint8).cpu().numpy()
                    tick()
        return out

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        posterior = self.encode(x).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        sample = self.decode(z).sample
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)
