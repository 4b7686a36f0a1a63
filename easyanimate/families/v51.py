"""EasyAnimate V5.1: the released checkpoints, loaded and fine-tuned with the ecosystem's own classes.

A checkpoint is one local folder in the layout of the V5.1 ``-diffusers`` releases: ``vae/``
(``AutoencoderKLMagvit``), ``transformer/`` (``EasyAnimateTransformer3DModel``), ``text_encoder/`` + ``tokenizer/``
(Qwen2-VL), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``) and ``model_index.json``. An InP checkpoint's
transformer takes more input channels than the VAE has latent channels (latents + mask + masked-video latents,
as diffusers' inpaint pipeline tells them apart); it loads as ``EasyAnimateInpaintPipeline`` and can start (and end)
a video at given images. Any other loads as ``EasyAnimatePipeline`` (text-to-video only).

Low-memory inference is diffusers' own (``MEMORY_MODES``). LoRA: the pipelines have no LoRA loader mixin (and
``EasyAnimateTransformer3DModel`` no ``PeftAdapterMixin``), so adapters go in with peft's
``inject_adapter_in_model`` / ``set_peft_model_state_dict`` and out with ``get_peft_model_state_dict``; the file is
in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys ``transformer.<module>.lora_A.weight``, the
peft config in the safetensors metadata) plus peft's ``adapter_config.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from easyanimate.config import Settings, V51Config

SUBFOLDERS = {
    "vae": "config.json",
    "transformer": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the LoRA config
LORA_PREFIX = "transformer."
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class V51Error(ValueError):
    """A V5.1 folder, setting or request that cannot be used; the message names the setting or argument."""


# ----------------------------------------------------------------------------------------- folder
def _read_config(folder: Path, sub: str) -> dict:
    return json.loads((folder / sub / SUBFOLDERS[sub]).read_text())


def check_v51_folder(model_dir: str | Path | None, setting: str = "v51.model_dir") -> Path:
    """The folder, after checking it holds every component of the release layout; V51Error naming ``setting``."""
    if model_dir is None:
        raise V51Error(f"{setting} is not set: point it at a local EasyAnimate V5.1 '-diffusers' folder")
    folder = Path(model_dir)
    if not folder.is_dir():
        raise V51Error(f"{setting}={folder} is not a folder (a local EasyAnimate V5.1 '-diffusers' checkpoint)")
    missing = [f"{sub}/{name}" for sub, name in SUBFOLDERS.items() if not (folder / sub / name).is_file()]
    if not (folder / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise V51Error(
            f"{setting}={folder} is not a V5.1 '-diffusers' folder: missing {', '.join(missing)} "
            f"(expected {', '.join(SUBFOLDERS)}/ and model_index.json)"
        )
    return folder


def is_inpaint_checkpoint(model_dir: str | Path) -> bool:
    """InP: the transformer takes latents plus inpaint conditions, i.e. more channels than the VAE's latents."""
    folder = Path(model_dir)
    in_channels = _read_config(folder, "transformer")["in_channels"]
    return in_channels != _read_config(folder, "vae").get("latent_channels", 16)


def pipeline_is_inpaint(pipe: DiffusionPipeline) -> bool:
    return pipe.transformer.config.in_channels != pipe.vae.config.latent_channels


# ----------------------------------------------------------------------------------------- memory modes
@dataclass(frozen=True)
class _MemoryContext:
    device: str | torch.device | None
    compute_dtype: torch.dtype
    tile_sample_min_size: int | None
    tile_sample_stride: int | None


def _fp8_layerwise(pipe, ctx: _MemoryContext) -> None:
    # Weights stored as float8, each layer upcast to the compute dtype for its forward; diffusers skips the
    # transformer's norms, patch embedding, output projection and any peft (LoRA) layers.
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=ctx.compute_dtype)


def _vae_tiling(pipe, ctx: _MemoryContext) -> None:
    size, stride = ctx.tile_sample_min_size, ctx.tile_sample_stride
    pipe.vae.enable_tiling(
        tile_sample_min_height=size,
        tile_sample_min_width=size,
        tile_sample_stride_height=stride,
        tile_sample_stride_width=stride,
    )


def _model_cpu_offload(pipe, ctx: _MemoryContext) -> None:
    pipe.enable_model_cpu_offload(device=ctx.device if ctx.device is not None else _accelerator("model_cpu_offload"))


