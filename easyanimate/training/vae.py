"""Slice VAE training: stage 1 trains encoder and decoder, stage 2 fine-tunes the decoder only."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker

from easyanimate.config import Settings
from easyanimate.data.datasets import ClipSampler, load_clip_frames
from easyanimate.models.vae import SliceVAE
from easyanimate.training.common import TrainResult, make_accelerator, step_generator, train_loop
from easyanimate.utils import atomic_directory

ENCODER_MODULES = ("encoder", "quant_conv")


def build_vae(settings: Settings) -> SliceVAE:
    return SliceVAE(**settings.vae.model.model_dump())


def train_vae(
    settings: Settings,
    stage: int,
    curated_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    init_dir: Path | None = None,
    trackers: Sequence[GeneralTracker] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    if stage not in (1, 2):
        raise ValueError(f"VAE stage must be 1 or 2, got {stage}")
    cfg = settings.vae.stage1 if stage == 1 else settings.vae.stage2
    name = f"vae_stage{stage}"
    torch.manual_seed(cfg.seed)
    if stage == 1:
        model = build_vae(settings)
    else:
        if init_dir is None:
            raise ValueError("VAE stage 2 starts from the stage 1 model: pass init_dir")
        model = SliceVAE.from_pretrained(init_dir)
        for module in ENCODER_MODULES:
            getattr(model, module).requires_grad_(False)
    SliceVAE.check_num_frames(cfg.num_frames)
    clips = load_clip_frames(curated_dir, "train", cfg.resolution, cfg.sample_fps)
    sampler = ClipSampler(clips, cfg.num_frames, cfg.image_ratio, cfg.seed)
    accelerator = make_accelerator(settings.vae.mixed_precision, trackers)

    def compute_loss(vae: torch.nn.Module, step: int) -> torch.Tensor:
        x, _ = sampler.batch(step, cfg.batch_size)
        x = x.to(accelerator.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=step_generator(cfg.seed, step, x.device))
        recon = vae.decode(z).sample
        if stage == 1:
            # L1 reconstruction + a tiny KL (summed per sample, weight 1e-6 in the paper) keeps latents near N(0, I).
            kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
            kl_per_sample = kl.flatten(1).sum(dim=1).mean()
            return F.l1_loss(recon, x) + settings.vae.stage1.kl_weight * kl_per_sample
        return F.mse_loss(recon, x)

    result = train_loop(
        accelerator=accelerator,
        model=model,
        trainable=model.parameters(),
        cfg=cfg,
        compute_loss=compute_loss,
        ckpt_dir=ckpt_dir,
        name=name,
        tracker_config=cfg.model_dump(mode="json"),
        show_progress=show_progress,
    )
    with atomic_directory(out_dir) as tmp:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
    return result
