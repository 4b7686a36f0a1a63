"""Held-out reconstruction quality of a trained tiny Slice VAE vs a naive codec with the same compression.

    python benchmarks/vae_quality.py [--curated data/curated] [--stage1-steps 2400 --stage2-steps 600]
    python benchmarks/vae_quality.py --model models/vae/stage2      # score an existing VAE, no training

Trains its own VAE (the real ``train_vae`` code, both stages, tiny preset model) on the manifest's ``train``
clips, with its own step counts (the pipeline demo's tiny preset must stay short), and reports the wall time it
took. Scores PSNR/SSIM on the ``val`` clips (never trained on), next to the baseline: area-downsample 8x8 in space
and 4x in time (the VAE's compression), then trilinear upsample. Goal: VAE PSNR >= baseline + 3 dB.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from easyanimate.config import load_settings
from easyanimate.data.datasets import load_clip_frames
from easyanimate.evaluation.metrics import psnr, ssim
from easyanimate.models.vae import SliceVAE
from easyanimate.models.vae.reconstruct import valid_length
from easyanimate.runtime import configure_environment


def naive_codec(frames: np.ndarray, spatial: int, temporal: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> area-downsampled by (temporal, spatial, spatial) -> trilinear back to full size."""
    x = torch.from_numpy(frames).float().permute(3, 0, 1, 2).unsqueeze(0)
    small = F.interpolate(x, scale_factor=(1 / temporal, 1 / spatial, 1 / spatial), mode="area")
    back = F.interpolate(small, size=x.shape[2:], mode="trilinear", align_corners=False)
    return back[0].permute(1, 2, 3, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def score(clips: list[np.ndarray], codec) -> tuple[float, float]:
    outs = [codec(c) for c in clips]
    return float(np.mean([psnr(c, o) for c, o in zip(clips, outs)])), float(
        np.mean([ssim(c, o) for c, o in zip(clips, outs)])
    )


@torch.no_grad()
def latent_noise_ratio(vae: SliceVAE, frames: np.ndarray) -> list[float]:
    x = torch.from_numpy(frames).float().permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    dims = (0, 2, 3, 4)
    return (posterior.std.mean(dim=dims) / posterior.mean.std(dim=dims)).tolist()


def train(curated: Path, work: Path, args) -> tuple[Path, float]:
    from easyanimate.training.vae import train_vae

    common = {
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "num_frames": 8,
        "image_ratio": args.image_ratio,
        "sample_fps": args.fps,
        "lr_scheduler": "cosine",
        "warmup_steps": args.warmup,
        "checkpoint_every": 10**6,
        "augment": {"random_crop": args.random_crop, "scales": args.scales, "hflip": args.hflip},
    }
    model_overrides = {"latent_channels": args.latent_channels} if args.latent_channels else {}
    if args.pixel_shortcut is not None:
        model_overrides["pixel_shortcut"] = args.pixel_shortcut
    if args.block_out_channels:
        model_overrides["block_out_channels"] = args.block_out_channels
    if args.pixel_shortcut_motion is not None:
        model_overrides["pixel_shortcut_motion"] = args.pixel_shortcut_motion
    settings = load_settings(
        preset="tiny",
        overrides={
            "paths": {"checkpoints": str(work / "ckpt"), "reports": str(work / "reports")},
            "vae": {
                "model": model_overrides,
                "stage1": {
                    **common,
                    "steps": args.stage1_steps,
                    "learning_rate": args.stage1_lr,
                    **({"init_logvar": args.init_logvar} if args.init_logvar is not None else {}),
                },
                "stage2": {**common, "steps": args.stage2_steps, "learning_rate": args.stage2_lr},
            },
        },
    )
    began = time.perf_counter()
    r1 = train_vae(settings, 1, curated, work / "stage1", work / "ckpt1")
    print(f"stage 1: {args.stage1_steps} steps in {r1.seconds:.0f} s (final loss {r1.final_loss:.4f})", flush=True)
    model = work / "stage1"
    if args.stage2_steps:
        r2 = train_vae(settings, 2, curated, work / "stage2", work / "ckpt2", init_dir=work / "stage1")
        print(f"stage 2: {args.stage2_steps} steps in {r2.seconds:.0f} s (final loss {r2.final_loss:.4f})", flush=True)
        model = work / "stage2"
    return model, time.perf_counter() - began


def main() -> None:
    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curated", type=Path, default=Path("data/curated"))
    parser.add_argument("--model", type=Path, help="score this VAE folder instead of training one")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--eval-frames", type=int, default=24)
    parser.add_argument("--stage1-steps", type=int, default=2400)
    parser.add_argument("--stage2-steps", type=int, default=600)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--stage2-lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-ratio", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--init-logvar", type=float, help="override vae.stage1.init_logvar of the tiny preset")
    parser.add_argument("--block-out-channels", type=int, nargs="+", help="override the tiny preset's VAE widths")
    parser.add_argument("--latent-channels", type=int, help="override the tiny preset's latent channels")
    parser.add_argument(
        "--pixel-shortcut",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the tiny preset's vae.model.pixel_shortcut",
    )
    parser.add_argument(
        "--pixel-shortcut-motion",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the tiny preset's vae.model.pixel_shortcut_motion",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def eval_clips(split: str) -> list[np.ndarray]:
        out = []
        for clip in load_clip_frames(args.curated, split, args.resolution, args.fps):
            frames = clip.frames.permute(0, 2, 3, 1).numpy()
            out.append(np.ascontiguousarray(frames[: valid_length(len(frames), args.eval_frames)]))
        return out

    clips, seen = eval_clips("val"), eval_clips("train")
    if not clips:
        raise SystemExit(f"{args.curated} has no val clips")
    print(
        f"held-out: {len(clips)} val clip(s), {[len(c) for c in clips]} frames at {args.resolution}px, {args.fps} fps"
    )

    train_seconds = None
    with tempfile.TemporaryDirectory(prefix="vae-quality-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir, train_seconds = train(args.curated, Path(tmp), args)
        vae = SliceVAE.from_pretrained(model_dir).eval()
        s, t = vae.spatial_compression, vae.temporal_compression
        vae_psnr, vae_ssim = score(clips, vae.reconstruct_video)
        posterior_noise = latent_noise_ratio(vae, clips[0])
        seen_psnr, seen_ssim = score(seen, vae.reconstruct_video) if seen else (float("nan"), float("nan"))
    base_psnr, base_ssim = score(clips, lambda c: naive_codec(c, s, t))

    print(f"\n{'codec':34s} {'PSNR dB':>8s} {'SSIM':>7s}")
    print(
        f"{'Slice VAE (' + str(model_dir if args.model else 'trained here') + ')':34s} {vae_psnr:8.2f} {vae_ssim:7.3f}"
    )
    print(f"{f'naive area {s}x{s}x{t} + trilinear':34s} {base_psnr:8.2f} {base_ssim:7.3f}")
    print(f"{'(Slice VAE on its training clips)':34s} {seen_psnr:8.2f} {seen_ssim:7.3f}")
    print(
        "posterior std / spread of the means, per latent channel (held-out clip; near 1 = a channel carries "
        "no information): " + " ".join(f"{r:.3f}" for r in posterior_noise)
    )
    margin = vae_psnr - base_psnr
    print(f"\nVAE - baseline: {margin:+.2f} dB PSNR (goal >= +3 dB: {'met' if margin >= 3 else 'NOT met'})")
    if train_seconds is not None:
        print(
            f"training: stage1 {args.stage1_steps} + stage2 {args.stage2_steps} steps, {train_seconds:.0f} s wall "
            f"on {torch.get_num_threads()} CPU thread(s)"
        )


if __name__ == "__main__":
    main()