def _sequential_cpu_offload(pipe, ctx: _MemoryContext) -> None:
    # diffusers' leaf-level group offloading: one leaf module's weights on the accelerator at a time, which its
    # docs give as the same strategy as enable_sequential_cpu_offload. That method itself cannot run EasyAnimate:
    # it leaves the text encoder's weights on the meta device and the pipeline's encode_prompt sends the tokens to
    # text_encoder.device ("Cannot copy out of meta tensor"; aigc-apps/EasyAnimate#185, diffusers PR #10626).
    # Group offloading keeps the weights on the CPU, so the same encode_prompt works.
    onload = torch.device(ctx.device) if ctx.device is not None else _accelerator("sequential_cpu_offload")
    pipe.enable_group_offload(onload_device=onload, offload_device=torch.device("cpu"), offload_type="leaf_level")


def _accelerator(mode: str) -> torch.device:
    if not torch.cuda.is_available():
        raise V51Error(
            f"v51.memory_mode {mode} offloads to an accelerator (cuda) and none was found; "
            "use a mode without offload on this machine"
        )
    return torch.device("cuda")


# Each name -> the diffusers calls it makes. Applied in this order (storage casting before offload hooks).
MEMORY_MODES: dict[str, Callable[[Any, _MemoryContext], None]] = {
    "none": lambda pipe, ctx: None,
    "fp8_layerwise": _fp8_layerwise,  # transformer.enable_layerwise_casting(float8_e4m3fn, compute dtype)
    "vae_tiling": _vae_tiling,  # vae.enable_tiling(...)
    "vae_slicing": lambda pipe, ctx: pipe.vae.enable_slicing(),  # vae.enable_slicing()
    "model_cpu_offload": _model_cpu_offload,  # pipe.enable_model_cpu_offload(device=...)
    "sequential_cpu_offload": _sequential_cpu_offload,  # pipe.enable_group_offload(..., offload_type="leaf_level")
}
OFFLOAD_MODES = ("model_cpu_offload", "sequential_cpu_offload")


def parse_memory_mode(memory_mode: str, setting: str = "v51.memory_mode") -> list[str]:
    """``"a+b"`` -> the names in application order; V51Error for unknown or conflicting names."""
    parts = [p.strip() for p in str(memory_mode).split("+") if p.strip()] or ["none"]
    unknown = [p for p in parts if p not in MEMORY_MODES]
    if unknown:
        raise V51Error(f"{setting}={memory_mode!r}: unknown {unknown}; join any of {list(MEMORY_MODES)} with '+'")
    if all(m in parts for m in OFFLOAD_MODES):
        raise V51Error(f"{setting}={memory_mode!r}: model_cpu_offload and sequential_cpu_offload exclude each other")
    return [m for m in MEMORY_MODES if m in parts]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def apply_memory_mode(
    pipe: DiffusionPipeline,
    memory_mode: str = "none",
    device: str | torch.device | None = None,
    tile_sample_min_size: int | None = None,
    tile_sample_stride: int | None = None,
) -> DiffusionPipeline:
    """Turn on the diffusers memory features ``memory_mode`` names and place the pipeline.

    Without an offload mode the pipeline moves to ``device`` (default: cuda when present, else cpu). The offload
    modes leave placement to diffusers' hooks; ``device`` is then the accelerator they compute on (None: cuda, and
    V51Error on a machine without one; ``"cpu"`` runs the same hooks computing on the CPU, as the tests do).
    """
    modes = parse_memory_mode(memory_mode)
    ctx = _MemoryContext(device, pipe.transformer.dtype, tile_sample_min_size, tile_sample_stride)
    for mode in modes:
        MEMORY_MODES[mode](pipe, ctx)
    if not any(m in modes for m in OFFLOAD_MODES):
        pipe.to(device or default_device())
    return pipe


