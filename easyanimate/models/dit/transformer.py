"""EasyAnimate diffusion transformer: a PixArt-alpha DiT with a motion module and U-ViT long skips.

Tokens are laid out as (B, T, N, D) with N = (h/p)*(w/p) per latent frame. Every block runs
spatial self-attention per frame, cross-attention to the text, then the motion module (temporal
self-attention per spatial position, or per g x g grid with ``grid_reshape=g``), then the MLP.
Images are simply videos with T == 1, so one code path serves both.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


# ------------------------------------------------------------------------------ position embeddings
def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] embedding (float64 maths for precision, as in PixArt)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


POS_EMBED_ORDERS = ("hw", "wh")


def sincos_2d(
    dim: int,
    grid_h: int,
    grid_w: int,
    base_size: float,
    interpolation_scale: float = 1.0,
    device=None,
    order: str = "hw",
) -> torch.Tensor:
    """PixArt 2D sin-cos table of shape (grid_h*grid_w, dim), row-major (h outer).

    Coordinates are rescaled by ``grid / base_size`` so any resolution covers the same range the
    model was trained on (PixArt's resolution interpolation). ``order`` says which coordinate the first
    half of the channels encodes: ``"hw"`` the row (this project's original layout), ``"wh"`` the column,
    as PixArt and diffusers' ``get_2d_sincos_pos_embed`` do (needed to reuse PixArt weights).
    """
    if dim % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for 2D sin-cos embeddings, got {dim}")
    if order not in POS_EMBED_ORDERS:
        raise ValueError(f"pos_embed_order must be one of {POS_EMBED_ORDERS}, got {order!r}")
    ys = torch.arange(grid_h, dtype=torch.float64, device=device) / (grid_h / base_size) / interpolation_scale
    xs = torch.arange(grid_w, dtype=torch.float64, device=device) / (grid_w / base_size) / interpolation_scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    first, second = (yy, xx) if order == "hw" else (xx, yy)
    return torch.cat([_sincos_1d(dim // 2, first), _sincos_1d(dim // 2, second)], dim=1).float()


# ------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Multi-head attention with ``to_q/to_k/to_v/to_out.0`` names so peft LoRA can target them."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        h = self.num_heads
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.to_out[1](self.to_out[0](out))


class MotionModule(nn.Module):
    """Temporal self-attention across frames (EasyAnimate's motion module).

    ``to_out.0`` is zero-initialised so inserting the module into a trained image DiT is a no-op.
    """

    def __init__(self, dim: int, num_heads: int, max_frames: int, grid_reshape: int = 1):
        super().__init__()
        self.dim, self.max_frames, self.grid_reshape = dim, max_frames, grid_reshape
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)
        # Fixed table, not a parameter: keeps checkpoints independent of max_frames.
        self.register_buffer("pos_embed", _sincos_1d(dim, torch.arange(max_frames)).float(), persistent=False)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, T, N, D) -> residual update of the same shape."""
        b, t, n, d = x.shape
        gh, gw = grid_hw
        g = self.grid_reshape
        if t > self.max_frames:
            raise ValueError(f"{t} latent frames exceed max_frames_latent={self.max_frames}")
        y = self.norm(x) + self.pos_embed[:t].to(x.dtype)[None, :, None, :]
        # (B, T, gh/g, g, gw/g, g, D) -> (B * gh/g * gw/g, T*g*g, D): one sequence per g x g grid.
        y = y.view(b, t, gh // g, g, gw // g, g, d).permute(0, 2, 4, 1, 3, 5, 6)
        y = y.reshape(b * (gh // g) * (gw // g), t * g * g, d)
        y = self.attn(y)
        y = y.view(b, gh // g, gw // g, t, g, g, d).permute(0, 3, 1, 4, 2, 5, 6)
        return y.reshape(b, t, n, d)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        inner = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EasyAnimateBlock(nn.Module):
    """PixArt block (adaLN-single) + motion module between cross-attention and the MLP."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, motion_module: bool, max_frames: int, grid_reshape: int
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, num_heads)
        self.attn2 = Attention(dim, num_heads)  # text is projected to hidden size beforehand
        self.motion_module = MotionModule(dim, num_heads, max_frames, grid_reshape) if motion_module else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio)
        # Per-block learned offset to the shared timestep modulation (PixArt's adaLN-single).
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        t6: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        grid_hw: tuple[int, int],
    ) -> torch.Tensor:
        """x: (B, T, N, D); t6: (B, 6, D); text: (B, L, D); text_mask: (B, 1, 1, L) bool or None."""
        b, t, n, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + t6)[
            :, :, None, None, :
        ].unbind(1)  # each (B, 1, 1, D)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = self.attn1(h.reshape(b * t, n, d)).view(b, t, n, d)
        x = x + gate_msa * h
        # Cross-attention is per query token, so all frames can share one (B, T*N) sequence.
        x = x + self.attn2(x.reshape(b, t * n, d), text, text_mask).view(b, t, n, d)
        if self.motion_module is not None:
            x = x + self.motion_module(x, grid_hw)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


# ------------------------------------------------------------------------------ model
class EasyAnimateTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-to-video DiT predicting epsilon for latents (B, C, T, h, w)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["EasyAnimateBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 384,
        motion_module: bool = True,
        max_frames_latent: int = 64,
        grid_reshape: int = 1,
        long_skips: bool = True,
        base_latent_size: int = 8,
        interpolation_scale: float = 1.0,
        pos_embed_order: str = "hw",
        use_additional_conditions: bool = False,
        vae_scale_factor: int = 8,
    ):
        """``interpolation_scale``, ``pos_embed_order`` and ``use_additional_conditions`` exist to reproduce a
        PixArt-alpha/Sigma transformer exactly (``easyanimate.models.dit.pixart``); their defaults keep this
        model's original behaviour. ``use_additional_conditions`` adds PixArt-alpha-1024's resolution and
        aspect-ratio embeddings to the timestep embedding; the pixel size they see is the latent size times
        ``vae_scale_factor`` unless ``added_cond_kwargs`` is passed to ``forward``."""
        super().__init__()
        if grid_reshape < 1:
            raise ValueError(f"grid_reshape must be >= 1, got {grid_reshape}")
        if pos_embed_order not in POS_EMBED_ORDERS:
            raise ValueError(f"pos_embed_order must be one of {POS_EMBED_ORDERS}, got {pos_embed_order!r}")
        if use_additional_conditions and hidden_size % 3:
            raise ValueError(f"use_additional_conditions needs hidden_size divisible by 3, got {hidden_size}")
        d = hidden_size
        self.gradient_checkpointing = False
        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # adaLN-single: shared by all blocks
        if use_additional_conditions:  # PixArt-alpha's micro-conditions: (height, width) and height/width
            self.resolution_embed = TimestepEmbedding(256, d // 3)
            self.aspect_ratio_embed = TimestepEmbedding(256, d // 3)
        self.caption_projection = nn.Sequential(
            nn.Linear(text_embed_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.blocks = nn.ModuleList(
            EasyAnimateBlock(d, num_heads, mlp_ratio, motion_module, max_frames_latent, grid_reshape)
            for _ in range(depth)
        )
        # U-ViT long skips: block i (i < depth//2) feeds block depth-1-i as
        # x = x + skip_linear(cat[x, skip]); zero weights+bias make it a no-op at init.
        self.skip_linears = None
        if long_skips and depth >= 2:
            self.skip_linears = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(depth // 2))
            for lin in self.skip_linears:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, patch_size * patch_size * in_channels)
        nn.init.zeros_(self.proj_out.weight)  # PixArt: start as a zero predictor
        nn.init.zeros_(self.proj_out.bias)

    def _size_embedding(
        self, added_cond_kwargs: dict | None, b: int, h: int, w: int, dtype: torch.dtype, device
    ) -> torch.Tensor:
        """PixArt-alpha's resolution + aspect-ratio embedding (B, D), added to the timestep embedding."""
        cond = added_cond_kwargs or {}
        f = self.config.vae_scale_factor
        resolution = cond.get("resolution")
        if resolution is None:  # what PixArtAlphaPipeline passes: the pixel (height, width) of the request
            resolution = torch.tensor([[float(h * f), float(w * f)]], device=device).expand(b, 2)
        aspect_ratio = cond.get("aspect_ratio")
        if aspect_ratio is None:
            aspect_ratio = torch.tensor([[h / w]], device=device).expand(b, 1)
        res = self.resolution_embed(self.time_proj(resolution.to(device).flatten()).to(dtype)).reshape(b, -1)
        ar = self.aspect_ratio_embed(self.time_proj(aspect_ratio.to(device).flatten()).to(dtype)).reshape(b, -1)
        return torch.cat([res, ar], dim=1)

    def motion_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the motion modules only (training stage 2 trains just these)."""
        for block in self.blocks:
            if block.motion_module is not None:
                yield from block.motion_module.parameters()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ):
        cfg = self.config
        p = cfg.patch_size
        b, c, t, h, w = hidden_states.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
        gh, gw = h // p, w // p
        g = cfg.grid_reshape
        if self.blocks and self.blocks[0].motion_module is not None and (gh % g or gw % g):
            raise ValueError(
                f"grid_reshape={g} needs the token grid ({gh}x{gw}) to be divisible by {g}; "
                f"use latent sizes divisible by {p * g}"
            )
        dtype = self.patch_embed.weight.dtype

        # Patchify each frame: (B, C, T, h, w) -> (B, T, N, D).
        x = hidden_states.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        pos = sincos_2d(
            cfg.hidden_size,
            gh,
            gw,
            base_size=cfg.base_latent_size / p,
            interpolation_scale=cfg.interpolation_scale,
            device=x.device,
            order=cfg.pos_embed_order,
        )
        x = (x + pos.to(dtype)[None]).view(b, t, gh * gw, cfg.hidden_size)

        # Timestep -> shared modulation.
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.expand(b)
        temb = self.time_embed(self.time_proj(timestep).to(dtype))  # (B, D)
        if cfg.use_additional_conditions:
            temb = temb + self._size_embedding(added_cond_kwargs, b, h, w, dtype, x.device)
        t6 = self.t_block(temb).view(b, 6, cfg.hidden_size)

        text = self.caption_projection(encoder_hidden_states.to(dtype))
        text_mask = None
        if encoder_attention_mask is not None:
            keep = encoder_attention_mask.to(x.device).bool()
            # A fully masked row would make SDPA return NaN; let such rows see every token instead.
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            text_mask = keep[:, None, None, :]

        n_skip = len(self.skip_linears) if self.skip_linears is not None else 0
        depth = len(self.blocks)
        skips = []
        for i, block in enumerate(self.blocks):
            if n_skip and i >= depth - n_skip:
                lin = self.skip_linears[depth - 1 - i]
                x = x + lin(torch.cat([x, skips.pop()], dim=-1))
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, t6, text, text_mask, (gh, gw))
            else:
                x = block(x, t6, text, text_mask, (gh, gw))
            if i < n_skip:
                skips.append(x)

        # PixArt final layer: modulated norm, linear, unpatchify.
        shift, scale = (self.final_scale_shift_table[None] + temb[:, None])[:, :, None, None, :].unbind(1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, T, N, p*p*C)
        x = x.view(b, t, gh, gw, p, p, c).permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, t, h, w)
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)


__all__ = ["EasyAnimateTransformer3DModel", "sincos_2d"]
