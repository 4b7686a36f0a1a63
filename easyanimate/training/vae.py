"""Slice VAE training: stage 1 trains encoder and decoder, stage 2 fine-tunes the decoder only.

Stage 1: L1 + KL + optional LPIPS + optional hinge-GAN (2D per-frame and 3D patch critics, VQGAN adaptive
weight, from ``adversarial.disc_start_step``). Stage 2: L2 (+ the same optional GAN term) with the encoder and
``quant_conv`` frozen, so latents the DiT is trained on do not move.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker
from diffusers.training_utils import EMAModel

from easyanimate.config import Settings, VAETrainConfig, resolve_weight_path
from easyanimate.data.datasets import ClipSampler, load_clip_frames
from easyanimate.models.vae import SliceVAE
from easyanimate.models.vae.reconstruct import valid_length
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.training.common import TrainResult, config_mismatches, make_accelerator, step_generator, train_loop
from easyanimate.training.losses import (
    LPIPS,
    VideoDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_per_sample,
)
from easyanimate.utils import atomic_directory

log = logging.getLogger(__name__)

ENCODER_MODULES = ("encoder", "quant_conv")


def build_vae(settings: Settings) -> SliceVAE:
    return SliceVAE(**settings.vae.model.model_dump())


@dataclass(frozen=True)
class PerceptualStatus:
    enabled: bool
    reason: str


def perceptual_status(settings: Settings) -> PerceptualStatus:
    """Whether stage 1 uses LPIPS, and why (its backbone weights only ever come from ``weights.lpips``)."""
    if settings.vae.stage1.perceptual_weight <= 0:
        return PerceptualStatus(False, "off: vae.stage1.perceptual_weight is 0")
    if not settings.weights.lpips:
        return PerceptualStatus(False, "off: weights.lpips is not set (no local LPIPS/VGG16 weights)")
    return PerceptualStatus(True, f"on: {settings.weights.lpips}")


def _load_perceptual(settings: Settings) -> LPIPS | None:
    status = perceptual_status(settings)
    if not status.enabled:
        log.warning("VAE perceptual loss %s", status.reason)
        return None
    log.info("VAE perceptual loss %s", status.reason)
    return LPIPS.from_file(resolve_weight_path(settings.weights.lpips, "weights.lpips"))


class _Adversary:
    """The discriminator, its optimiser, and both sides of the hinge game for one training step."""

    def __init__(self, cfg: VAETrainConfig, in_channels: int, accelerator):
        adv = cfg.adversarial
        self.cfg = adv
        disc = VideoDiscriminator(in_channels, adv.channels, adv.layers, adv.use_2d, adv.use_3d)
        # Adam(0.5, 0.9) as in VQGAN/taming: GAN critics train poorly with the default momentum.
        opt = torch.optim.Adam(disc.parameters(), lr=adv.learning_rate, betas=(0.5, 0.9))
        # Prepared before train_loop's own prepare, so accelerate checkpoints and restores them with the run.
        self.disc, self.opt = accelerator.prepare(disc, opt)
        self.accelerator = accelerator

    def active(self, step: int) -> bool:
        return step >= self.cfg.disc_start_step

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float | None:
        """One critic update on (real, detached fake); runs before the generator term so that term sees the
        updated critic (an in-place update after would invalidate the generator's autograd graph)."""
        self.disc.requires_grad_(True)
        real_logits, fake_logits = self.disc(real), self.disc(fake.detach())
        if not real_logits:
            return None
        loss = hinge_d_loss(real_logits, fake_logits)
        self.accelerator.backward(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor | None:
        self.disc.requires_grad_(False)
        logits = self.disc(fake)
        return hinge_g_loss(logits) if logits else None


@torch.no_grad()
def fit_scaling_factor(vae: SliceVAE, sampler: ClipSampler, batches: int, batch_size: int, device) -> float:
    """1 / std of the posterior means of ``batches`` training batches (drawn after the training steps' seeds)."""
    was_training = vae.training
    vae.eval()
    latents = [
        vae.encode(sampler.batch(10**9 + i, batch_size)[0].to(device)).latent_dist.mode().flatten().float()
        for i in range(batches)
    ]
    vae.train(was_training)
    std = float(torch.cat(latents).std())
    if not std > 0:
        raise ValueError("the VAE's training latents have zero variance: cannot fit scaling_factor")
    return 1.0 / std


def _training_clips(cfg: VAETrainConfig, curated_dir: Path):
    if not cfg.augment.random_crop:
        return load_clip_frames(curated_dir, "train", cfg.resolution, cfg.sample_fps)
    # Each scale is a separate decode of every clip (whole frame, aspect kept); the sampler crops them.
    clips = []
    for scale in cfg.augment.scales:
        clips += load_clip_frames(
            curated_dir, "train", round(cfg.resolution * scale), cfg.sample_fps, square_crop=False
        )
    return clips


def _decoder_last_layer(vae: torch.nn.Module, accelerator) -> torch.Tensor:
    return accelerator.unwrap_model(vae).decoder.conv_out.weight


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
        # init_dir warm-starts stage 1 (retraining continues from the champion's VAE).
        if init_dir is not None:
            model = SliceVAE.from_pretrained(init_dir)
        else:
            model = build_vae(settings)
            if settings.vae.stage1.init_logvar is not None:
                model.init_posterior_logvar(settings.vae.stage1.init_logvar)
    else:
        if init_dir is None:
            raise ValueError("VAE stage 2 starts from the stage 1 model: pass init_dir")
        model = SliceVAE.from_pretrained(init_dir)
        for module in ENCODER_MODULES:
            getattr(model, module).requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    SliceVAE.check_num_frames(cfg.num_frames)
    clips = _training_clips(cfg, curated_dir)
    aug = cfg.augment
    sampler = ClipSampler(
        clips,
        cfg.num_frames,
        cfg.image_ratio,
        cfg.seed,
        crop_size=cfg.resolution if aug.random_crop else None,
        hflip=aug.hflip,
    )
    # bf16/fp16 only take effect on GPU: make_accelerator forces full precision on CPU.
    accelerator = make_accelerator(settings.vae.mixed_precision, trackers)
    perceptual = _load_perceptual(settings) if stage == 1 else None
    if perceptual is not None:
        perceptual.to(accelerator.device)
    adversary = _Adversary(cfg, model.config.in_channels, accelerator) if cfg.adversarial.enabled else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = None
    if cfg.ema_decay is not None:
        ema = EMAModel(trainable, decay=cfg.ema_decay)
        ema.to(accelerator.device)

    def compute_loss(vae: torch.nn.Module, step: int) -> torch.Tensor:
        x, _ = sampler.batch(step, cfg.batch_size)
        x = x.to(accelerator.device)
        with accelerator.autocast():
            # encode/decode bypass the prepared forward(), so autocast (bf16 on GPU) is entered here.
            with torch.set_grad_enabled(stage == 1):
                posterior = vae.encode(x).latent_dist
                z = posterior.sample(generator=step_generator(cfg.seed, step, x.device))
            recon = vae.decode(z).sample
            parts: dict[str, float] = {}
            if stage == 1:
                rec = F.l1_loss(recon.float(), x)
                if perceptual is not None:
                    p_loss = perceptual(recon.float(), x)
                    parts["perceptual"] = float(p_loss.detach())
                    rec = rec + settings.vae.stage1.perceptual_weight * p_loss
                kl = kl_per_sample(posterior)
                parts["kl"] = float(kl.detach())
                loss = rec + settings.vae.stage1.kl_weight * kl
            else:
                rec = F.mse_loss(recon.float(), x)
                loss = rec
            parts["rec_loss"] = float(rec.detach())
            if adversary is not None and adversary.active(step):
                d_loss = adversary.discriminator_step(x, recon)
                g_loss = adversary.generator_loss(recon)
                if d_loss is not None and g_loss is not None:
                    weight = adaptive_weight(
                        rec, g_loss, _decoder_last_layer(vae, accelerator), cfg.adversarial.max_adaptive_weight
                    )
                    loss = loss + cfg.adversarial.weight * weight * g_loss
                    parts.update(d_loss=d_loss, g_loss=float(g_loss.detach()), adaptive_weight=float(weight))
        accelerator.log({f"{name}/{k}": v for k, v in parts.items()}, step=step + 1)
        return loss

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
        lr_schedule=cfg.lr_scheduler,
        ema=ema,
    )
    trained = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(trainable)
    if stage == 1 and settings.vae.stage1.fit_scaling_factor:
        factor = fit_scaling_factor(
            trained, sampler, settings.vae.stage1.scaling_batches, cfg.batch_size, accelerator.device
        )
        trained.register_to_config(scaling_factor=factor)
        accelerator.log({f"{name}/scaling_factor": factor}, step=cfg.steps)
        log.info("VAE scaling_factor fitted to the training latents: %.5f", factor)
    with atomic_directory(out_dir) as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
    return result


# ------------------------------------------------------------------------------------------ held-out check
def side_by_side(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 pair -> (T, H, 2W, 3): original left, reconstruction right."""
    return np.concatenate([original, reconstruction], axis=2)


@torch.no_grad()
def evaluate_vae(
    settings: Settings, vae_dir: Path, curated_dir: Path, out_dir: Path, resolution: int, sample_fps: float
) -> tuple[dict[str, float], list[Path]]:
    """PSNR/SSIM of reconstructions of the manifest's ``val`` clips (never trained on) and a side-by-side mp4.

    Returns ``({"vae_psnr": .., "vae_ssim": .., "vae_eval_clips": ..}, [video path])``; no val clips -> empty.
    """
    from easyanimate.data.video_io import write_video
    from easyanimate.evaluation.metrics import psnr, ssim

    ev = settings.vae.eval
    clips = load_clip_frames(curated_dir, "val", resolution, sample_fps)[: ev.max_clips]
    if not clips:
        log.warning("no val clips in %s: skipping the VAE's held-out evaluation", curated_dir)
        return {}, []
    vae = SliceVAE.from_pretrained(vae_dir).eval()
    psnrs, ssims, panels = [], [], []
    for clip in clips:
        frames = clip.frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
        length = valid_length(frames.shape[0], ev.num_frames)
        original = np.ascontiguousarray(frames[:length])
        recon = vae.reconstruct_video(original)
        psnrs.append(psnr(original, recon))
        ssims.append(ssim(original, recon))
        panels.append(side_by_side(original, recon))
    video = out_dir / "reconstruction_side_by_side.mp4"
    # Clips may differ in length; the panel video plays them one after another.
    write_video(np.concatenate(panels, axis=0), video, fps=ev.fps)
    metrics = {
        "vae_psnr": float(np.mean(psnrs)),
        "vae_ssim": float(np.mean(ssims)),
        "vae_eval_clips": float(len(clips)),
    }
    return metrics, [video]


# ------------------------------------------------------------------------------------------ stage entries
def warm_start_problems(settings: Settings, vae_dir: Path) -> list[str]:
    """Why the VAE in ``vae_dir`` cannot warm-start stage 1 under ``settings`` (empty when it can)."""
    with torch.device("meta"):  # a paper-size model allocates nothing
        fresh = build_vae(settings)
    # A champion that fitted its own scaling factor, or slices/tiles differently, still warm-starts.
    return config_mismatches(
        vae_dir, dict(fresh.config), "vae.model", ignore=SliceVAE.EXECUTION_CONFIG_KEYS | {"scaling_factor"}
    )


def run_stage(settings: Settings, ctx: StageContext, stage: int) -> StageResult:
    name = f"vae_stage{stage}"
    out = getattr(settings.paths, name)
    cfg = settings.vae.stage1 if stage == 1 else settings.vae.stage2
    init = settings.paths.vae_stage1 if stage == 2 else ctx.warm_start
    if stage == 1 and init is not None and (problems := warm_start_problems(settings, init)):
        raise ValueError("retrain.init_pipeline cannot warm-start these settings:\n  " + "\n  ".join(problems))
    result = train_vae(
        settings,
        stage,
        settings.paths.curated,
        out,
        ckpt_dir=ctx.checkpoint_dir,
        init_dir=init,
        trackers=ctx.trackers,
        show_progress=ctx.show_progress,
    )
    # Held-out reconstruction quality on the val clips, at the stage's training resolution and frame rate.
    eval_metrics, videos = evaluate_vae(
        settings, out, settings.paths.curated, ctx.report_dir, cfg.resolution, cfg.sample_fps
    )
    metrics = {**result.metrics(name), **{f"{name}/{k}": v for k, v in eval_metrics.items()}}
    info: dict = {"parent": str(init) if init else None}
    tags = {"parent_checkpoint": str(init)} if init else {}
    if stage == 1:
        perceptual = perceptual_status(settings)
        metrics[f"{name}/perceptual_enabled"] = float(perceptual.enabled)
        info["perceptual_loss"] = tags["perceptual_loss"] = perceptual.reason
    write_reports(ctx.report_dir, metrics, result.losses)
    return StageResult(name, metrics, {name: out}, [ctx.report_dir / "loss.csv", *videos], info=info, tags=tags)


def run_stage1(settings: Settings, ctx: StageContext) -> StageResult:
    return run_stage(settings, ctx, 1)


def run_stage2(settings: Settings, ctx: StageContext) -> StageResult:
    return run_stage(settings, ctx, 2)
