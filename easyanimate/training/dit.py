"""Video DiT training in the Slice VAE's latent space, in EasyAnimate's three stages.

1. image-only training adapts the DiT to the VAE;
2. only the motion module trains, on images and videos;
3. the whole model fine-tunes on the best clips (stricter aesthetic threshold).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

from easyanimate.config import BucketConfig, Settings, resolve_weight_path
from easyanimate.data.buckets import BucketTable, draw_batch, frame_bucket, frame_buckets_for, group_indices
from easyanimate.data.datasets import ClipFrames, load_clip_frames, to_model_range
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.dit.pixart import KeyMapReport, PixArtInitError, find_pixart_folder, init_from_pixart
from easyanimate.models.text_encoder import encode_prompts, load_text_encoder
from easyanimate.models.vae import SliceVAE
from easyanimate.schedulers import make_inference_scheduler, make_train_scheduler
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.training.common import (
    TrainResult,
    config_mismatches,
    latest_checkpoint,
    make_accelerator,
    step_generator,
    train_loop,
)
from easyanimate.utils import atomic_directory, atomic_file, atomic_write_json, hash_path


def build_transformer(settings: Settings, latent_channels: int, text_embed_dim: int) -> EasyAnimateTransformer3DModel:
    m = settings.dit.model
    return EasyAnimateTransformer3DModel(
        in_channels=latent_channels,
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        text_embed_dim=text_embed_dim,
        motion_module=m.motion_module,
        max_frames_latent=m.max_frames_latent,
        grid_reshape=m.grid_reshape,
        long_skips=m.long_skips,
        base_latent_size=m.base_resolution // 8,
        interpolation_scale=m.interpolation_scale,
        pos_embed_order=m.pos_embed_order,
        use_additional_conditions=m.use_additional_conditions,
    )


INIT_SETTING = "dit.init_from"


@dataclass
class DiTTrainResult(TrainResult):
    """``TrainResult`` plus what ``dit.init_from`` did: the key-map report, or why it was skipped."""

    init: KeyMapReport | None = None
    init_skipped: str | None = None

    def init_summary(self) -> dict | None:
        if self.init is not None:
            return self.init.summary()
        return {"skipped": self.init_skipped} if self.init_skipped else None


def pixart_init_source(
    settings: Settings, stage: int, init_dir: Path | None, ckpt_dir: Path
) -> tuple[Path | None, str | None]:
    """``(folder, None)`` when ``dit.init_from`` applies to this run, else ``(None, reason or None)``.

    It applies to stage 1 only, and only to a fresh model: resuming a checkpoint or warm-starting wins.
    """
    spec = settings.dit.init_from
    if stage != 1 or not spec:
        return None, None
    if init_dir is not None:
        return None, f"warm start from {init_dir}"
    if (latest := latest_checkpoint(Path(ckpt_dir))) is not None:
        return None, f"resuming {latest[1]}"
    try:
        folder = resolve_weight_path(spec, INIT_SETTING)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (a PixArtTransformer2DModel folder)") from None
    try:
        pixart = json.loads((find_pixart_folder(folder) / "config.json").read_text())
    except PixArtInitError as exc:
        raise ValueError(f"{INIT_SETTING}={spec!r}: {exc}") from None
    # Before any encoding: PixArt's caption projection takes the text encoder it was trained with (T5).
    encoder = resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder") / "config.json"
    if encoder.is_file() and pixart.get("caption_channels") is not None:
        text = json.loads(encoder.read_text())
        width = text.get("d_model", text.get("hidden_size"))
        if width is not None and width != pixart["caption_channels"]:
            raise ValueError(
                f"{INIT_SETTING}={spec!r} takes {pixart['caption_channels']}-wide text states (its T5), but "
                f"weights.text_encoder={settings.weights.text_encoder!r} gives {width}: point it at that T5 folder"
            )
    return folder, None


@dataclass
class TextBank:
    """Text-encoder states for every distinct caption, computed once; index 0 is the empty caption."""

    captions: list[str]
    hidden: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(cls, settings: Settings, captions: Sequence[str]) -> "TextBank":
        tokenizer, encoder = load_text_encoder(
            resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder")
        )
        unique = [""] + sorted({c for c in captions if c})
        hidden, mask = encode_prompts(tokenizer, encoder, unique, settings.dit.model.max_text_tokens)
        return cls(unique, hidden, mask)

    def index(self, caption: str) -> int:
        return self.captions.index(caption)

    @property
    def embed_dim(self) -> int:
        return int(self.hidden.shape[-1])


@dataclass
class LatentBank:
    """VAE latents (already scaled) of training windows, each with its caption index."""

    latents: list[torch.Tensor]  # each (C, T, h, w)
    caption_ids: list[int]

    def __len__(self) -> int:
        return len(self.latents)

    def buckets(self) -> list[np.ndarray]:
        """Indices of the latents of each shape (bucket); a batch is drawn from one of them."""
        return group_indices([tuple(z.shape) for z in self.latents])


def latent_multiple(vae: SliceVAE, model_config) -> int:
    """What every pixel side must be a multiple of: VAE compression x patch size (x the motion module's grid)."""
    grid = model_config["grid_reshape"] if model_config["motion_module"] else 1
    return vae.spatial_compression * model_config["patch_size"] * grid


def bucket_geometry(
    buckets: BucketConfig, resolution: int, num_frames: int, multiple: int, setting: str
) -> tuple[BucketTable | None, tuple[int, ...] | None]:
    """The stage's size table and video frame buckets, or ``(None, None)`` when buckets are off (square crops)."""
    if not buckets.enabled:
        return None, None
    try:
        table = BucketTable.build(resolution, buckets.aspect_ratios, multiple)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None
    frames = frame_buckets_for(num_frames, buckets.frame_buckets) if num_frames > 1 else None
    return table, frames


@torch.no_grad()
def encode_windows(
    vae: SliceVAE,
    clips: Sequence[ClipFrames],
    num_frames: int,
    text: TextBank,
    seed: int,
    batch: int = 8,
    frame_buckets: Sequence[int] | None = None,
) -> LatentBank:
    """Encode every non-overlapping ``num_frames`` window of every clip once (images: every frame).

    With ``frame_buckets`` (counts <= ``num_frames``) a clip shorter than ``num_frames`` is cut into windows of
    the largest bucket it fills instead of being left out.
    """
    windows, caption_ids = [], []
    for clip in clips:
        length = num_frames
        if frame_buckets is not None and num_frames > 1:
            length = frame_bucket(min(clip.frames.shape[0], num_frames), frame_buckets)
            if length is None:
                continue
        for start in range(0, clip.frames.shape[0] - length + 1, length):
            windows.append(clip.frames[start : start + length])
            caption_ids.append(text.index(clip.caption))
    # Only windows of one shape stack; the bank keeps the clips' order whatever the encode order.
    latents: list[torch.Tensor] = [None] * len(windows)  # type: ignore[list-item]
    generator = torch.Generator().manual_seed(seed)
    for group in group_indices([tuple(w.shape) for w in windows]):
        for i in range(0, len(group), batch):
            picks = group[i : i + batch]
            x = to_model_range(torch.stack([windows[j] for j in picks]))
            z = vae.encode(x).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            for j, latent in zip(picks, z.unbind(0)):
                latents[j] = latent
    return LatentBank(latents, caption_ids)


class LatentCache:
    """On-disk VAE latents of the training windows, keyed by the VAE weights, the curated manifest
    and the sampling settings (bucket geometry included): later stages and reruns skip both the video decode
    and the encode."""

    # Bumped when the file layout changes, so old entries are never misread.
    FORMAT = 2

    def __init__(
        self,
        root: Path,
        vae_dir: Path,
        curated_dir: Path,
        sampling: tuple,
        seed: int,
        frame_buckets: Sequence[int] | None = None,
    ):
        self.seed = seed
        self.frame_buckets = tuple(frame_buckets) if frame_buckets is not None else None
        digest = hashlib.sha256()
        digest.update(hash_path(Path(vae_dir) / "diffusion_pytorch_model.safetensors").encode())
        digest.update(hash_path(Path(curated_dir) / "manifest.parquet").encode())
        digest.update(json.dumps([sampling, seed, self.FORMAT], default=str).encode())
        self.dir = Path(root) / digest.hexdigest()[:20]

    def _path(self, num_frames: int) -> Path:
        # Frame buckets name the file, not the folder: stages that differ only in them still share the images.
        buckets = self.frame_buckets if num_frames > 1 else None
        suffix = "" if not buckets or buckets == (num_frames,) else "-f" + "_".join(map(str, buckets))
        return self.dir / f"windows-{num_frames}{suffix}.safetensors"

    def has(self, frame_counts: set[int]) -> bool:
        return (self.dir / "clips.json").exists() and all(self._path(n).exists() for n in frame_counts)

    def captions(self) -> list[str]:
        """Captions of the cached clips, one per clip."""
        return json.loads((self.dir / "clips.json").read_text())["captions"]

    def windows(self, vae: SliceVAE, clips: Sequence[ClipFrames] | None, num_frames: int, text: TextBank) -> LatentBank:
        path = self._path(num_frames)
        if path.exists():
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
                stacks = {key: iter(handle.get_tensor(key).unbind(0)) for key in handle.keys()}
            # Windows come back in the order they were encoded in, so batch picks match the first run's.
            latents = [next(stacks[key]) for key in json.loads(meta["keys"])]
            return LatentBank(latents, [text.index(c) for c in json.loads(meta["captions"])])
        if clips is None:
            raise FileNotFoundError(f"latent cache {self.dir} lacks {path.name} and no clips were decoded")
        bank = encode_windows(vae, clips, num_frames, text, self.seed, frame_buckets=self.frame_buckets)
        if len(bank):
            self.dir.mkdir(parents=True, exist_ok=True)
            keys = ["latents." + "x".join(map(str, z.shape)) for z in bank.latents]
            stacks = {
                key: torch.stack([z for z, k in zip(bank.latents, keys) if k == key]).contiguous()
                for key in dict.fromkeys(keys)
            }
            with atomic_file(path) as tmp:
                save_file(
                    stacks,
                    str(tmp),
                    metadata={
                        "keys": json.dumps(keys),
                        "captions": json.dumps([text.captions[i] for i in bank.caption_ids]),
                    },
                )
            atomic_write_json(self.dir / "clips.json", {"captions": [c.caption for c in clips]})
        return bank


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at random (or given) timesteps with noise from ``generator``."""
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = model(noisy, timesteps, hidden, encoder_attention_mask=mask).sample
    return F.mse_loss(pred.float(), noise.float())


def train_dit(
    settings: Settings,
    stage: int,
    curated_dir: Path,
    vae_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    init_dir: Path | None = None,
    trackers: Sequence[GeneralTracker] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    if stage not in (1, 2, 3):
        raise ValueError(f"DiT stage must be 1, 2 or 3, got {stage}")
    cfg = {1: settings.dit.stage1, 2: settings.dit.stage2, 3: settings.dit.stage3}[stage]
    name = f"dit_stage{stage}"
    pixart_dir, init_skipped = pixart_init_source(settings, stage, init_dir, ckpt_dir)  # fails fast on a bad path
    torch.manual_seed(cfg.seed)
    vae = SliceVAE.from_pretrained(vae_dir).eval().requires_grad_(False)
    SliceVAE.check_num_frames(cfg.num_frames)
    min_aesthetic = settings.dit.stage3.min_aesthetic if stage == 3 else None
    model_config = (
        dict(EasyAnimateTransformer3DModel.load_config(init_dir))
        if init_dir is not None
        else settings.dit.model.model_dump()
    )
    table, frame_buckets = bucket_geometry(
        cfg.buckets, cfg.resolution, cfg.num_frames, latent_multiple(vae, model_config), f"dit.stage{stage}.buckets"
    )
    sampling = ("train", cfg.resolution, cfg.sample_fps, min_aesthetic)
    if table is not None:
        sampling += (table.sizes,)
    cache = LatentCache(settings.paths.cache / "latents", vae_dir, curated_dir, sampling, cfg.seed, frame_buckets)
    clips = None
    if cache.has({1, cfg.num_frames}):
        captions = cache.captions()
    else:
        clips = load_clip_frames(
            curated_dir, "train", cfg.resolution, cfg.sample_fps, min_aesthetic=min_aesthetic, buckets=table
        )
        captions = [c.caption for c in clips]
    if not captions:
        raise ValueError(f"{name}: no training clips (min_aesthetic={min_aesthetic}); relax dit.stage3.min_aesthetic")
    text = TextBank.build(settings, captions)
    images = cache.windows(vae, clips, 1, text)
    videos = cache.windows(vae, clips, cfg.num_frames, text) if cfg.num_frames > 1 else images
    if cfg.image_ratio < 1 and len(videos) == 0:
        raise ValueError(f"{name}: no clip is long enough for {cfg.num_frames} frames at {cfg.sample_fps} fps")

    init_report = None
    if init_dir is None:
        if stage != 1:
            raise ValueError(f"{name} starts from the previous stage: pass init_dir")
        model = build_transformer(settings, vae.config.latent_channels, text.embed_dim)
        if pixart_dir is not None:
            try:
                init_report = init_from_pixart(model, pixart_dir)
            except PixArtInitError as exc:
                raise ValueError(f"{INIT_SETTING}={settings.dit.init_from!r}: {exc}") from None
    else:
        model = EasyAnimateTransformer3DModel.from_pretrained(init_dir)
    if stage == 2:
        model.requires_grad_(False)
        for param in model.motion_parameters():
            param.requires_grad_(True)
    trainable = list(model.parameters())
    scheduler = make_train_scheduler(settings)
    accelerator = make_accelerator(settings.dit.mixed_precision, trackers)

    buckets = {id(images): images.buckets(), id(videos): videos.buckets()}

    def compute_loss(dit: torch.nn.Module, step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step])
        bank = images if (cfg.num_frames == 1 or rng.random() < cfg.image_ratio) else videos
        picks = draw_batch(buckets[id(bank)], rng, cfg.batch_size)  # one bucket per batch, so it stacks
        latents = torch.stack([bank.latents[i] for i in picks]).to(accelerator.device)
        # Dropping captions teaches the unconditional branch classifier-free guidance needs.
        ids = [0 if rng.random() < settings.dit.caption_dropout else bank.caption_ids[i] for i in picks]
        hidden, mask = text.hidden[ids].to(accelerator.device), text.mask[ids].to(accelerator.device)
        return diffusion_loss(dit, scheduler, latents, hidden, mask, step_generator(cfg.seed, step))

    result = train_loop(
        accelerator=accelerator,
        model=model,
        trainable=trainable,
        cfg=cfg,
        compute_loss=compute_loss,
        ckpt_dir=ckpt_dir,
        name=name,
        tracker_config=cfg.model_dump(mode="json"),
        show_progress=show_progress,
    )
    with atomic_directory(out_dir) as tmp:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
    return DiTTrainResult(
        **{f.name: getattr(result, f.name) for f in fields(TrainResult)}, init=init_report, init_skipped=init_skipped
    )


@torch.no_grad()
def render_samples(settings: Settings, vae_dir: Path, dit_dir: Path, out_dir: Path) -> list[Path]:
    """Videos for the fixed prompts and seeds of ``generate``, so stages compare by eye in MLflow."""
    from easyanimate.data.video_io import write_video
    from easyanimate.pipelines import EasyAnimatePipeline

    tokenizer, encoder = load_text_encoder(resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder"))
    pipe = EasyAnimatePipeline(
        vae=SliceVAE.from_pretrained(vae_dir),
        transformer=EasyAnimateTransformer3DModel.from_pretrained(dit_dir),
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=make_inference_scheduler(settings),
    )
    pipe.set_progress_bar_config(disable=True)
    g = settings.generate
    paths = []
    for i, prompt in enumerate(g.prompts):
        frames = pipe(
            prompt,
            generator=torch.Generator().manual_seed(g.seed + i),
            output_type="np",
            **settings.generate.pipeline_kwargs(settings.dit.model.max_text_tokens),
        ).frames[0]
        path = Path(out_dir) / f"sample_{i}.mp4"
        write_video(frames, path, fps=g.fps)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ stage entries
def warm_start_problems(settings: Settings, transformer_dir: Path) -> list[str]:
    """Why the transformer in ``transformer_dir`` cannot warm-start stage 1 under ``settings``."""
    file = Path(transformer_dir) / "config.json"
    text_dim = json.loads(file.read_text()).get("text_embed_dim", 0) if file.exists() else 0
    with torch.device("meta"):  # a paper-size model allocates nothing
        fresh = build_transformer(settings, settings.vae.model.latent_channels, text_dim)
    return config_mismatches(transformer_dir, dict(fresh.config), "dit.model")


def run_stage(settings: Settings, ctx: StageContext, stage: int) -> StageResult:
    name = f"dit_stage{stage}"
    out = getattr(settings.paths, name)
    init = {1: ctx.warm_start, 2: settings.paths.dit_stage1, 3: settings.paths.dit_stage2}[stage]
    if stage == 1 and init is not None and (problems := warm_start_problems(settings, init)):
        raise ValueError("retrain.init_pipeline cannot warm-start these settings:\n  " + "\n  ".join(problems))
    result = train_dit(
        settings,
        stage,
        settings.paths.curated,
        settings.paths.vae_stage2,
        out,
        ckpt_dir=ctx.checkpoint_dir,
        init_dir=init,
        trackers=ctx.trackers,
        show_progress=ctx.show_progress,
    )
    metrics = result.metrics(name)
    info: dict = {"parent": str(init) if init else None}
    artifacts: list[Path] = []
    if (init_summary := result.init_summary()) is not None:
        info["init_from"] = init_summary
    if result.init is not None:
        metrics[f"{name}/init_loaded_keys"] = float(len(result.init.loaded))
        metrics[f"{name}/init_new_keys"] = float(len(result.init.new))
        key_map = Path(ctx.report_dir) / "init_key_map.json"
        key_map.parent.mkdir(parents=True, exist_ok=True)
        key_map.write_text(result.init.to_json())
        artifacts.append(key_map)
    write_reports(ctx.report_dir, metrics, result.losses)
    samples = render_samples(settings, settings.paths.vae_stage2, out, ctx.report_dir / "samples")
    return StageResult(
        name,
        metrics,
        {name: out},
        [ctx.report_dir / "loss.csv", *artifacts, *samples],
        info=info,
        tags={"parent_checkpoint": str(init)} if init else {},
    )


def run_stage1(settings: Settings, ctx: StageContext) -> StageResult:
    return run_stage(settings, ctx, 1)


def run_stage2(settings: Settings, ctx: StageContext) -> StageResult:
    return run_stage(settings, ctx, 2)


def run_stage3(settings: Settings, ctx: StageContext) -> StageResult:
    return run_stage(settings, ctx, 3)