# ----------------------------------------------------------------------------------------- loading
def load_v51_pipeline(
    model_dir: str | Path | None,
    memory_mode: str = "none",
    inpaint: bool | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device | None = None,
    lora_dir: str | Path | None = None,
    lora_scale: float = 1.0,
    tile_sample_min_size: int | None = None,
    tile_sample_stride: int | None = None,
) -> DiffusionPipeline:
    """Load a V5.1 folder with diffusers' own pipeline class for it, optionally with a LoRA, in ``memory_mode``.

    ``inpaint``: None detects T2V vs InP from ``transformer/config.json``; True or False demands that kind and
    raises V51Error for the other. Never downloads (``local_files_only``).
    """
    from diffusers import EasyAnimateInpaintPipeline, EasyAnimatePipeline

    folder = check_v51_folder(model_dir)
    parse_memory_mode(memory_mode)
    is_inp = is_inpaint_checkpoint(folder)
    if inpaint is not None and inpaint != is_inp:
        kind = "an InP (image-to-video)" if is_inp else "a text-to-video (not InP)"
        raise V51Error(
            f"v51.model_dir={folder} holds {kind} checkpoint, but an {'InP' if inpaint else 'non-InP'} one was asked"
            " for: use one of the V5.1 'InP' releases for image-to-video"
        )
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    pipeline_class = EasyAnimateInpaintPipeline if is_inp else EasyAnimatePipeline
    pipe = pipeline_class.from_pretrained(folder, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if is_inp and "cache_mag_vae" not in pipe.vae.config:
        # The inpaint pipeline reads this VAE setting (the V5.1 configs carry it: the MagViT with a causal cache,
        # whose first frame is encoded alone); a config without it gets that V5.1 value rather than a crash.
        pipe.vae.register_to_config(cache_mag_vae=True)
    if lora_dir is not None:
        load_v51_lora(pipe, lora_dir, scale=lora_scale)
    return apply_memory_mode(pipe, memory_mode, device, tile_sample_min_size, tile_sample_stride)


def load_v51_from_settings(
    settings: Settings,
    *,
    device: str | torch.device | None = None,
    lora_dir: str | Path | None = None,
    lora_scale: float = 1.0,
    inpaint: bool | None = None,
) -> DiffusionPipeline:
    v = settings.v51
    return load_v51_pipeline(
        v.model_dir,
        v.memory_mode,
        inpaint,
        dtype=v.dtype,
        device=device,
        lora_dir=lora_dir,
        lora_scale=lora_scale,
        tile_sample_min_size=v.tile_sample_min_size,
        tile_sample_stride=v.tile_sample_stride,
    )


# ----------------------------------------------------------------------------------------- generation
def check_v51_request(pipe: DiffusionPipeline, num_frames: int, height: int, width: int) -> None:
    """V51Error unless the MagViT VAE and the transformer's patches can take these sizes."""
    temporal = pipe.vae_temporal_compression_ratio
    if num_frames < 1 or (num_frames - 1) % temporal:
        valid = ", ".join(str(1 + temporal * k) for k in range(5))
        raise V51Error(
            f"num_frames={num_frames}: the V5.1 MagViT VAE compresses time by {temporal}, so it takes "
            f"1 + {temporal}k frames ({valid}, ..., 49)"
        )
    multiple = pipe.vae_spatial_compression_ratio * pipe.transformer.config.patch_size
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise V51Error(f"{name}={value}: must be a positive multiple of {multiple} (VAE 8x, patches 2x)")


def load_rgb(image: Any) -> np.ndarray:
    """A path, PIL image, uint8 (H, W, 3) array or float/uint8 (3, H, W) tensor -> uint8 (H, W, 3)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        image = t.to(torch.uint8).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise V51Error(f"image of shape {array.shape}: expected (H, W, 3)")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array[..., :3]


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, height, width, 3): scale to cover, then centre-crop (keeps the aspect ratio)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    top, left = (size[1] - height) // 2, (size[0] - width) // 2
    out = [
        np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC))[top : top + height, left : left + width]
        for f in frames
    ]
    return np.stack(out)


def image_to_video_condition(
    image: Any, end_image: Any | None, num_frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(video, mask_video)`` for EasyAnimateInpaintPipeline, as EasyAnimate's ``get_image_to_video_latent`` builds
    them: every frame of ``video`` (1, 3, F, H, W) in [0, 1] holds the start image (the last one the end image), and
    ``mask_video`` (1, 1, F, H, W) is 0 on the given frames and 255 on those to generate."""
    start = fit_frames(load_rgb(image)[None], height, width)[0]
    video = torch.from_numpy(start).permute(2, 0, 1).float().div(255)
    video = video[None, :, None].repeat(1, 1, num_frames, 1, 1)
    mask = torch.full((1, 1, num_frames, height, width), 255.0)
    mask[:, :, 0] = 0
    if end_image is not None:
        if num_frames < 2:
            raise V51Error("end_image needs num_frames > 1")
        end = fit_frames(load_rgb(end_image)[None], height, width)[0]
        video[:, :, -1] = torch.from_numpy(end).permute(2, 0, 1).float().div(255)
        mask[:, :, -1] = 0
    return video, mask


def generate_v51(
    pipe: DiffusionPipeline,
    prompt: str,
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
    image: Any | None = None,
    end_image: Any | None = None,
    *,
    negative_prompt: str = "",
    max_sequence_length: int = 256,
    noise_aug_strength: float = 0.0563,
    lora_scale: float | None = None,
    callback_on_step_end: Callable | None = None,
) -> np.ndarray:
    """One video: uint8 ``(num_frames, height, width, 3)``.

    ``image`` (and ``end_image``) make it image-to-video, which needs an InP checkpoint (V51Error otherwise).
    ``lora_scale`` re-scales an adapter loaded with ``load_v51_lora`` (None leaves it as it is).
    """
    check_v51_request(pipe, num_frames, height, width)
    is_inp = pipeline_is_inpaint(pipe)
    if end_image is not None and image is None:
        raise V51Error("end_image needs image (the start frame)")
    if image is not None and not is_inp:
        raise V51Error(
            "image-to-video needs a V5.1 InP checkpoint: this transformer takes "
            f"{pipe.transformer.config.in_channels} input channels = the VAE's "
            f"{pipe.vae.config.latent_channels} latent channels, so it has no inpaint condition "
            "(set v51.model_dir to an EasyAnimateV5.1-*-InP-diffusers folder)"
        )
    if lora_scale is not None:
        set_v51_lora_scale(pipe, lora_scale)
    device = pipe._execution_device
    # The generator lives where the pipeline computes: the InP pipeline draws the reference-frame noise there.
    generator = torch.Generator(device=device).manual_seed(seed)
    do_cfg = guidance > 1
    embeds, negative_embeds, mask, negative_mask = pipe.encode_prompt(
        prompt=prompt,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt,
        device=device,
        max_sequence_length=max_sequence_length,
    )
    kwargs: dict[str, Any] = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
    )
    if is_inp:
        kwargs["noise_aug_strength"] = noise_aug_strength
        if image is not None:
            kwargs["video"], kwargs["mask_video"] = image_to_video_condition(
                image, end_image, num_frames, height, width
            )
    # callback_on_step_end(pipe, step, timestep, tensors) -> tensors: diffusers' per-step hook (progress, stop).
    frames = pipe(**kwargs, callback_on_step_end=callback_on_step_end).frames[0]  # (F, H, W, 3) in [0, 1]
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def generate_v51_from_settings(
    settings: Settings,
    prompts: Sequence[str] | None = None,
    image: Any | None = None,
    end_image: Any | None = None,
    *,
    pipe: DiffusionPipeline | None = None,
    lora_dir: str | Path | None = None,
    lora_scale: float | None = None,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """What ``easyanimate generate`` runs for the V5.1 family: one uint8 (F, H, W, 3) video per prompt.

    Sizes, steps, guidance and seed come from ``generate.*`` (frames from ``v51.num_frames``: the MagViT VAE takes
    1 + 4k), the checkpoint and memory mode from ``v51.*``; ``image``/``end_image`` need an InP checkpoint.
    """
    g, v = settings.generate, settings.v51
    if image is None and end_image is not None:
        raise V51Error("--end-image needs --image (the start frame)")
    if pipe is None:
        pipe = load_v51_from_settings(
            settings, device=device, lora_dir=lora_dir, lora_scale=1.0 if lora_scale is None else lora_scale
        )
        lora_scale = None
    if image is not None and not pipeline_is_inpaint(pipe):
        raise V51Error(
            f"--image needs a V5.1 InP checkpoint; v51.model_dir={v.model_dir} holds a text-to-video one "
            "(use an EasyAnimateV5.1-*-InP-diffusers folder)"
        )
    return [
        generate_v51(
            pipe,
            prompt,
            v.num_frames,
            g.height,
            g.width,
            g.num_inference_steps,
            g.guidance_scale,
            g.seed + i,
            image,
            end_image,
            negative_prompt=v.negative_prompt or g.negative_prompt,
            max_sequence_length=v.max_sequence_length,
            noise_aug_strength=v.noise_aug_strength,
            lora_scale=lora_scale,
        )
        for i, prompt in enumerate(prompts or g.prompts)
    ]


# ----------------------------------------------------------------------------------------- LoRA
def add_v51_lora(transformer, rank: int, alpha: int, target_modules: Sequence[str], adapter_name: str = "default"):
    """Inject a fresh peft LoRA (``LoraConfig``) into the transformer; returns the config."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    return config


def _transformer(pipe_or_transformer):
    return getattr(pipe_or_transformer, "transformer", pipe_or_transformer)


def save_v51_lora(pipe_or_transformer, folder: str | Path, config, adapter_name: str = "default") -> Path:
    """Write the adapter in diffusers' LoRA format (+ peft's adapter_config.json); returns the folder."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    transformer = _transformer(pipe_or_transformer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    tensors = {LORA_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config_dict = json.loads(
        json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )
    # diffusers' layout: the component's LoraConfig fields, each key prefixed with the component's name.
    packed = {LORA_PREFIX + k: v for k, v in config_dict.items()}
    metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    save_file(tensors, folder / LORA_WEIGHTS_NAME, metadata=metadata)
    config.save_pretrained(str(folder))
    return folder


