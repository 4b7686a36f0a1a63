"""Initialise the video DiT from a diffusers ``PixArtTransformer2DModel`` (PixArt-alpha or -Sigma).

EasyAnimate starts its video DiT from PixArt: the image transformer's weights go into the same-named
parts of ``EasyAnimateTransformer3DModel`` through an explicit key map, and what PixArt lacks (the motion
module and the U-ViT long skips) starts as a no-op (zero output projections). The freshly initialised
video DiT then computes exactly what PixArt does, on images and on every frame of a video.

The map is strict: every PixArt key must be consumed, every video-DiT key must be either loaded or one of
the new modules, shapes must agree, and the settings that change the maths without changing shapes (heads,
position-embedding layout and scale, micro-conditions) must match PixArt's config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

PIXART_CLASS = "PixArtTransformer2DModel"

# Video-DiT parameters PixArt has no counterpart for; all start as no-ops.
NEW_MODULES = {
    "motion_module": re.compile(r"^blocks\.\d+\.motion_module\."),
    "long_skips": re.compile(r"^skip_linears\."),
}

# PixArt top-level key -> video-DiT key (blocks are mapped by _BLOCK below).
_TOP = {
    "pos_embed.proj.weight": "patch_embed.weight",
    "pos_embed.proj.bias": "patch_embed.bias",
    "adaln_single.emb.timestep_embedder.linear_1.weight": "time_embed.linear_1.weight",
    "adaln_single.emb.timestep_embedder.linear_1.bias": "time_embed.linear_1.bias",
    "adaln_single.emb.timestep_embedder.linear_2.weight": "time_embed.linear_2.weight",
    "adaln_single.emb.timestep_embedder.linear_2.bias": "time_embed.linear_2.bias",
    "adaln_single.linear.weight": "t_block.1.weight",
    "adaln_single.linear.bias": "t_block.1.bias",
    "caption_projection.linear_1.weight": "caption_projection.0.weight",
    "caption_projection.linear_1.bias": "caption_projection.0.bias",
    "caption_projection.linear_2.weight": "caption_projection.2.weight",
    "caption_projection.linear_2.bias": "caption_projection.2.bias",
    "scale_shift_table": "final_scale_shift_table",
    "proj_out.weight": "proj_out.weight",
    "proj_out.bias": "proj_out.bias",
}
_SIZE_CONDITIONS = {
    f"adaln_single.emb.{src}.{layer}.{kind}": f"{dst}.{layer}.{kind}"
    for src, dst in (("resolution_embedder", "resolution_embed"), ("aspect_ratio_embedder", "aspect_ratio_embed"))
    for layer in ("linear_1", "linear_2")
    for kind in ("weight", "bias")
}
# Within block i: transformer_blocks.{i}.X -> blocks.{i}.Y
_BLOCK = {
    "scale_shift_table": "scale_shift_table",
    **{
        f"{attn}.{proj}.{kind}": f"{attn}.{proj}.{kind}"
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
        for kind in ("weight", "bias")
    },
    "ff.net.0.proj.weight": "ff.net.0.weight",
    "ff.net.0.proj.bias": "ff.net.0.bias",
    "ff.net.2.weight": "ff.net.2.weight",
    "ff.net.2.bias": "ff.net.2.bias",
}


class PixArtInitError(ValueError):
    """A PixArt checkpoint that cannot initialise the video DiT as configured; the message says why."""


@dataclass
class KeyMapReport:
    """What loading a PixArt checkpoint did: PixArt key -> video-DiT key for every loaded tensor, the new
    (no-op) video-DiT keys, and the tensors transformed on the way (e.g. learned-sigma rows dropped)."""

    source: str
    loaded: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    transformed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """Counts and grouping, small enough for run info; ``to_json`` has every key."""
        groups = {name: sum(1 for k in self.new if rx.match(k)) for name, rx in NEW_MODULES.items()}
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "new": len(self.new),
            "new_by_module": {k: v for k, v in groups.items() if v},
            "transformed": dict(self.transformed),
        }

    def to_json(self) -> str:
        return json.dumps(
            {"summary": self.summary(), "loaded": self.loaded, "new": self.new, "transformed": self.transformed},
            indent=1,
        )


def find_pixart_folder(path: str | Path) -> Path:
    """The folder holding the PixArt transformer: ``path`` itself or a pipeline's ``transformer/``."""
    path = Path(path).expanduser()
    for folder in (path, path / "transformer"):
        file = folder / "config.json"
        if file.is_file() and json.loads(file.read_text()).get("_class_name") == PIXART_CLASS:
            return folder
    raise PixArtInitError(
        f"{path} holds no diffusers {PIXART_CLASS} (config.json with _class_name {PIXART_CLASS!r}, "
        "in the folder or its transformer/ subfolder)"
    )


