"""Held-out reconstruction quality of a trained tiny Slice VAE vs a naive codec with the same compression.

    python benchmarks/vae_quality.py [--curated data/curated] [--stage1-steps 2400 --stage2-steps 600]
    python benchmarks/vae_quality.py --model models/vae/stage2      # score an existing VAE, no training

Trains its own VAE (the real ``train_vae`` code, both stages, tiny preset model) on the manifest's ``train``
clips, with its own step counts (the pipeline demo's tiny preset must stay short), and reports the wall time it
took. Scores PSNR/SSIM on the ``val`` clips (never trained on), next to the baseline: area-downsample 8x8 in space
and 4x in time (the VAE's compression), then trilinear upsample. Goal: VAE PSNR >= baseline + 3 dB.

Peer comparison (``--family``): our Slice VAE against diffusers' ``AutoencoderKLMagvit`` (the VAE EasyAnimate
ships), at equal budget:

    python benchmarks/vae_quality.py --family slice magvit [--seeds 0 1 2 --steps 300]

Both models (8x8 spatial, 4x temporal compression, 4 latent channels; widths picked so parameter counts are
within 10%: tiny-preset Slice VAE vs MagViT widths --magvit-widths) train in ONE loop written here, not in
``train_vae``: same clips (``--videos``: the first 75% of each video's frames at 8 fps; the last 25% is held out),
same random crops/scales/flips and caption-free batches drawn from one per-step RNG, same steps, optimiser, LR
schedule, loss (L1 + KL), posterior-logvar init and seeds. MagViT needs 1 + 4k frames, ours 8k: every window
is the same 8k frames for both, MagViT's padded with one copy of the last frame, and only the 8k real frames
enter the loss and the scores. Reported per family: held-out PSNR/SSIM (mean and max-min spread over seeds),
training seconds, and peak memory of one float encode+decode at --memory-size px of 16 vs 128 frames (MagViT:
17 vs 129, the padded lengths), each in a fresh subprocess: ``VmHWM`` (the process's peak RSS, where torch's
CPU allocations land; not ``ru_maxrss``, which inherits the forking parent's peak) and that peak minus the RSS
just before the call. Ours runs sliced
(``use_slicing=True``); MagViT runs as diffusers ships it, which already encodes 4 frames and decodes 1 latent
frame per call with causal conv caches (its spatial tiling only starts above 512 px, so it is off at 256).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
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


# ------------------------------------------------------------------------------------- peer comparison
FAMILIES = ("slice", "magvit")
TEMPORAL = 4  # both families compress time 4x


def build_family(family: str, magvit_widths: tuple[int, ...]) -> torch.nn.Module:
    """A freshly initialised model of ``family`` (seed the RNG first): tiny-preset Slice VAE or a MagViT peer."""
    if family == "slice":
        return SliceVAE(**load_settings(preset="tiny").vae.model.model_dump())
    from diffusers import AutoencoderKLMagvit

    return AutoencoderKLMagvit(
        in_channels=3,
        out_channels=3,
        latent_channels=load_settings(preset="tiny").vae.model.latent_channels,
        block_out_channels=tuple(magvit_widths),
        layers_per_block=1,
        norm_num_groups=8,
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pad_frames(x: torch.Tensor, family: str) -> torch.Tensor:
    """(B, C, T, H, W) -> MagViT's 1 + 4k frames by repeating the last frame once (T = 1 or 4k); ours: as is."""
    if family != "magvit" or x.shape[2] == 1:
        return x
    return torch.cat([x, x[:, :, -1:]], dim=2)


def init_logvar(model: torch.nn.Module, logvar: float) -> None:
    """Both families end their encoder in ``quant_conv`` (mean | logvar channels): a constant, quiet posterior."""
    with torch.no_grad():
        half = model.quant_conv.out_channels // 2
        model.quant_conv.weight[half:].zero_()
        model.quant_conv.bias[half:].fill_(logvar)