def load_v51_lora(pipe_or_transformer, folder: str | Path, scale: float = 1.0, adapter_name: str = "default"):
    """Inject the adapter saved in ``folder`` (by ``save_v51_lora``/``train_v51_lora``) and set its scale.

    Load it before ``apply_memory_mode`` (offload hooks and float8 storage expect the final module tree).
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / LORA_WEIGHTS_NAME
    if not weights.is_file():
        raise V51Error(f"LoRA folder {folder} holds no {LORA_WEIGHTS_NAME}")
    if (folder / "adapter_config.json").is_file():
        config = LoraConfig.from_pretrained(str(folder))
    else:
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
        fields = {k[len(LORA_PREFIX) :]: v for k, v in meta.items() if k.startswith(LORA_PREFIX)}
        if not fields:
            raise V51Error(f"LoRA folder {folder}: no adapter_config.json and no LoRA config in the weights' metadata")
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in fields.items() if k in known and k != "peft_type"})
    transformer = _transformer(pipe_or_transformer)
    state = {k[len(LORA_PREFIX) :]: v for k, v in load_file(str(weights)).items() if k.startswith(LORA_PREFIX)}
    inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise V51Error(f"LoRA folder {folder} does not fit this transformer: {unexpected[:3]} ...")
    set_v51_lora_scale(transformer, scale, adapter_name)
    return config


def set_v51_lora_scale(pipe_or_transformer, scale: float, adapter_name: str = "default") -> None:
    """Scale the adapter (0 gives the base model exactly), with diffusers' peft helper."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(_transformer(pipe_or_transformer), [adapter_name], [float(scale)])


