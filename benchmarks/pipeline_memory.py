"""Peak memory of one text-to-video generation, with and without the pipeline's memory controls.

    python benchmarks/pipeline_memory.py [--model PATH|models:/NAME@ALIAS] [--frames 8 32 64]
        [--height 64 --width 64] [--steps 2] [--device cpu|cuda]

Without ``--model`` the pipeline is built from the params' model settings with random weights (memory
depends on the architecture and the video size, not on the weights). Each configuration runs in a
fresh process so peaks do not mix. On CUDA the figure is ``torch.cuda.max_memory_allocated``; on CPU
it is the process's resident memory (RSS), sampled every millisecond during generation, minus the RSS
just before it (the loaded models). Configurations: VAE slicing on/off, and on CUDA idle-component
offload on/off (without an accelerator offload is a no-op, so it is not measured there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def build_pipeline(model: str | None, settings):
    from easyanimate.config import resolve_weight_path
    from easyanimate.models.text_encoder import load_text_encoder
    from easyanimate.models.vae import SliceVAE
    from easyanimate.pipelines import EasyAnimatePipeline
    from easyanimate.registry import pipeline_folder
    from easyanimate.schedulers import make_inference_scheduler
    from easyanimate.training.dit import build_transformer

    if model:
        return EasyAnimatePipeline.from_pretrained(pipeline_folder(model, settings.registry.tracking_uri))
    tokenizer, encoder = load_text_encoder(resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder"))
    vae = SliceVAE(**settings.vae.model.model_dump())
    dit = build_transformer(settings, vae.config.latent_channels, encoder.config.hidden_size)
    scheduler = make_inference_scheduler(settings)
    return EasyAnimatePipeline(vae=vae, transformer=dit, text_encoder=encoder, tokenizer=tokenizer, scheduler=scheduler)


class RSSPeak:
    """Highest resident set size seen while the block runs (sampled on a thread)."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.process, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def child(spec: dict) -> dict:
    import torch

    from easyanimate.config import load_settings
    from easyanimate.runtime import configure_environment

    configure_environment()
    settings = load_settings()
    pipe = build_pipeline(spec["model"], settings)
    pipe.set_progress_bar_config(disable=True)
    device = spec["device"]
    if spec["offload"]:
        pipe.enable_idle_component_offload(device)
    else:
        pipe.to(device)
    (pipe.enable_vae_slicing if spec["slicing"] else pipe.disable_vae_slicing)()
    kwargs = dict(
        num_frames=spec["frames"],
        height=spec["height"],
        width=spec["width"],
        num_inference_steps=spec["steps"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        max_text_tokens=settings.dit.model.max_text_tokens,
    )
    began = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pipe(settings.generate.prompts[0], **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        resident = torch.cuda.memory_allocated()
    else:
        with RSSPeak() as rss:
            pipe(settings.generate.prompts[0], **kwargs)
        peak, resident = rss.peak - rss.before, rss.before
    return {**spec, "peak_mib": peak / 2**20, "resident_mib": resident / 2**20, "seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder or models:/NAME@ALIAS (default: random weights)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--height", type=int, default=None, help="default: generate.height")
    parser.add_argument("--width", type=int, default=None, help="default: generate.width")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (memory does not grow with them)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    from easyanimate.config import load_settings

    settings = load_settings()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    offloads = [False, True] if device == "cuda" else [False]
    height, width = args.height or settings.generate.height, args.width or settings.generate.width
    where = "CUDA allocated" if device == "cuda" else "CPU RSS above the loaded models"
    print(
        f"peak memory of one generation ({where}), {height}x{width}, {args.steps} steps, "
        f"model {args.model or 'random weights, preset ' + settings.preset}"
    )
    print(f"{'frames':>6s} {'vae slicing':>11s} {'offload':>7s} {'peak MiB':>9s} {'resident MiB':>12s} {'seconds':>8s}")
    results = []
    for frames in args.frames:
        for offload in offloads:
            for slicing in (True, False):
                spec = {
                    "model": args.model,
                    "device": device,
                    "frames": frames,
                    "height": height,
                    "width": width,
                    "steps": args.steps,
                    "slicing": slicing,
                    "offload": offload,
                }
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise SystemExit(f"configuration {spec} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(r)
                print(
                    f"{frames:6d} {str(slicing):>11s} {str(offload):>7s} {r['peak_mib']:9.1f} "
                    f"{r['resident_mib']:12.1f} {r['seconds']:8.2f}",
                    flush=True,
                )
    for frames in args.frames:
        for offload in offloads:
            on, off = (
                next(r for r in results if r["frames"] == frames and r["offload"] == offload and r["slicing"] == s)
                for s in (True, False)
            )
            if off["peak_mib"] > 0:
                print(
                    f"{frames} frames{' with offload' if offload else ''}: sliced decode peak is "
                    f"{on['peak_mib'] / off['peak_mib']:.2f}x the unsliced one"
                )


if __name__ == "__main__":
    main()