def effective_pixart_config(config: dict) -> dict:
    """PixArt's config with the values diffusers derives at construction filled in."""
    cfg = dict(config)
    sample_size = cfg.get("sample_size", 128)
    if cfg.get("interpolation_scale") is None:
        cfg["interpolation_scale"] = max(sample_size // 64, 1)
    if cfg.get("use_additional_conditions") is None:
        cfg["use_additional_conditions"] = sample_size == 128
    if cfg.get("out_channels") is None:
        cfg["out_channels"] = cfg.get("in_channels", 4)
    return cfg


def video_dit_kwargs(pixart_config: dict) -> dict:
    """``EasyAnimateTransformer3DModel`` arguments that reproduce this PixArt (plus motion module and skips)."""
    cfg = effective_pixart_config(pixart_config)
    return dict(
        in_channels=cfg["in_channels"],
        patch_size=cfg["patch_size"],
        hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        depth=cfg["num_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=4.0,
        text_embed_dim=cfg["caption_channels"],
        base_latent_size=cfg["sample_size"],
        interpolation_scale=float(cfg["interpolation_scale"]),
        pos_embed_order="wh",
        use_additional_conditions=bool(cfg["use_additional_conditions"]),
    )


def config_problems(pixart_config: dict, model_config: dict) -> list[str]:
    """Settings on which PixArt and the video DiT compute differently though every shape may agree."""
    cfg = effective_pixart_config(pixart_config)
    problems = []
    fixed = {
        "norm_type": "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_type": "default",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }
    for key, want in fixed.items():
        if cfg.get(key, want) != want:
            problems.append(f"PixArt {key}={cfg[key]!r}: only {want!r} is supported")
    if abs(float(cfg.get("norm_eps", 1e-6)) - 1e-6) > 1e-12:
        problems.append(f"PixArt norm_eps={cfg['norm_eps']}: the video DiT uses 1e-6")
    if cfg.get("caption_channels") is None:
        problems.append("PixArt has no caption_projection (caption_channels is None)")
    want = video_dit_kwargs(cfg) if not problems else {}
    for key in ("num_heads", "pos_embed_order", "interpolation_scale", "base_latent_size", "use_additional_conditions"):
        if key in want and model_config.get(key) != want[key]:
            problems.append(f"video DiT {key}={model_config.get(key)!r} but this PixArt needs {want[key]!r}")
    out, inp = cfg["out_channels"], cfg.get("in_channels", 4)
    if out not in (inp, 2 * inp):
        problems.append(f"PixArt out_channels={out} is neither in_channels={inp} nor 2x (learned sigma)")
    return problems


def pixart_key_map(pixart_keys: list[str], depth: int) -> dict[str, str]:
    """PixArt key -> video-DiT key for the keys this map knows (unknown keys are left out: the caller fails)."""
    mapping = {}
    block = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
    for key in pixart_keys:
        if key in _TOP:
            mapping[key] = _TOP[key]
        elif key in _SIZE_CONDITIONS:
            mapping[key] = _SIZE_CONDITIONS[key]
        elif (m := block.match(key)) and m.group(2) in _BLOCK and int(m.group(1)) < depth:
            mapping[key] = f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return mapping


def _drop_learned_sigma(weight: torch.Tensor, patch_size: int, out_channels: int, keep: int) -> torch.Tensor:
    """proj_out rows are (p, q, channel) with channel fastest; keep the first ``keep`` (epsilon) channels,
    which is what PixArt's pipelines do with a learned-sigma output (``noise_pred.chunk(2, dim=1)[0]``)."""
    rows = weight.reshape(patch_size * patch_size, out_channels, *weight.shape[1:])
    return rows[:, :keep].reshape(patch_size * patch_size * keep, *weight.shape[1:])


def load_pixart_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of the PixArt transformer in ``folder`` (local files only)."""
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel.from_pretrained(folder, local_files_only=True)
    return dict(pixart.config), {k: v.detach() for k, v in pixart.state_dict().items()}


@torch.no_grad()
def init_from_pixart(model: torch.nn.Module, path: str | Path) -> KeyMapReport:
    """Load the PixArt transformer at ``path`` into ``model`` (an ``EasyAnimateTransformer3DModel``) in place.

    Raises ``PixArtInitError`` naming the key (and both shapes) or the setting that does not fit.
    """
    folder = find_pixart_folder(path)
    pixart_config, state = load_pixart_state(folder)
    cfg = effective_pixart_config(pixart_config)
    model_config = dict(model.config)
    problems = config_problems(pixart_config, model_config)
    if problems:
        raise PixArtInitError(f"{folder}: " + "; ".join(problems))

    ours = model.state_dict()
    mapping = pixart_key_map(list(state), len(model.blocks))
    unconsumed = sorted(set(state) - set(mapping))
    if unconsumed:
        raise PixArtInitError(f"{folder}: PixArt keys with no place in the video DiT: {unconsumed[:8]}")
    missing_target = sorted(v for v in mapping.values() if v not in ours)
    if missing_target:
        raise PixArtInitError(f"{folder}: video DiT lacks keys the map targets: {missing_target[:8]}")

    report = KeyMapReport(source=str(folder))
    p, out, keep = cfg["patch_size"], cfg["out_channels"], cfg.get("in_channels", 4)
    tensors = {}
    for src, dst in mapping.items():
        value = state[src]
        if src.startswith("proj_out.") and out != keep and value.shape[0] == p * p * out:
            value = _drop_learned_sigma(value, p, out, keep)
            report.transformed[dst] = f"learned-sigma rows dropped: {p * p * out} -> {p * p * keep} outputs"
        if tuple(value.shape) != tuple(ours[dst].shape):
            raise PixArtInitError(
                f"{folder}: shape mismatch: PixArt {src} {tuple(state[src].shape)} vs video DiT {dst} "
                f"{tuple(ours[dst].shape)}"
            )
        tensors[dst] = value
    loaded_targets = set(tensors)
    new = sorted(k for k in ours if k not in loaded_targets)
    stray = [k for k in new if not any(rx.match(k) for rx in NEW_MODULES.values())]
    if stray:
        raise PixArtInitError(f"{folder}: video DiT keys neither in PixArt nor new modules: {stray[:8]}")

    for dst, value in tensors.items():
        ours[dst].copy_(value.to(ours[dst].dtype))
    # The new modules start as no-ops whatever happened to the model before: zero output projections.
    for block in model.blocks:
        if block.motion_module is not None:
            block.motion_module.attn.to_out[0].weight.zero_()
            block.motion_module.attn.to_out[0].bias.zero_()
    if model.skip_linears is not None:
        for lin in model.skip_linears:
            lin.weight.zero_()
            lin.bias.zero_()
    report.loaded = {src: mapping[src] for src in sorted(mapping)}
    report.new = new
    return report


__all__ = [
    "KeyMapReport",
    "NEW_MODULES",
    "PIXART_CLASS",
    "PixArtInitError",
    "config_problems",
    "effective_pixart_config",
    "find_pixart_folder",
    "init_from_pixart",
    "pixart_key_map",
    "video_dit_kwargs",
]