# ----------------------------------------------------------------------------------------- fine-tuning
def _valid_frames(n: int, limit: int) -> int:
    """Largest 1 + 4k that is <= min(n, limit)."""
    m = min(n, limit)
    return 1 + 4 * ((m - 1) // 4)


def load_training_media(media: Any) -> np.ndarray:
    """An image or video sample -> uint8 (T, H, W, 3): arrays (H, W, 3)/(T, H, W, 3), tensors (T, 3, H, W), PIL
    images, image files, or video files (decoded at their own frame rate)."""
    from PIL import Image

    if isinstance(media, (str, Path)):
        path = Path(media)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return load_rgb(path)[None]
        from easyanimate.data.video_io import decode_frames

        return decode_frames(path)
    if isinstance(media, Image.Image):
        return load_rgb(media)[None]
    if isinstance(media, torch.Tensor):
        t = media.detach().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        return t.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    array = np.asarray(media)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise V51Error(f"training sample of shape {array.shape}: expected (H, W, 3) or (T, H, W, 3)")
    return array.astype(np.uint8)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []


def save_checkpoint(
    root: Path,
    step: int,
    losses: list[float],
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    keep: int = 2,
) -> Path:
    """``root/step-N/``: the trained weights (``save_weights(folder)``), the optimizer and the losses so far,
    written beside and renamed into place (a kill never leaves a half checkpoint); only the newest ``keep`` stay."""
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
    final = root / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_checkpoint(
    root: Path | None, load_weights: Callable[[Path], None], optimizer: torch.optim.Optimizer, device
) -> tuple[int, list[float]]:
    """``(step, losses)`` of the newest checkpoint in ``root``, its weights and optimizer state loaded; (0, [])."""
    if root is None or not _checkpoints(root):
        return 0, []
    last = _checkpoints(root)[-1]
    load_weights(last)
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True, map_location=device))
    progress = json.loads((last / "progress.json").read_text())
    return progress["step"], progress["losses"]


