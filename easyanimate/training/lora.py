"""LoRA fine-tuning of the DiT through peft: small adapters on the attention projections."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from peft import LoraConfig

from easyanimate.config import Settings
from easyanimate.data.datasets import ClipFrames, load_clip_frames
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.vae import SliceVAE
from easyanimate.pipelines.pipeline_easyanimate import save_transformer_lora
from easyanimate.training.common import TrainResult, make_accelerator, step_generator, train_loop
from easyanimate.training.dit import TextBank, diffusion_loss, encode_windows, make_train_scheduler
from easyanimate.utils import atomic_directory

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image_folder(folder: Path, resolution: int) -> list[ClipFrames]:
    """Images with a caption in ``<name>.txt`` beside each (EasyAnimate's few-image style sets)."""
    from PIL import Image

    items = []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.exists() else ""
        image = Image.open(path).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))))
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        frames = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
        items.append(ClipFrames(path.stem, caption, float("nan"), frames))
    if not items:
        raise ValueError(f"lora.data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


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
    if settings.lora.data_dir:
        items = load_image_folder(settings.lora.data_dir, cfg.resolution)
    else:
        items = load_clip_frames(curated_dir, "train", cfg.resolution, cfg.sample_fps)
    text = TextBank.build(settings, [c.caption for c in items])
    bank = encode_windows(vae, items, cfg.num_frames, text, cfg.seed)
    if len(bank) == 0:
        raise ValueError("lora: no training samples")

    model = EasyAnimateTransformer3DModel.from_pretrained(dit_dir)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(
        r=settings.lora.rank, lora_alpha=settings.lora.alpha,
        target_modules=list(settings.lora.target_modules), init_lora_weights="gaussian",
    ))
    scheduler = make_train_scheduler(settings)
    accelerator = make_accelerator(settings.dit.mixed_precision, trackers)

    def compute_loss(dit: torch.nn.Module, step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step])
        picks = rng.integers(len(bank), size=cfg.batch_size)
        latents = torch.stack([bank.latents[i] for i in picks]).to(accelerator.device)
        ids = [bank.caption_ids[i] for i in picks]
        return diffusion_loss(dit, scheduler, latents, text.hidden[ids].to(accelerator.device),
                              text.mask[ids].to(accelerator.device), step_generator(cfg.seed, step))

    result = train_loop(
        accelerator=accelerator, model=model, trainable=[p for p in model.parameters() if p.requires_grad],
        cfg=cfg, compute_loss=compute_loss, ckpt_dir=ckpt_dir, name="lora",
        tracker_config={"rank": settings.lora.rank, "alpha": settings.lora.alpha, **cfg.model_dump(mode="json")},
        show_progress=show_progress,
    )
    with atomic_directory(out_dir) as tmp:
        save_transformer_lora(accelerator.unwrap_model(model), tmp)
    return result
