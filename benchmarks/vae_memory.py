"""Peak memory of Slice VAE encode+decode at 256x256, short vs long clip, slicing on vs off.

    python benchmarks/vae_memory.py [--preset tiny] [--size 256] [--frames 16 128]

The issue asks for 17 and 129 frames; this VAE's valid lengths are 1 or multiples of 4 that are >= 8, so the
default is 16 and 128 frames (same 8x length ratio). Every configuration runs in a fresh subprocess and reports
``ru_maxrss`` (peak resident memory of that process) and that peak minus the resident memory just before the
encode+decode call (the model, the uint8 input frames and torch itself are already in the baseline).

Modes:
  streamed  slicing on, uint8 frames in, decoded slices written into a preallocated uint8 output
            (``SliceVAE.reconstruct_video``): what the CLI and evaluation use.
  sliced    slicing on, but float (B, C, T, H, W) in and out (``decode(encode(x))``): the float input and the
            float output tensors themselves grow with T.
  full      slicing off: every activation spans all frames.
The goal (EasyAnimate's Slice VAE claim): with slicing, peak(128 frames) / peak(16 frames) <= 1.25.

A last line measures spatial tiling: ``streamed`` with and without ``enable_tiling()`` (the preset's
``vae.model.tile_sample_size`` tiles, overlap-blended) at a larger frame (``--tile-frame-size``, 512x512, 16 frames).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("streamed", "sliced", "full")
TILED = "tiled"  # streamed with spatial tiling on


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def child(preset: str, size: int, frames: int, mode: str) -> dict:
    import numpy as np
    import torch

    from easyanimate.config import load_settings
    from easyanimate.models.vae import SliceVAE

    torch.manual_seed(0)
    settings = load_settings(preset=preset)
    vae = SliceVAE(**settings.vae.model.model_dump()).eval()
    if mode == TILED:
        vae.enable_tiling()
    video = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    # Warm up kernels on a tiny input so one-off allocator/oneDNN setup is in the baseline, not the peak.
    vae.reconstruct_video(video[:8, :64, :64].copy())
    before = _rss_bytes()
    began = time.perf_counter()
    with torch.no_grad():
        if mode in ("streamed", TILED):
            out = vae.reconstruct_video(video)
        else:
            sliced = mode == "sliced"
            x = torch.from_numpy(video).float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)
            z = vae.encode(x, use_slicing=sliced).latent_dist.mode()
            y = vae.decode(z, use_slicing=sliced).sample
            out = y[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    seconds = time.perf_counter() - began
    assert out.shape == video.shape
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "mode": mode,
        "frames": frames,
        "peak_mb": peak / 2**20,
        "above_baseline_mb": (peak - before) / 2**20,
        "io_uint8_mb": 2 * video.nbytes / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tile-frame-size", type=int, default=512, help="frame size of the tiled vs untiled line")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, size, frames, mode = args.child
        print(json.dumps(child(preset, int(size), int(frames), mode)))
        return

    short, long = args.frames
    print(
        f"Slice VAE ({args.preset} preset) encode+decode at {args.size}x{args.size}; {short} vs {long} frames "
        f"(valid lengths: 1 or multiples of 4 >= 8, so not 17/129). Fresh process per row."
    )
    print(f"{'mode':9s} {'frames':>6s} {'peak MB':>9s} {'above base MB':>14s} {'uint8 in+out MB':>16s} {'seconds':>8s}")

    def run_child(size: int, frames: int, mode: str) -> dict:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", args.preset, str(size), str(frames), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results: dict[tuple[str, int], dict] = {}
    for mode in args.modes:
        for frames in (short, long):
            row = run_child(args.size, frames, mode)
            results[(mode, frames)] = row
            print(
                f"{mode:9s} {frames:6d} {row['peak_mb']:9.0f} {row['above_baseline_mb']:14.0f} "
                f"{row['io_uint8_mb']:16.1f} {row['seconds']:8.1f}",
                flush=True,
            )
    print(f"\nratio peak({long}) / peak({short}):")
    for mode in args.modes:
        a, b = results[(mode, short)], results[(mode, long)]
        print(
            f"  {mode:9s} process peak {b['peak_mb'] / a['peak_mb']:.2f}   "
            f"above baseline {b['above_baseline_mb'] / max(a['above_baseline_mb'], 1e-9):.2f}"
        )
    print("goal: streamed/sliced process-peak ratio <= 1.25")

    from easyanimate.config import load_settings

    tile = load_settings(preset=args.preset).vae.model.tile_sample_size
    big = args.tile_frame_size
    plain, tiled = (run_child(big, short, mode) for mode in ("streamed", TILED))
    print(
        f"\ntiling at {big}x{big}, {short} frames (streamed, {tile} px tiles): peak MB untiled "
        f"{plain['peak_mb']:.0f} ({plain['above_baseline_mb']:.0f} above base, {plain['seconds']:.1f} s), tiled "
        f"{tiled['peak_mb']:.0f} ({tiled['above_baseline_mb']:.0f} above base, {tiled['seconds']:.1f} s); "
        f"ratio tiled/untiled process peak {tiled['peak_mb'] / plain['peak_mb']:.2f}, above baseline "
        f"{tiled['above_baseline_mb'] / max(plain['above_baseline_mb'], 1e-9):.2f}"
    )


if __name__ == "__main__":
    main()