@dataclass
class LatentSample:
    """One training (or held-out) sample as the latent cache holds it: the MagViT posterior of its frames (unscaled
    ``mean``/``std``, (C, F, h, w)), its prompt's Qwen2-VL embedding (L, D) and, for an InP checkpoint, the inpaint
    condition with frame 1 given (mask and masked-video latents, scaled, (C', F, h, w))."""

    key: str
    caption: str
    mean: torch.Tensor
    std: torch.Tensor
    prompt_embeds: torch.Tensor
    inpaint_latents: torch.Tensor | None = None

    def draw(self, scaling: float, generator: torch.Generator) -> torch.Tensor:
        """``latent_dist.sample() * scaling_factor``, batch of one."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=torch.float32)
        return ((self.mean.float() + self.std.float() * noise) * scaling)[None]


def sample_frames(frames: np.ndarray, limit: int) -> np.ndarray:
    """Images train as one frame; a video as its first largest 1 + 4k frames, at most ``limit``."""
    return frames[:1] if frames.shape[0] < 5 else frames[: _valid_frames(frames.shape[0], limit)]


@torch.no_grad()
def encode_prompts(
    pipe: DiffusionPipeline, captions: Iterable[str], max_sequence_length: int
) -> dict[str, torch.Tensor]:
    """Each caption -> its (L, D) embedding from the pipeline's own ``encode_prompt`` (the empty one included)."""
    device = pipe._execution_device
    out = {}
    for caption in sorted(set(captions) | {""}):
        embeds = pipe.encode_prompt(
            prompt=caption,
            do_classifier_free_guidance=False,
            device=device,
            dtype=pipe.transformer.dtype,
            max_sequence_length=max_sequence_length,
        )[0]
        out[caption] = embeds[0].cpu()
    return out


