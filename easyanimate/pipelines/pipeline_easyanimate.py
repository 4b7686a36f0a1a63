"""Text-to-video inference: text encoder -> DiT denoising in the Slice-VAE latent space -> VAE decode."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# Imported (not only used) so the component classes are in sys.modules for from_pretrained.
from easyanimate.models.dit.transformer import EasyAnimateTransformer3DModel  # noqa: F401
from easyanimate.models.text_encoder import encode_prompts
from easyanimate.models.vae.slice_vae import SliceVAE  # noqa: F401
from easyanimate.schedulers import SCHEDULERS, make_scheduler  # noqa: F401  (re-exported)
from easyanimate.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_PREFIX = "transformer"  # diffusers' key convention for a pipeline's transformer LoRA
_LORA_METADATA_KEY = "lora_adapter_metadata"  # same key diffusers writes, so its loaders read our files

OUTPUT_TYPES = ("np", "pt", "latent", "mp4", "gif")
ENCODED_TYPES = ("mp4", "gif")


@dataclass
class EasyAnimatePipelineOutput(BaseOutput):
    """``frames`` by ``output_type``: "np" uint8 (B, T, H, W, 3); "pt" float (B, 3, T, H, W) in [0, 1];
    "latent" the final latents; "mp4"/"gif" a list with one encoded video per prompt, as ``bytes``, or
    as the ``Path`` written when ``output_path`` was given."""

    frames: np.ndarray | torch.Tensor | list[bytes] | list[Path]


def encode_video(frames: np.ndarray, fmt: str, fps: float) -> bytes:
    """uint8 (T, H, W, 3) frames as the bytes of an H.264 ``mp4`` or a looping ``gif``."""
    if fmt == "gif":
        import imageio.v3 as iio

        return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
    if fmt != "mp4":
        raise ValueError(f"video format must be one of {ENCODED_TYPES}, got {fmt!r}")
    from easyanimate.data.video_io import write_video

    with tempfile.TemporaryDirectory() as tmp:
        return write_video(frames, Path(tmp) / "video.mp4", fps=fps).read_bytes()


def _output_paths(output_path: str | Path | list, batch: int, fmt: str) -> list[Path]:
    if isinstance(output_path, (list, tuple)):
        paths = [Path(p) for p in output_path]
        if len(paths) != batch:
            raise ValueError(f"{len(paths)} output paths for {batch} prompts")
    else:
        path = Path(output_path)
        # One path for several prompts: number them (clip.mp4 -> clip_0.mp4, clip_1.mp4, ...).
        paths = [path] if batch == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]
    for path in paths:
        if path.suffix.lower() != f".{fmt}":
            raise ValueError(f"output_path {path} must end in .{fmt} for output_type={fmt!r}")
    return paths


# ------------------------------------------------------------------------------ LoRA helpers
def save_transformer_lora(transformer, path: str | Path, adapter_name: str | None = None) -> Path:
    """Save a transformer's LoRA adapter to ``path`` (folder, or a ``.safetensors`` file); returns the file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(transformer, "peft_config", {})
    if not configs:
        raise ValueError("the transformer has no LoRA adapter to save")
    adapter_name = adapter_name or transformer.active_adapters()[0]
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; have {sorted(configs)}")
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {f"{LORA_PREFIX}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in configs[adapter_name].to_dict().items()}
    meta = {f"{LORA_PREFIX}.{k}": v for k, v in meta.items()}
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt", _LORA_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return file


def lora_file(path: str | Path) -> Path:
    """The adapter weights file of a LoRA folder, or ``path`` itself when it is the file."""
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {file}")
    return file


def read_lora_config(path: str | Path) -> dict:
    """The peft ``LoraConfig`` fields (r, lora_alpha, target_modules, ...) stored in an adapter file."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), framework="pt") as f:
        raw = (f.metadata() or {}).get(_LORA_METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    return {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in meta.items()}


def load_transformer_lora(transformer, path: str | Path, adapter_name: str = "default", scale: float = 1.0) -> None:
    """Attach a LoRA saved by :func:`save_transformer_lora` and activate it at ``scale``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = lora_file(path)
    state = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        raw = (f.metadata() or {}).get(_LORA_METADATA_KEY)
    metadata = json.loads(raw) if raw else None
    if not any(k.startswith(f"{LORA_PREFIX}.") for k in state):  # plain peft keys: add our prefix
        state = {f"{LORA_PREFIX}.{k}": v for k, v in state.items()}
        metadata = {f"{LORA_PREFIX}.{k}": v for k, v in metadata.items()} if metadata else None
    transformer.load_lora_adapter(state, prefix=LORA_PREFIX, adapter_name=adapter_name, metadata=metadata)
    _set_lora_scale(transformer, scale, adapter_name)


def _set_lora_scale(transformer, scale: float, adapter_name: str | None = None) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [adapter_name] if adapter_name else list(getattr(transformer, "peft_config", {}))
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            for name in names:
                module.set_scale(name, scale)


# ------------------------------------------------------------------------------ pipeline
def _easyanimate_library_tuple(module) -> tuple[str, str] | None:
    """``(defining module, ClassName)`` for easyanimate classes, else None (diffusers' own logic applies).

    diffusers treats a component as a diffusers pipeline module when its parent folder name, or the
    library name, is also an attribute of ``diffusers.pipelines``. Both ``dit`` (our
    ``easyanimate/models/dit``) and ``easyanimate`` itself collide, so neither ``"dit"`` (what
    diffusers would record) nor ``"easyanimate"`` can be loaded back. A full dotted module path is
    never such an attribute, and diffusers resolves it from ``sys.modules`` (see ``from_pretrained``).
    """
    cls = module if isinstance(module, type) else type(module)
    if cls.__module__.split(".")[0] == "easyanimate":
        return (cls.__module__, cls.__name__)
    return None


class EasyAnimatePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]  # what callback_on_step_end may read and replace

    def __init__(self, vae, transformer, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(
            vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # diffusers only looks custom libraries up in sys.modules; import our own recorded modules first.
        index = Path(pretrained_model_name_or_path) / "model_index.json"
        if index.is_file():
            for value in json.loads(index.read_text()).values():
                if isinstance(value, list) and value and str(value[0]).startswith("easyanimate."):
                    importlib.import_module(value[0])
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            fixed = _easyanimate_library_tuple(module) if module is not None else None
            if fixed:
                self.register_to_config(**{name: fixed})

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # Reassigning a component (pipe.transformer = ...) re-records its library; keep ours top-level.
        if "_internal_dict" in self.__dict__ and isinstance(self.config.get(name), (tuple, list)) and value is not None:
            fixed = _easyanimate_library_tuple(value)
            if fixed:
                self.register_to_config(**{name: fixed})

    # -------------------------------------------------------------- checks
    def check_inputs(
        self,
        prompt,
        negative_prompt=None,
        num_frames: int = 8,
        height: int = 64,
        width: int = 64,
        output_type: str = "np",
    ) -> None:
        """Raise ``ValueError`` naming the bad argument, without generating (servers validate requests with it)."""
        self._check_inputs(prompt, negative_prompt, num_frames, height, width, output_type)

    def _check_inputs(self, prompt, negative_prompt, num_frames, height, width, output_type, output_path=None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or list of non-empty strings, got {prompt!r}")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        multiple = self.vae.spatial_compression * self.transformer.config.patch_size
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        self.vae.check_num_frames(num_frames)  # raises ValueError for unsupported lengths
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_path is not None:
            if output_type not in ENCODED_TYPES:
                raise ValueError(f"output_path needs output_type 'mp4' or 'gif', got {output_type!r}")
            _output_paths(output_path, len(prompts), output_type)
        return prompts, negatives

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        max_text_tokens: int = 32,
        latents: torch.Tensor | None = None,
        output_path: str | Path | list[str | Path] | None = None,
        fps: float = 8,
        callback_on_step_end: Callable[["EasyAnimatePipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> EasyAnimatePipelineOutput:
        """Generate one video per prompt.

        ``output_type`` "mp4"/"gif" encodes the videos at ``fps``: without ``output_path`` the result holds
        their bytes; with it they are written there (one path, numbered ``_i`` for several prompts, or a
        list) and the result holds the paths. Memory: see ``enable_vae_slicing`` and
        ``enable_idle_component_offload``.

        ``callback_on_step_end(pipe, step, timestep, tensors)`` runs after every denoising step (diffusers'
        convention): ``tensors`` holds the names in ``callback_on_step_end_tensor_inputs`` (``latents``), and a
        ``latents`` in the dict it returns replaces them. ``pipe.num_timesteps`` is the number of steps.
        """
        prompts, negatives = self._check_inputs(
            prompt, negative_prompt, num_frames, height, width, output_type, output_path
        )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        device = self._execution_device
        dtype = self.transformer.dtype
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0

        text, mask = encode_prompts(self.tokenizer, self.text_encoder, prompts, max_text_tokens)
        if do_cfg:
            neg_text, neg_mask = encode_prompts(self.tokenizer, self.text_encoder, negatives, max_text_tokens)
            text, mask = torch.cat([neg_text, text]), torch.cat([neg_mask, mask])
        text, mask = text.to(device, dtype), mask.to(device)

        s = self.vae.spatial_compression
        shape = (
            batch,
            self.transformer.config.in_channels,
            self.vae.latent_num_frames(num_frames),
            height // s,
            width // s,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        # Only stochastic schedulers (DDIM, Euler-a, DPM++ SDE) take a generator.
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            eps = self.transformer(model_in, t.expand(model_in.shape[0]), text, encoder_attention_mask=mask).sample
            if do_cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                returned = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = (returned or {}).get("latents", latents)

        if output_type == "latent":
            frames = latents
        else:
            frames = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if output_type in ENCODED_TYPES:
            videos = [encode_video(video, output_type, fps) for video in frames]
            if output_path is not None:
                paths = _output_paths(output_path, len(videos), output_type)
                for path, data in zip(paths, videos):
                    atomic_write_bytes(path, data)
                videos = paths
            frames = videos
        return EasyAnimatePipelineOutput(frames=frames)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) call."""
        return getattr(self, "_num_timesteps", 0)

    def _decode(self, latents: torch.Tensor, output_type: str):
        video = self.vae.decode(
            latents.to(self.vae.dtype) / self.vae.config.scaling_factor, use_slicing=self.vae_slicing
        ).sample
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return video
        return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()

    # -------------------------------------------------------------- memory controls
    @property
    def vae_slicing(self) -> bool:
        """Decode a few latent frames at a time (Slice VAE); on by default, peak memory stays flat in length."""
        return getattr(self, "_vae_slicing", True)

    def enable_vae_slicing(self) -> None:
        self._vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self._vae_slicing = False

    def enable_idle_component_offload(self, device: str | torch.device | None = None) -> bool:
        """Keep idle components in CPU memory; each moves to the accelerator only while it runs.

        Uses diffusers' ``enable_model_cpu_offload`` (hooks in ``model_cpu_offload_seq`` order: text
        encoder, transformer, VAE), so at most one component occupies accelerator memory. ``device``
        defaults to CUDA when present. With no accelerator every component already lives in CPU memory:
        nothing to offload, so this logs that and returns False; it returns True when offload is active.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cpu":
            logger.info("idle-component offload skipped: no accelerator, every component is already in CPU memory")
            return False
        self.enable_model_cpu_offload(device=device)
        return True

    # -------------------------------------------------------------- LoRA (delegates to the transformer)
    def load_lora_weights(self, path: str | Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        load_transformer_lora(self.transformer, path, adapter_name=adapter_name, scale=scale)

    def save_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> Path:
        return save_transformer_lora(self.transformer, path, adapter_name=adapter_name)

    def set_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        _set_lora_scale(self.transformer, scale, adapter_name)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        self.transformer.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        self.transformer.fuse_lora(lora_scale=lora_scale)

    def unfuse_lora(self) -> None:
        self.transformer.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.transformer.unload_lora()


__all__ = [
    "ENCODED_TYPES",
    "EasyAnimatePipeline",
    "EasyAnimatePipelineOutput",
    "OUTPUT_TYPES",
    "SCHEDULERS",
    "encode_video",
    "load_transformer_lora",
    "lora_file",
    "read_lora_config",
    "make_scheduler",
    "save_transformer_lora",
]
