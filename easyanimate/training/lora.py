"""LoRA fine-tuning of the DiT through peft: small adapters on the attention projections.

Data: the curated clips, or ``lora.data_dir``, a folder of style images and/or videos with captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from peft import LoraConfig

from easyanimate.config import Settings
from easyanimate.data.buckets import BucketTable, draw_batch
from easyanimate.data.datasets import ClipFrames, center_crop, cover_size, load_clip_frames
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.vae import SliceVAE
from easyanimate.pipelines.pipeline_easyanimate import save_transformer_lora
from easyanimate.schedulers import make_train_scheduler
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.training.common import TrainResult, make_accelerator, step_generator, train_loop
from easyanimate.training.dit import (
    LatentBank,
    TextBank,
    bucket_geometry,
    diffusion_loss,
    encode_windows,
    latent_multiple,
)
from easyanimate.utils import atomic_directory

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _square_crop(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) already resized so the short side is ``resolution`` -> centre crop (T, 3, r, r)."""
    top, left = (frames.shape[1] - resolution) // 2, (frames.shape[2] - resolution) // 2
    crop = frames[:, top : top + resolution, left : left + resolution]
    return torch.from_numpy(np.array(crop)).permute(0, 3, 1, 2).contiguous()


def _short_side_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def load_style_folder(
    folder: Path,
    resolution: int,
    sample_fps: float,
    video_suffixes: Sequence[str],
    buckets: BucketTable | None = None,
) -> list[ClipFrames]:
    """Images and/or videos with a caption in ``<name>.txt`` beside each (EasyAnimate's style sets).

    Images become one-frame clips; videos are sampled at ``sample_fps``. Both are centre-cropped squares, or with
    ``buckets`` resized to cover the bucket nearest their aspect ratio and centre-cropped to it.
    """
    from PIL import Image

    from easyanimate.data.video_io import decode_frames, probe

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"lora.data_dir {folder} is not a folder")
    suffixes = set(IMAGE_SUFFIXES) | {s.lower() for s in video_suffixes}
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.exists() else ""
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = Image.open(path).convert("RGB")
            width, height = image.width, image.height
        else:
            info = probe(path)
            width, height = info.width, info.height
        bucket = buckets.nearest(height, width) if buckets is not None else None
        if bucket is not None:
            cover_h, cover_w = cover_size(height, width, bucket)
            size = (cover_w, cover_h)
        else:
            size = _short_side_size(width, height, resolution)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            frames = np.asarray(image.resize(size))[None]
        else:
            frames = decode_frames(path, times=list(np.arange(0.0, info.duration_s, 1.0 / sample_fps)), size=size)
        if bucket is not None:
            tensor = center_crop(torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2), bucket).contiguous()
        else:
            tensor = _square_crop(frames, resolution)
        items.append(ClipFrames(path.stem, caption, float("nan"), tensor))
    if not items:
        raise ValueError(
            f"lora.data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
            f"or videos ({', '.join(video_suffixes)})"
        )
    return items


def build_latent_banks(
    vae: SliceVAE,
    items: Sequence[ClipFrames],
    num_frames: int,
    text: TextBank,
    seed: int,
    frame_buckets: Sequence[int] | None = None,
) -> tuple[LatentBank, LatentBank]:
    """``(image bank, video bank)``: single frames of every item, and ``num_frames`` windows of the videos
    (with ``frame_buckets``, shorter videos give windows of the largest bucket they fill).

    A batch always comes from one bank (as in EasyAnimate's image/video mixing) and one shape within it;
    with ``num_frames == 1`` the video bank is empty.
    """
    images = encode_windows(vae, items, 1, text, seed)
    if num_frames == 1:
        return images, LatentBank([], [])
    min_frames = min(frame_buckets) if frame_buckets else num_frames
    videos = encode_windows(
        vae, [c for c in items if c.frames.shape[0] >= min_frames], num_frames, text, seed, frame_buckets=frame_buckets
    )
    return images, videos


def train_lora(
    settings: Settings,
    curated_dir: Path,
    vae_dir: Path,
    dit_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    trackers: Sequence[GeneralTracker] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    cfg = settings.lora.train
    torch.manual_seed(cfg.seed)
    vae = SliceVAE.from_pretrained(vae_dir).eval().requires_grad_(False)
    table, frame_buckets = bucket_geometry(
        cfg.buckets,
        cfg.resolution,
        cfg.num_frames,
        latent_multiple(vae, EasyAnimateTransformer3DModel.load_config(dit_dir)),
        "lora.train.buckets",
    )
    if settings.lora.data_dir:
        items = load_style_folder(
            settings.lora.data_dir, cfg.resolution, cfg.sample_fps, settings.curate.video_extensions, buckets=table
        )
    else:
        items = load_clip_frames(curated_dir, "train", cfg.resolution, cfg.sample_fps, buckets=table)
    text = TextBank.build(settings, [c.caption for c in items])
    image_bank, video_bank = build_latent_banks(vae, items, cfg.num_frames, text, cfg.seed, frame_buckets)
    if len(image_bank) == 0:
        raise ValueError("lora: no training samples")
    if cfg.num_frames > 1 and cfg.image_ratio < 1 and len(video_bank) == 0:
        raise ValueError(
            f"lora: no video has lora.train.num_frames={cfg.num_frames} frames at "
            f"lora.train.sample_fps={cfg.sample_fps}; lower num_frames or set image_ratio: 1.0"
        )

    model = EasyAnimateTransformer3DModel.from_pretrained(dit_dir)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=settings.lora.rank,
            lora_alpha=settings.lora.alpha,
            target_modules=list(settings.lora.target_modules),
            init_lora_weights="gaussian",
        )
    )
    scheduler = make_train_scheduler(settings)
    accelerator = make_accelerator(settings.dit.mixed_precision, trackers)

    buckets = {id(image_bank): image_bank.buckets(), id(video_bank): video_bank.buckets()}

    def compute_loss(dit: torch.nn.Module, step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step])
        bank = image_bank if len(video_bank) == 0 or rng.random() < cfg.image_ratio else video_bank
        picks = draw_batch(buckets[id(bank)], rng, cfg.batch_size)  # one bucket per batch, so it stacks
        latents = torch.stack([bank.latents[i] for i in picks]).to(accelerator.device)
        ids = [bank.caption_ids[i] for i in picks]
        return diffusion_loss(
            dit,
            scheduler,
            latents,
            text.hidden[ids].to(accelerator.device),
            text.mask[ids].to(accelerator.device),
            step_generator(cfg.seed, step),
        )

    result = train_loop(
        accelerator=accelerator,
        model=model,
        trainable=[p for p in model.parameters() if p.requires_grad],
        cfg=cfg,
        compute_loss=compute_loss,
        ckpt_dir=ckpt_dir,
        name="lora",
        tracker_config={"rank": settings.lora.rank, "alpha": settings.lora.alpha, **cfg.model_dump(mode="json")},
        show_progress=show_progress,
    )
    with atomic_directory(out_dir) as tmp:
        save_transformer_lora(accelerator.unwrap_model(model), tmp)
    return result


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    result = train_lora(
        settings,
        settings.paths.curated,
        settings.paths.vae_stage2,
        settings.paths.dit_stage3,
        settings.paths.lora,
        ckpt_dir=ctx.checkpoint_dir,
        trackers=ctx.trackers,
        show_progress=ctx.show_progress,
    )
    metrics = result.metrics("lora")
    write_reports(ctx.report_dir, metrics, result.losses)
    return StageResult("lora", metrics, {"lora": settings.paths.lora}, [ctx.report_dir / "loss.csv"])