@torch.no_grad()
def encode_sample(
    pipe: DiffusionPipeline, key: str, frames: np.ndarray, caption: str, prompt_embeds: torch.Tensor
) -> LatentSample:
    """uint8 (T, H, W, 3) frames (1 or 1 + 4k, sizes multiples of 16) -> a ``LatentSample``.

    The InP condition is built as diffusers' inpaint pipeline builds it for image-to-video: frame 1 kept, the rest
    masked (-1), encoded with the VAE's ``mode()``; the mask resized into latent space (``resize_mask``) when the
    transformer says so, else encoded like a video."""
    from diffusers.pipelines.easyanimate.pipeline_easyanimate_inpaint import resize_mask

    vae, transformer = pipe.vae, pipe.transformer
    device = pipe._execution_device
    n = frames.shape[0]
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]
    pixels = pixels.to(device, torch.float32).div(127.5).sub(1).to(vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    inpaint = None
    if pipeline_is_inpaint(pipe):
        scaling = vae.config.scaling_factor
        dtype = transformer.dtype
        mask = torch.ones(1, 1, n, *pixels.shape[-2:], device=device)
        mask[:, :, 0] = 0  # frame 1 given, the rest generated
        masked = (pixels * (mask < 0.5) - (mask > 0.5).to(pixels.dtype)).to(vae.dtype)
        masked_latents = vae.encode(masked)[0].mode().to(dtype) * scaling
        if transformer.config.resize_inpaint_mask_directly:
            mag_first_frame = getattr(vae.config, "cache_mag_vae", True)
            mask_latents = resize_mask(1 - mask, masked_latents, mag_first_frame).to(dtype) * scaling
        else:
            mask_latents = vae.encode(mask.repeat(1, 3, 1, 1, 1).to(vae.dtype))[0].mode().to(dtype) * scaling
        inpaint = torch.cat([mask_latents, masked_latents], dim=1)[0].cpu()
    return LatentSample(
        key,
        caption,
        posterior.mean[0].float().cpu(),
        posterior.std[0].float().cpu(),
        prompt_embeds,
        inpaint,
    )


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    inpaint_latents: torch.Tensor | None,
    weighting_scheme: str = "none",
) -> torch.Tensor:
    """The objective the V5.1 release trained with (rectified flow): ``x_t = (1 - sigma) x0 + sigma noise``, the
    transformer predicts ``noise - x0``; squared error weighted by diffusers' ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    dtype = transformer.dtype
    sigmas = sigmas.view(-1, 1, 1, 1, 1).float()
    xt = ((1 - sigmas) * x0.float() + sigmas * noise.float()).to(dtype)
    pred = transformer(
        xt,
        timesteps.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        inpaint_latents=None if inpaint_latents is None else inpaint_latents.to(dtype),
        return_dict=False,
    )[0]
    target = noise.float() - x0.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).float()
    return (weighting * (pred.float() - target) ** 2).mean()


def _inpaint_for_step(sample: LatentSample, transformer, latent_channels: int, use_condition: bool, like: torch.Tensor):
    if sample.inpaint_latents is None:
        return None
    if use_condition and sample.mean.shape[1] > 1:
        return sample.inpaint_latents[None].to(like.device)
    channels = transformer.config.in_channels - latent_channels
    return torch.zeros(1, channels, *like.shape[2:], device=like.device)  # the pipeline's text-to-video condition


def train_v51_transformer(
    transformer,
    scheduler_config: dict,
    scaling_factor: float,
    samples: Sequence[LatentSample],
    empty_prompt: torch.Tensor,
    cfg: V51Config,
    output_dir: str | Path,
    *,
    mode: str = "lora",
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: int = 2,
    log: Callable[[int, float], None] | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Fine-tune the V5.1 transformer on cached latents with the flow-matching objective the release trained with.

    ``mode`` "lora": a fresh peft LoRA (``cfg.lora_rank``/``lora_alpha``/``lora_target_modules``), adapters in float32,
    written in diffusers' LoRA format (``load_v51_lora`` loads it). "full": every transformer weight, trained in
    float32 at ``cfg.full_learning_rate`` and written as ``transformer/`` in ``cfg.dtype`` (a drop-in for the release's
    ``transformer/`` folder).

    Each step (batch of one): a sample drawn by ``(cfg.seed, step)``; ``x0`` from its cached posterior; ``sigma`` by
    diffusers' ``compute_density_for_timestep_sampling`` (``cfg.weighting_scheme``) over the scheduler's training
    sigmas; the empty prompt with ``cfg.caption_dropout``; an InP transformer gets its cached frame-1 condition with
    ``cfg.inpaint_i2v_ratio``, else the zero (text-to-video) condition. Every ``cfg.checkpoint_every`` steps the
    trained weights and optimizer go to ``checkpoint_dir/step-N/``; a rerun resumes from the newest one and, since each
    step's randomness comes from ``(cfg.seed, step)``, ends where an uninterrupted run ends.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if mode not in ("lora", "full"):
        raise V51Error(f"v51.finetune={mode!r}: choose lora or full")
    if not samples:
        raise V51Error("no training samples in the latent cache")
    device = torch.device(device or next(transformer.parameters()).device)
    transformer.requires_grad_(False)
    config = None
    if mode == "lora":
        config = add_v51_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        params = [p for p in transformer.parameters() if p.requires_grad]
        for p in params:  # adapters train in float32 even on a bf16 base
            p.data = p.data.float()
        lr = cfg.learning_rate
    else:
        transformer.to(torch.float32).requires_grad_(True)
        params = list(transformer.parameters())
        lr = cfg.full_learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    num_train_timesteps = train_scheduler.config.num_train_timesteps
    latent_channels = samples[0].mean.shape[0]
    dtype = transformer.dtype

    def save_weights(folder: Path) -> None:
        if mode == "lora":
            save_v51_lora(transformer, folder, config)
        else:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in transformer.state_dict().items()}
            save_file(state, folder / "transformer.safetensors")

    def load_weights(folder: Path) -> None:
        if mode == "lora":
            state = {k[len(LORA_PREFIX) :]: v for k, v in load_file(str(folder / LORA_WEIGHTS_NAME)).items()}
            set_peft_model_state_dict(transformer, state)
        else:
            transformer.load_state_dict(load_file(str(folder / "transformer.safetensors")))

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses = resume_checkpoint(ckpt_root, load_weights, optimizer, device)

    transformer.train()
    for step in range(start, cfg.train_steps):
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        sample = samples[int(rng.integers(len(samples)))]
        x0 = sample.draw(scaling_factor, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device)
        u = compute_density_for_timestep_sampling(
            cfg.weighting_scheme,
            1,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            generator=gen,
        )
        index = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1).cpu()
        timesteps = train_scheduler.timesteps[index].to(device)
        sigmas = train_scheduler.sigmas[index].to(device, torch.float32)
        use_condition = rng.random() < cfg.inpaint_i2v_ratio
        inpaint = _inpaint_for_step(sample, transformer, latent_channels, use_condition, x0)
        text = (empty_prompt if rng.random() < cfg.caption_dropout else sample.prompt_embeds)[None].to(device, dtype)
        loss = flow_matching_loss(transformer, x0, noise, sigmas, timesteps, text, inpaint, cfg.weighting_scheme)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step + 1, losses[-1])
        done = step + 1
        if ckpt_root is not None and (done % cfg.checkpoint_every == 0 or done == cfg.train_steps):
            save_checkpoint(ckpt_root, done, losses, save_weights, optimizer, keep_checkpoints)
    transformer.eval()

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "lora":
        save_v51_lora(transformer, out, config)
    else:
        transformer.to(DTYPES[cfg.dtype]).save_pretrained(out / "transformer", safe_serialization=True)
    summary = {
        "mode": mode,
        "steps": cfg.train_steps,
        "resumed_from": start,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "num_samples": len(samples),
        "inpaint": samples[0].inpaint_latents is not None,
        "weighting_scheme": cfg.weighting_scheme,
        **(
            {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "target_modules": list(cfg.lora_target_modules)}
            if mode == "lora"
            else {"learning_rate": cfg.full_learning_rate}
        ),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return out


def fit_sample(frames: np.ndarray, cfg: V51Config) -> np.ndarray:
    """A sample's frames as ``train_v51_lora`` trains them: 1 or 1 + 4k frames at train_height x train_width."""
    if cfg.train_height % 16 or cfg.train_width % 16:
        raise V51Error(f"v51.train_height/train_width ({cfg.train_height}x{cfg.train_width}) must be multiples of 16")
    return fit_frames(sample_frames(frames, cfg.train_num_frames), cfg.train_height, cfg.train_width)