def reconstruct(model: torch.nn.Module, family: str, x: torch.Tensor, generator=None) -> tuple[torch.Tensor, object]:
    """Float (B, C, T, H, W) in [-1, 1] -> (reconstruction of the same T frames, posterior)."""
    posterior = model.encode(pad_frames(x, family)).latent_dist
    z = posterior.sample(generator=generator) if generator is not None else posterior.mode()
    return model.decode(z).sample[:, :, : x.shape[2]], posterior


def load_videos(videos: list[Path], fps: float, short_side: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 (T, H, W, 3) per video at ``fps`` and ``short_side`` px: (train part, held-out part) = first 75% / rest."""
    from easyanimate.data.video_io import decode_frames, probe

    train_parts, val_parts = [], []
    for path in videos:
        info = probe(path)
        w = round(info.width * short_side / info.height) if info.width >= info.height else short_side
        h = short_side if info.width >= info.height else round(info.height * short_side / info.width)
        frames = decode_frames(path, times=list(np.arange(0.0, info.duration_s, 1 / fps)), size=(w, h))
        cut = int(len(frames) * 0.75)
        train_parts.append(frames[:cut])
        val_parts.append(frames[cut:])
    return train_parts, val_parts


def sample_batch(
    parts: list[np.ndarray], rng: np.random.Generator, batch: int, frames: int, size: int, scales: list[float]
) -> torch.Tensor:
    """A (B, 3, frames, size, size) batch in [-1, 1]: random window, scale, crop and flip (one RNG for all)."""
    out = []
    for _ in range(batch):
        clip = parts[int(rng.integers(len(parts)))]
        start = int(rng.integers(0, len(clip) - frames + 1))
        side = min(int(size * float(rng.choice(scales))), clip.shape[1], clip.shape[2])
        top = int(rng.integers(0, clip.shape[1] - side + 1))
        left = int(rng.integers(0, clip.shape[2] - side + 1))
        x = torch.from_numpy(clip[start : start + frames, top : top + side, left : left + side]).float()
        x = x.permute(3, 0, 1, 2)  # (3, T, side, side)
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        if rng.random() < 0.5:
            x = x.flip(-1)
        out.append(x / 127.5 - 1)
    return torch.stack(out)


def val_windows(val_parts: list[np.ndarray], size: int, frames: int) -> list[np.ndarray]:
    """Non-overlapping ``frames``-frame windows of the held-out parts, area-resized to short side ``size``,
    centre-cropped to a multiple of 8 (uint8 (T, H, W, 3))."""
    out = []
    for part in val_parts:
        x = torch.from_numpy(part).float().permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="area")
        h, w = x.shape[-2:]
        ch, cw = h - h % 8, w - w % 8
        x = x[..., (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for start in range(0, len(x) - frames + 1, frames):
            out.append(np.ascontiguousarray(x[start : start + frames]))
    return out


def train_peer(
    family: str, seed: int, train_parts: list[np.ndarray], args
) -> tuple[torch.nn.Module, float, float, list]:
    """The one training loop both families share; returns (model, wall seconds, CPU seconds, losses).

    CPU seconds (this process, all threads) are the fairer speed figure on a shared machine."""
    from diffusers.optimization import get_scheduler

    from easyanimate.training.losses import kl_per_sample

    torch.manual_seed(seed)
    model = build_family(family, args.magvit_widths).train()
    init_logvar(model, args.init_logvar_peer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.peer_lr)
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=args.warmup, num_training_steps=args.steps)
    losses = []
    began, cpu_began = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        rng = np.random.default_rng([seed, step])
        frames = 1 if rng.random() < args.image_ratio else args.train_frames
        x = sample_batch(train_parts, rng, args.batch_size, frames, args.resolution, args.scales)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        recon, posterior = reconstruct(model, family, x, generator)
        loss = F.l1_loss(recon, x) + args.kl_weight * kl_per_sample(posterior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return model.eval(), time.perf_counter() - began, time.process_time() - cpu_began, losses


@torch.no_grad()
def score_peer(model: torch.nn.Module, family: str, windows: list[np.ndarray]) -> tuple[float, float]:
    def codec(frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames).float().permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1
        y, _ = reconstruct(model, family, x)
        return y[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    return score(windows, codec)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _hwm_bytes() -> int:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: that keeps the pre-exec high-water mark
    of the forked parent, so a child of a big benchmark process would report the parent's size."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(family: str, frames: int, size: int, magvit_widths: tuple[int, ...]) -> dict:
    """One float encode+decode of ``frames`` (+1 pad for MagViT) at size x size, in this (fresh) process.

    Untrained weights: memory does not depend on their values. Ours runs with slicing on.
    """
    torch.manual_seed(0)
    model = build_family(family, magvit_widths).eval()
    video = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(video).float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)
    x = pad_frames(x, family)
    kwargs = {"use_slicing": True} if family == "slice" else {}

    def run(inp: torch.Tensor) -> torch.Tensor:
        z = model.encode(inp, **kwargs).latent_dist.mode()
        return model.decode(z, **kwargs).sample

    with torch.no_grad():
        run(pad_frames(x[:, :, :8, :64, :64].contiguous(), family))  # kernels/allocator warm-up in the baseline
        before = _rss_bytes()
        began = time.perf_counter()
        y = run(x)
    seconds = time.perf_counter() - began
    assert y.shape == x.shape, (y.shape, x.shape)
    peak = _hwm_bytes()
    return {
        "family": family,
        "frames": int(x.shape[2]),
        "peak_mb": peak / 2**20,
        "above_baseline_mb": (peak - before) / 2**20,
        "float_io_mb": 2 * x.numel() * 4 / 2**20,
        "seconds": seconds,
    }


def measure_memory(family: str, frames: int, args) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            family,
            str(frames),
            str(args.memory_size),
            *map(str, args.magvit_widths),
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.2f} (spread {max(values) - min(values):.2f})"


def run_peer(args) -> None:
    """``--family``: each family over ``--seeds``, same loop, data and budget; then memory; then ratios."""
    videos = args.videos or sorted(Path("data/samples").glob("*.mp4"))
    train_parts, val_parts = load_videos(videos, args.fps, 2 * args.resolution)
    windows = val_windows(val_parts, args.resolution, args.eval_frames)
    print(
        f"data: {[str(v) for v in videos]} at {args.fps} fps; train = first 75% of each ({sum(map(len, train_parts))} "
        f"frames), held out = last 25% -> {len(windows)} windows of {args.eval_frames} frames at "
        f"{windows[0].shape[1]}x{windows[0].shape[2]}",
        flush=True,
    )
    results: dict[str, dict] = {}
    for family in args.family:
        torch.manual_seed(0)
        count = n_params(build_family(family, args.magvit_widths))
        runs = []
        for seed in args.seeds:
            model, seconds, cpu_seconds, losses = train_peer(family, seed, train_parts, args)
            vp, vs = score_peer(model, family, windows)
            runs.append(
                {
                    "seed": seed,
                    "psnr": vp,
                    "ssim": vs,
                    "train_seconds": seconds,
                    "train_cpu_seconds": cpu_seconds,
                    "final_loss": losses[-1],
                }
            )
            print(
                f"{family:6s} seed {seed}: PSNR {vp:.2f} dB, SSIM {vs:.3f}, {args.steps} steps in {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU "
                f"(loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f})",
                flush=True,
            )
        memory = {n: measure_memory(family, n, args) for n in args.memory_frames}
        results[family] = {"params": count, "runs": runs, "memory": memory}

    short, long = args.memory_frames
    print(f"\nequal budget: {args.steps} steps x batch {args.batch_size} at {args.resolution}px, seeds {args.seeds}")
    print(
        f"{'family':8s} {'params':>9s} {'PSNR dB mean (spread)':>24s} {'SSIM mean (spread)':>20s} {'train s':>8s} {'CPU s':>7s} "
        f"{'peak MB ' + str(short) + 'f':>12s} {'peak MB ' + str(long) + 'f':>13s} {'growth':>7s} "
        f"{'above-base ' + str(short):>14s} {'above-base ' + str(long):>15s}"
    )
    for family, r in results.items():
        m = r["memory"]
        print(
            f"{family:8s} {r['params']:9d} {spread([x['psnr'] for x in r['runs']]):>24s} "
            f"{spread([x['ssim'] for x in r['runs']]):>20s} {np.mean([x['train_seconds'] for x in r['runs']]):8.0f} "
            f"{np.mean([x['train_cpu_seconds'] for x in r['runs']]):7.0f} "
            f"{m[short]['peak_mb']:12.0f} {m[long]['peak_mb']:13.0f} {m[long]['peak_mb'] / m[short]['peak_mb']:7.2f} "
            f"{m[short]['above_baseline_mb']:14.0f} {m[long]['above_baseline_mb']:15.0f}"
        )
    if {"slice", "magvit"} <= set(results):
        a, b = results["slice"], results["magvit"]

        def mean(r, key):
            return float(np.mean([x[key] for x in r["runs"]]))

        ma, mb = a["memory"], b["memory"]
        print("\nratios ours / MagViT:")
        print(f"  params             {a['params'] / b['params']:.3f}")
        print(
            f"  PSNR (dB, mean)    {mean(a, 'psnr') / mean(b, 'psnr'):.3f}  (difference {mean(a, 'psnr') - mean(b, 'psnr'):+.2f} dB)"
        )
        print(f"  SSIM (mean)        {mean(a, 'ssim') / mean(b, 'ssim'):.3f}")
        print(f"  training seconds   {mean(a, 'train_seconds') / mean(b, 'train_seconds'):.3f} wall")
        print(f"  training CPU s     {mean(a, 'train_cpu_seconds') / mean(b, 'train_cpu_seconds'):.3f}")
        for n in (short, long):
            print(
                f"  peak MB @{n:<4d}      {ma[n]['peak_mb'] / mb[n]['peak_mb']:.3f}   above baseline "
                f"{ma[n]['above_baseline_mb'] / max(mb[n]['above_baseline_mb'], 1e-9):.3f}"
            )
        growth_a = ma[long]["above_baseline_mb"] / max(ma[short]["above_baseline_mb"], 1e-9)
        growth_b = mb[long]["above_baseline_mb"] / max(mb[short]["above_baseline_mb"], 1e-9)
        print(f"  memory growth {long}/{short} frames (above baseline): ours {growth_a:.2f}, MagViT {growth_b:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )


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
    # Peer comparison (see the module docstring).
    parser.add_argument("--family", nargs="+", choices=FAMILIES, help="peer mode: train and score these families")
    parser.add_argument("--videos", type=Path, nargs="+", help="peer mode: source videos (default data/samples/*.mp4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="peer mode: training steps per run")
    parser.add_argument("--peer-lr", type=float, default=5e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--init-logvar-peer", type=float, default=-6.0)
    parser.add_argument("--train-frames", type=int, default=8, help="peer mode: video window (MagViT gets +1 pad)")
    parser.add_argument("--magvit-widths", type=int, nargs="+", default=[16, 32, 64, 72])
    parser.add_argument("--memory-size", type=int, default=256)
    parser.add_argument("--memory-frames", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--json", type=Path, help="peer mode: also write the figures here")
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        family, frames, size, *widths = args.memory_child
        print(json.dumps(memory_child(family, int(frames), int(size), tuple(map(int, widths)))))
        return
    if args.family:
        run_peer(args)
        return

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
