"""The ``v51_vae`` stage: optionally fine-tune the released MagViT VAE's decoder on the curated clips.

The encoder stays frozen, so the latent space (and the ``v51_latents`` cache, the transformer and its LoRA) is the
release's: only how latents turn back into pixels adapts to the footage, as EasyAnimate's own decoder-only VAE stage
does. Each step reconstructs a random ``v51.vae_crop`` square of ``v51.vae_num_frames`` frames of a training clip from
a posterior sample; the loss is L1 plus MSE in pixels. Resumes from its newest checkpoint.

``v51.vae_decoder_steps: 0`` (the default) keeps the release's VAE: ``paths.v51_vae`` then holds its files (hard
links where the file system allows). Either way ``v51_evaluate`` assembles the pipeline with ``paths.v51_vae``, and
its held-out PSNR/SSIM measure the decoder that ships.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from easyanimate.config import Settings
from easyanimate.families.v51 import (
    V51Error,
    check_v51_folder,
    default_device,
    resume_checkpoint,
    sample_frames,
    save_checkpoint,
)
from easyanimate.families.v51_latents import clips_by_split
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.utils import atomic_directory, link_or_copy

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def _decoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def _random_window(frames: np.ndarray, num_frames: int, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random 1 + 4k window (at most ``num_frames``) and a random ``crop`` square (smaller frames: all of it)."""
    count = sample_frames(frames, num_frames).shape[0]
    first = int(rng.integers(frames.shape[0] - count + 1))
    window = frames[first : first + count]
    h, w = window.shape[1:3]
    size_h, size_w = min(crop, h - h % 16), min(crop, w - w % 16)
    top, left = int(rng.integers(h - size_h + 1)), int(rng.integers(w - size_w + 1))
    return window[:, top : top + size_h, left : left + size_w]


def finetune_decoder(vae, clips: list[np.ndarray], settings: Settings, checkpoint_dir: Path | None, log=None) -> dict:
    """Train ``vae``'s decoder in place on uint8 (T, H, W, 3) ``clips``; returns the training summary."""
    v = settings.v51
    device = next(vae.parameters()).device
    vae.requires_grad_(False)
    params = [p for name, p in vae.named_parameters() if name.startswith(DECODER_PREFIXES)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=v.vae_learning_rate, weight_decay=v.weight_decay)

    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: t.detach().cpu().contiguous() for k, t in _decoder_state(vae).items()}, folder / "decoder.safetensors"
        )

    def load(folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(folder / "decoder.safetensors"))
        if set(state) != set(_decoder_state(vae)):
            raise V51Error(f"checkpoint {folder} does not hold this VAE's decoder")
        vae.load_state_dict(state, strict=False)

    start, losses = resume_checkpoint(checkpoint_dir, load, optimizer, device)
    vae.train()
    for step in range(start, v.vae_decoder_steps):
        rng = np.random.default_rng([v.seed, 7, step])
        generator = torch.Generator().manual_seed(v.seed * 1_000_033 + step)
        window = _random_window(clips[int(rng.integers(len(clips)))], v.vae_num_frames, v.vae_crop, rng)
        x = torch.from_numpy(np.ascontiguousarray(window)).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
        x = x.to(device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=generator)
        recon = vae.decode(latents).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, v.max_grad_norm * 20)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step + 1, losses[-1])
        done = step + 1
        if checkpoint_dir is not None and (done % v.checkpoint_every == 0 or done == v.vae_decoder_steps):
            save_checkpoint(checkpoint_dir, done, losses, save, optimizer)
    vae.eval()
    return {"steps": v.vae_decoder_steps, "resumed_from": start, "losses": losses, "fine_tuned": True}


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    from diffusers import AutoencoderKLMagvit

    v = settings.v51
    release = check_v51_folder(v.model_dir) / "vae"
    out = settings.paths.v51_vae
    started = time.perf_counter()
    with atomic_directory(out) as tmp:
        if v.vae_decoder_steps == 0:
            shutil.copytree(release, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
            summary = {"steps": 0, "resumed_from": 0, "losses": [], "fine_tuned": False}
        else:
            clips = [
                c.frames.permute(0, 2, 3, 1).numpy()
                for c in clips_by_split(settings, ("train",))["train"]
                if c.frames.shape[0]
            ]
            if not clips:
                raise V51Error("v51_vae: no training clips in the curated dataset to fine-tune the decoder on")
            vae = AutoencoderKLMagvit.from_pretrained(release, torch_dtype=torch.float32, local_files_only=True)
            vae.to(default_device())
            if vae.config.get("cache_mag_vae") is None:  # as load_v51_pipeline: the V5.1 configs carry it
                vae.register_to_config(cache_mag_vae=True)

            def log(step: int, loss: float) -> None:
                for tracker in ctx.trackers:
                    tracker.log({"train/loss": loss}, step=step)

            summary = finetune_decoder(vae, clips, settings, ctx.checkpoint_dir, log)
            vae.save_pretrained(tmp, safe_serialization=True)  # float32, as the releases ship their VAE
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2))
    metrics = {
        "train/steps": float(summary["steps"]),
        "train/resumed_from": float(summary["resumed_from"]),
        "train/fine_tuned": float(summary["fine_tuned"]),
        "train/seconds": time.perf_counter() - started,
    }
    if summary["losses"]:
        metrics["train/final_loss"] = summary["losses"][-1]
    write_reports(ctx.report_dir, metrics, summary["losses"])
    return StageResult(
        "v51_vae",
        metrics,
        {"v51_vae": out},
        [ctx.report_dir / "loss.csv"],
        info={"fine_tuned": summary["fine_tuned"]},
    )