def train_v51_lora(
    pipe_or_dir: DiffusionPipeline | str | Path,
    samples: Iterable[tuple[Any, str]],
    cfg: V51Config,
    output_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: int = 2,
    log: Callable[[int, float], None] | None = None,
) -> Path:
    """LoRA fine-tune of a loaded V5.1 pipeline (or folder) on ``(media, caption)`` pairs, in memory.

    Media as ``load_training_media`` takes them; each becomes one ``LatentSample`` (``fit_sample``: an image one
    frame, a video its first 1 + 4k frames up to ``cfg.train_num_frames``, scaled and centre-cropped to
    ``cfg.train_height`` x ``cfg.train_width``), then ``train_v51_transformer`` trains the adapter. The DAG's
    ``v51_latents`` and ``v51_finetune`` stages do the same from the curated clips, with a latent cache between.
    """
    if isinstance(pipe_or_dir, (str, Path)):
        pipe = load_v51_pipeline(pipe_or_dir, "none", dtype=cfg.dtype, device=device)
    else:
        pipe = pipe_or_dir
    items = [(fit_sample(load_training_media(media), cfg), caption) for media, caption in samples]
    if not items:
        raise V51Error("train_v51_lora: no training samples")
    for module in (pipe.vae, pipe.text_encoder, pipe.transformer):
        module.requires_grad_(False)
    texts = encode_prompts(pipe, [c for _, c in items], cfg.max_sequence_length)
    latents = [encode_sample(pipe, f"sample-{i}", f, c, texts[c]) for i, (f, c) in enumerate(items)]
    return train_v51_transformer(
        pipe.transformer,
        dict(pipe.scheduler.config),
        pipe.vae.config.scaling_factor,
        latents,
        texts[""],
        cfg,
        output_dir,
        mode="lora",
        checkpoint_dir=checkpoint_dir,
        keep_checkpoints=keep_checkpoints,
        log=log,
        device=pipe._execution_device,
    )
