"""GPU figures for the paper preset: DiT training throughput / MFU, and Slice VAE decode memory; and for the
EasyAnimate V5.1 family: peak GPU memory of a 12B denoising run per ``v51.memory_mode``.

Run through ``benchmarks/gpu.sh`` on a GPU machine (each part in its own process, with a timeout):

    python benchmarks/gpu_bench.py dit [--resolution 256 --frames 16] [--batch 0 (auto)] [--peak-tflops X]
    python benchmarks/gpu_bench.py vae --slicing on|off [--size 512 --frames 144] [--dtype bf16|fp32]
    python benchmarks/gpu_bench.py v51 --modes none fp8_layerwise ... [--size 512 --frames 49 --steps 2]
    python benchmarks/gpu_bench.py summary --json results.jsonl

``--device cpu --tiny`` runs the same code at a tiny size (reduced depth/width DiT, narrow VAE, a one-block V5.1
transformer) so that tests/test_gpu_bench.py keeps this script from rotting on machines without a GPU.

DiT: ``EasyAnimateTransformer3DModel`` from the paper preset's ``dit.model`` (motion module on), trained like
``easyanimate.training``: bf16 autocast over fp32 weights (accelerate's ``mixed_precision=bf16``), fp32 loss,
grad-norm clipping, AdamW with fp32 state, no gradient checkpointing. Inputs are random: 256 px / 16 frames
go through the paper VAE's geometry (8x spatial, causal 4x temporal: 16 frames -> 4 latents), text states
have the paper text encoder's width at ``max_text_tokens``. Model FLOPs per step are counted twice: with
``torch.utils.flop_counter.FlopCounterMode`` on one real step (exact for the matmuls/attention that ran) and
with the closed form in :func:`analytic_train_flops`; MFU = FLOPs per second / the GPU's dense bf16 peak.

VAE: ``SliceVAE`` from the paper preset's ``vae.model`` (random weights), decoding one 512x512x144 latent
with slicing on or off; the figure is ``torch.cuda.max_memory_allocated``. Out-of-memory (or a kernel that
refuses a tensor this large) is a reported result, not a crash.

V5.1: diffusers' ``EasyAnimatePipeline`` around ``EasyAnimateTransformer3DModel`` and ``AutoencoderKLMagvit`` built
with the released 12B sizes (``V51_TRANSFORMER_12B``, ``V51_VAE_12B``; random weights, bf16) and no text encoder:
random Qwen2-VL-width prompt embeddings go in as ``prompt_embeds``, so the pipeline never tokenizes. Each memory
mode is set by the project's own ``easyanimate.families.v51.apply_memory_mode`` on a freshly built pipeline, then one
call denoises ``--steps`` steps at 512x512x49 (the longest clip the releases make) with classifier-free guidance and
decodes; the figures are the peak allocated GPU memory of the call, the peak up to the last denoising step, what was
resident before it, seconds per step and for the decode. OOM is a reported result; the offload modes need CUDA and
are reported as skipped on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, no sparsity), matched in order against
# torch.cuda.get_device_name(); --peak-tflops overrides. NVL/PCIe first: their names also contain "H100".
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
    ("L40S", 362.0),
)
# T5 v1.1 XXL's d_model: the paper preset's text encoder width when weights.text_encoder is not on disk
# (random text states are enough for a throughput figure, but their width sets the caption projection).
T5_XXL_HIDDEN = 4096
GIB = 2**30

# Tiny overrides for --tiny (CPU tests): same architecture switches as the paper preset, smaller numbers.
TINY_OVERRIDES = {
    "dit": {"model": {"depth": 2, "hidden_size": 128, "num_heads": 4}},
    "vae": {"model": {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_groups": 4}},
}


# ------------------------------------------------------------------------------------------ settings
def paper_settings(tiny: bool):
    from easyanimate.config import load_settings

    return load_settings(preset="paper", overrides=TINY_OVERRIDES if tiny else None)


def text_embed_dim(settings, override: int | None) -> tuple[int, str]:
    """Width of the text encoder's hidden states: from its config.json if on disk, else T5-XXL's."""
    if override:
        return override, "--text-dim"
    from easyanimate.config import resolve_weight_path

    try:
        folder = resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder")
        config = json.loads((Path(folder) / "config.json").read_text())
        return int(config.get("d_model") or config["hidden_size"]), f"{folder}/config.json"
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return T5_XXL_HIDDEN, "T5 v1.1 XXL d_model (weights.text_encoder not on disk)"


def dit_kwargs(settings, latent_channels: int, text_dim: int) -> dict:
    """Constructor arguments of the DiT, as ``easyanimate.training.dit.build_transformer`` makes them.

    Not imported from there: that module pulls in the video-decoding stack (av, cv2), which a bare GPU
    image lacks. tests/test_gpu_bench.py checks that both give the same model config.
    """
    m = settings.dit.model
    return dict(
        in_channels=latent_channels,
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        text_embed_dim=text_dim,
        motion_module=m.motion_module,
        max_frames_latent=m.max_frames_latent,
        grid_reshape=m.grid_reshape,
        long_skips=m.long_skips,
        base_latent_size=m.base_resolution // 8,
        interpolation_scale=m.interpolation_scale,
        pos_embed_order=m.pos_embed_order,
        use_additional_conditions=m.use_additional_conditions,
    )


def vae_geometry(settings) -> tuple[int, int]:
    """(latent channels, spatial compression) of the configured Slice VAE, without allocating weights."""
    from easyanimate.models.vae import SliceVAE

    with torch.device("meta"):
        vae = SliceVAE(**settings.vae.model.model_dump())
    return vae.config.latent_channels, vae.spatial_compression


# ------------------------------------------------------------------------------------------ FLOPs
def analytic_forward_flops(model, batch: int, frames: int, height: int, width: int, text_tokens: int) -> dict:
    """Matmul/conv/attention FLOPs (2 per multiply-add) of one forward pass of the DiT, by layer group.

    Latent input (batch, C, frames, height, width). Attention over S_q queries and S_k keys of width d costs
    4*S_q*S_k*d (scores and weighted sum, all heads together): spatial attention runs per frame over
    N = (h/p)*(w/p) tokens, cross-attention over the text tokens, the motion module over frames*g*g tokens
    of each g x g grid (g = grid_reshape).
    """
    cfg = model.config
    d, p, c, g = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.grid_reshape
    inner = int(d * cfg.mlp_ratio)
    n = (height // p) * (width // p)
    tokens = batch * frames * n
    text_rows = batch * text_tokens
    depth = cfg.depth
    time_in = model.time_embed.linear_1.in_features
    out = {
        # Their inputs need no gradient, so backward computes only the weight gradient (see train flops).
        "patch_embed": 2 * tokens * c * p * p * d,
        "time_embed_in": 2 * batch * time_in * d,
        "caption_in": 2 * text_rows * cfg.text_embed_dim * d,
        # Everything below also back-propagates into its input.
        "time_embed_rest": 2 * batch * d * d + 2 * batch * d * 6 * d,  # linear_2 + adaLN-single t_block
        "caption_rest": 2 * text_rows * d * d,
        "spatial_attn": depth * (8 * tokens * d * d + 4 * batch * frames * n * n * d),
        "cross_attn": depth * (4 * tokens * d * d + 4 * text_rows * d * d + 4 * tokens * text_tokens * d),
        "mlp": depth * 4 * tokens * d * inner,
        "proj_out": 2 * tokens * d * p * p * c,
    }
    if cfg.motion_module:
        seq = frames * g * g
        out["motion_module"] = depth * (8 * tokens * d * d + 4 * batch * (n // (g * g)) * seq * seq * d)
    if cfg.long_skips and depth >= 2:
        out["long_skips"] = (depth // 2) * 2 * tokens * (2 * d) * d
    return out


NO_INPUT_GRAD = ("patch_embed", "time_embed_in", "caption_in")


def analytic_train_flops(forward: dict) -> int:
    """Forward + backward: backward costs two forwards (input and weight gradients) for every layer except
    those fed by tensors that need no gradient (latents, timestep features, text states): one forward."""
    return sum(3 * v for v in forward.values()) - sum(forward[k] for k in NO_INPUT_GRAD)


def matmul_params(model) -> int:
    """Weights that take part in matmuls/convs (biases, norms, tables excluded): the 'N' of 6*N*tokens."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def counted_flops(fn, device: torch.device) -> int:
    """FLOPs of ``fn()`` as FlopCounterMode sees them. On CPU the fused SDPA kernel is invisible to the
    counter, so attention runs on the math backend there (its bmm calls are counted); CUDA's flash,
    memory-efficient and cuDNN attention kernels are all counted directly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if device.type == "cpu":
        with sdpa_kernel(SDPBackend.MATH), counter:
            fn()
    else:
        with counter:
            fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ device
def device_report(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            total_memory_gib=props.total_memory / GIB,
        )
    else:
        info.update(device_name=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def peak_tflops_for(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"datasheet dense bf16 for {key}"
    return None, f"unknown device {name!r}: pass --peak-tflops for MFU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak CUDA memory allocated (bytes) inside the block; None on CPU, where the allocator keeps no stats."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.before = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


def gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measured_matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Achievable bf16 matmul rate on this device (a practical ceiling next to the datasheet peak)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - began) / 1e12


# ------------------------------------------------------------------------------------------ DiT part
class DiTTrainer:
    """One training step of the DiT as easyanimate.training runs it, on a fixed random batch."""

    def __init__(
        self,
        model,
        settings,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        latent_shape,
        text_tokens: int,
        text_dim: int,
    ):
        stage = settings.dit.stage3  # whole-model fine-tuning: every parameter trains
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.max_grad_norm = stage.max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=stage.learning_rate, weight_decay=stage.weight_decay)
        self.latent_shape, self.text_tokens, self.text_dim = latent_shape, text_tokens, text_dim
        self.num_train_timesteps = settings.dit.num_train_timesteps

    def make_batch(self, batch: int) -> dict:
        gen = torch.Generator(device=self.device).manual_seed(batch)
        kw = dict(device=self.device, generator=gen)
        lengths = torch.randint(1, self.text_tokens + 1, (batch, 1), **kw)  # captions of varied length
        return {
            "hidden_states": torch.randn(batch, *self.latent_shape, **kw),
            "timestep": torch.randint(0, self.num_train_timesteps, (batch,), **kw),
            "encoder_hidden_states": torch.randn(batch, self.text_tokens, self.text_dim, **kw),
            "encoder_attention_mask": (torch.arange(self.text_tokens, device=self.device)[None] < lengths).long(),
            "target": torch.randn(batch, *self.latent_shape, **kw),
        }

    def step(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "target"}
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            pred = self.model(**inputs).sample
        loss = F.mse_loss(pred.float(), batch["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def release(self) -> None:
        """Drop the grads of a step that died half-way (OOM) and give the cache back."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_bytes(self, batch: int) -> int:
        data = self.make_batch(batch)
        with PeakMemory(self.device) as mem:
            self.step(data)
        return mem.peak

    def auto_batch(self, memory_fraction: float, max_batch: int, probes: tuple[int, int] = (2, 4)) -> tuple[int, str]:
        """Largest batch whose projected peak fits ``memory_fraction`` of the GPU, from the peaks of two batch sizes.

        Not batch 1: there the optimizer step (weights, grads, AdamW state and its temporaries) can set the peak,
        which does not grow with the batch, and the per-sample slope would come out too small. If the projection
        is still too big, the OOM retry in bench_dit halves the batch.
        """
        self.step(self.make_batch(1))  # allocates the AdamW state, which stays for every later step
        small, large = probes
        p_small, p_large = self.peak_bytes(small), self.peak_bytes(large)
        per_sample = max((p_large - p_small) / (large - small), 1)
        fixed = p_small - small * per_sample
        budget = torch.cuda.get_device_properties(self.device).total_memory * memory_fraction
        batch = int(max(1, min(max_batch, (budget - fixed) // per_sample)))
        return batch, (
            f"auto: peak {p_small / GIB:.1f} GiB at batch {small}, +{per_sample / GIB:.2f} GiB per sample, "
            f"{memory_fraction:.0%} of {budget / memory_fraction / GIB:.0f} GiB"
        )


def bench_dit(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    settings = paper_settings(args.tiny)
    m = settings.dit.model
    latent_channels, spatial = vae_geometry(settings)
    from easyanimate.models.dit import EasyAnimateTransformer3DModel
    from easyanimate.models.vae import SliceVAE

    if args.resolution % spatial:
        raise SystemExit(f"--resolution {args.resolution} is not a multiple of the VAE's {spatial}x compression")
    latent_frames = SliceVAE.latent_num_frames(args.frames)
    side = args.resolution // spatial
    latent_shape = (latent_channels, latent_frames, side, side)
    text_dim, text_dim_source = text_embed_dim(settings, args.text_dim)
    text_tokens = m.max_text_tokens
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]
    info = device_report(device)
    print(f"device: {info['device_name']} | torch {info['torch']} | python {info['python']}", flush=True)

    began = time.perf_counter()
    with torch.device(device):  # build in place: no 3 GB host->device copy
        model = EasyAnimateTransformer3DModel(**dit_kwargs(settings, latent_channels, text_dim)).train()
    sync(device)
    build_s = time.perf_counter() - began
    params = sum(p.numel() for p in model.parameters())
    print(
        f"DiT: hidden {m.hidden_size}, depth {m.depth}, heads {m.num_heads}, motion module {m.motion_module} "
        f"(grid {m.grid_reshape}), long skips {m.long_skips}: {params / 1e6:.1f} M params, built in {build_s:.1f} s",
        flush=True,
    )
    print(
        f"input: {args.resolution} px x {args.frames} frames -> latent {latent_shape} "
        f"({(side // m.patch_size) ** 2} tokens/frame), text {text_tokens} x {text_dim} ({text_dim_source})",
        flush=True,
    )
    trainer = DiTTrainer(model, settings, device, amp_dtype, latent_shape, text_tokens, text_dim)

    if args.batch:
        batch, batch_note = args.batch, "fixed (--batch)"
    elif device.type == "cuda":
        batch, batch_note = trainer.auto_batch(args.memory_fraction, args.max_batch)
    else:
        batch, batch_note = 1, "fixed (CPU)"
    print(f"batch {batch}: {batch_note}", flush=True)

    # The counted step doubles as the first warm-up step; an OOM there halves the batch.
    while True:
        data = trainer.make_batch(batch)
        try:
            flops_counted = counted_flops(lambda: trainer.step(data), device)
            break
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or batch == 1:
                raise
        del data
        trainer.release()
        batch //= 2
        print(f"out of memory: retrying with batch {batch}", flush=True)

    forward = analytic_forward_flops(model, batch, latent_frames, side, side, text_tokens)
    flops_analytic = analytic_train_flops(forward)
    tokens = batch * latent_frames * (side // m.patch_size) ** 2
    for _ in range(args.warmup):
        trainer.step(data)
    with PeakMemory(device) as mem:
        sync(device)
        began = time.perf_counter()
        for _ in range(args.steps):
            loss = trainer.step(data)
        sync(device)
        elapsed = time.perf_counter() - began
    if not torch.isfinite(loss):
        raise SystemExit(f"training loss is not finite ({loss.item()}): the figures would be meaningless")
    step_s = elapsed / args.steps

    peak, peak_source = peak_tflops_for(info["device_name"], args.peak_tflops)
    matmul_size = min(args.matmul_size, 128) if args.tiny else args.matmul_size
    matmul = measured_matmul_tflops(device, matmul_size) if matmul_size else None
    achieved = flops_counted / step_s / 1e12
    achieved_analytic = flops_analytic / step_s / 1e12
    result = {
        "part": "dit",
        **info,
        "tiny": args.tiny,
        "precision": "bf16 autocast, fp32 weights + AdamW state" if amp_dtype else "fp32",
        "params": params,
        "matmul_params": matmul_params(model),
        "batch": batch,
        "batch_note": batch_note,
        "resolution": args.resolution,
        "frames": args.frames,
        "latent_shape": list(latent_shape),
        "text_tokens": text_tokens,
        "text_dim": text_dim,
        "tokens_per_step": tokens,
        "steps": args.steps,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "samples_per_s": batch / step_s,
        "flops_counted": flops_counted,
        "flops_analytic": flops_analytic,
        "flops_by_group_forward": forward,
        "tflops_counted": achieved,
        "tflops_analytic": achieved_analytic,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "mfu_analytic": achieved_analytic / peak if peak else None,
        "matmul_tflops": matmul,
        "peak_memory_gib": gib(mem.peak),
        "final_loss": float(loss),
    }
    print_dit(result)
    return result


def print_dit(r: dict) -> None:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"precision: {r['precision']}; batch {r['batch']} x {r['tokens_per_step'] // r['batch']} tokens")
    print(f"step time:      {r['step_s'] * 1000:9.1f} ms (mean of {r['steps']} steps)")
    print(f"throughput:     {r['tokens_per_s']:9.0f} tokens/s, {r['samples_per_s']:.2f} clips/s")
    print(
        f"model FLOPs:    {r['flops_counted'] / 1e12:9.4g} TFLOP/step counted (FlopCounterMode), "
        f"{r['flops_analytic'] / 1e12:.4g} analytic (ratio {r['flops_counted'] / r['flops_analytic']:.4f}); "
        f"6*N*tokens = {6 * r['matmul_params'] * r['tokens_per_step'] / 1e12:.4g}"
    )
    print(f"achieved:       {r['tflops_counted']:9.1f} TFLOP/s")
    print(
        f"MFU:            {pct(r['mfu']):>9s} of {r['peak_tflops'] or 'n/a'} TFLOP/s ({r['peak_source']}); "
        f"analytic FLOPs: {pct(r['mfu_analytic'])}"
    )
    if r["matmul_tflops"]:
        print(
            f"matmul ceiling: {r['matmul_tflops']:9.1f} TFLOP/s measured; achieved/ceiling "
            f"{pct(r['tflops_counted'] / r['matmul_tflops'])}"
        )
    mem = r["peak_memory_gib"]
    print(f"peak memory:    {'n/a (CPU)' if mem is None else f'{mem:9.2f} GiB'}", flush=True)
    if abs(r["flops_counted"] / r["flops_analytic"] - 1) > 0.01:
        print("WARNING: counted and analytic FLOPs differ by more than 1%: some op is missed or miscounted")


# ------------------------------------------------------------------------------------------ VAE part
def bench_vae(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    settings = paper_settings(args.tiny)
    from diffusers.utils import logging as diffusers_logging

    from easyanimate.models.vae import SliceVAE

    diffusers_logging.set_verbosity_error()  # .to(bf16) of random weights warns about from_pretrained
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    info = device_report(device)
    with torch.device(device):
        vae = SliceVAE(**settings.vae.model.model_dump()).eval()
    vae.to(dtype)
    spatial = vae.spatial_compression
    if args.size % spatial:
        raise SystemExit(f"--size {args.size} is not a multiple of the VAE's {spatial}x compression")
    latent_t = SliceVAE.latent_num_frames(args.frames)
    z_shape = (1, vae.config.latent_channels, latent_t, args.size // spatial, args.size // spatial)
    slicing = args.slicing == "on"
    print(f"device: {info['device_name']} | torch {info['torch']}", flush=True)
    print(
        f"Slice VAE decode {args.size}x{args.size}x{args.frames} from latent {z_shape[1:]}, {args.dtype} weights, "
        f"slicing {args.slicing} (decoder_slice_latents={vae.config.decoder_slice_latents})",
        flush=True,
    )
    with torch.inference_mode():
        # Warm-up on a small latent: kernel selection and library workspaces stay out of the peak.
        vae.decode(
            torch.randn(1, z_shape[1], 2 * vae.config.decoder_slice_latents, 8, 8, device=device, dtype=dtype),
            use_slicing=slicing,
        )
        z = torch.randn(z_shape, device=device, dtype=dtype)
        status, message, out_shape, seconds = "ok", "", None, None
        with PeakMemory(device) as mem:
            began = time.perf_counter()
            try:
                sample = vae.decode(z, use_slicing=slicing).sample
                sync(device)
                seconds = time.perf_counter() - began
                out_shape = list(sample.shape)
                del sample
            except RuntimeError as exc:  # OOM, or a kernel refusing > 2**31-element tensors
                status = "oom" if is_out_of_memory(exc) else "error"
                message = str(exc).strip().splitlines()[0][:300]
    if status == "ok" and out_shape[2] != args.frames:
        raise SystemExit(f"decoded {out_shape[2]} frames, expected {args.frames}")
    result = {
        "part": "vae",
        **info,
        "tiny": args.tiny,
        "slicing": slicing,
        "dtype": args.dtype,
        "size": args.size,
        "frames": args.frames,
        "latent_shape": list(z_shape),
        "output_shape": out_shape,
        "status": status,
        "message": message,
        "seconds": seconds,
        "peak_memory_gib": gib(mem.peak),
        "baseline_memory_gib": gib(mem.before),
        "output_gib": 3 * args.frames * args.size**2 * torch.finfo(dtype).bits / 8 / GIB,
    }
    if status == "ok":
        extra = (
            ""
            if mem.peak is None
            else (
                f"peak {gib(mem.peak):.2f} GiB allocated (weights+latent before: {gib(mem.before):.2f} GiB, "
                f"decoded video: {result['output_gib']:.2f} GiB), "
            )
        )
        print(f"result: {extra}{seconds:.1f} s", flush=True)
    else:
        print(f"result: {status.upper()} ({message})", flush=True)
    return result


# ------------------------------------------------------------------------------------------ V5.1 part
# EasyAnimate V5.1 12B at the released checkpoint's sizes. Source: the defaults of diffusers' own
# EasyAnimateTransformer3DModel and AutoencoderKLMagvit (diffusers 0.42.1; its docs load the release
# alibaba-pai/EasyAnimateV5.1-12b-zh with these classes); the released transformer/config.json could not be read
# here (no network). Cross-check, tests/test_gpu_bench.py on the meta device: these sizes give 11.80 B transformer
# parameters = 23.6 GB in bf16 and 244.4 M VAE parameters = 978 MB in fp32, the sizes the Hub lists for
# transformer/ and vae/diffusion_pytorch_model.safetensors of alibaba-pai/EasyAnimateV5.1-12b-zh-diffusers.
V51_TRANSFORMER_12B = {
    "num_attention_heads": 48,
    "attention_head_dim": 64,  # hidden size 3072
    "in_channels": 16,  # text-to-video: the VAE's latents (InP: 16 + 1 mask + 16 masked-video latents = 33)
    "out_channels": 16,
    "patch_size": 2,
    "num_layers": 48,
    "mmdit_layers": 48,  # every block is an MMDiT block: separate text and video weights
    "time_embed_dim": 512,
    "text_embed_dim": 3584,  # hidden size of Qwen2-VL-7B, the V5.1 text encoder
}
V51_VAE_12B = {
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),  # 8x space, 4x time
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.7125,
    "spatial_group_norm": True,
}
# Hub file sizes of alibaba-pai/EasyAnimateV5.1-12b-zh-diffusers (bytes, as listed, rounded).
V51_RELEASE_FILE_BYTES = {"transformer": (23.6e9, torch.bfloat16), "vae": (978e6, torch.float32)}
V51_TEXT_TOKENS = 256  # the pipeline's max_sequence_length (v51.max_sequence_length)
# --tiny: the sizes of diffusers' own EasyAnimate tests (and tests/v51_tiny.py).
V51_TINY_TRANSFORMER = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "num_layers": 1,
    "mmdit_layers": 1,
    "time_embed_dim": 8,
    "text_embed_dim": 16,
    "sample_width": 4,
    "sample_height": 4,
}
V51_TINY_VAE = {
    "latent_channels": 4,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "spatial_group_norm": False,
}
V51_TINY_TEXT_TOKENS = 16
# Every single mode, and what the v5.1 preset runs with plus VAE tiling: the low-memory setting for a 24 GB GPU.
V51_MODES = (
    "none",
    "vae_slicing",
    "vae_tiling",
    "fp8_layerwise",
    "model_cpu_offload",
    "sequential_cpu_offload",
    "model_cpu_offload+fp8_layerwise",
    "model_cpu_offload+fp8_layerwise+vae_tiling",
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype``: a 12B model never exists in float32 (47 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def v51_components(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random V5.1 transformer + MagViT VAE (+ its scheduler), built in place on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        transformer = EasyAnimateTransformer3DModel(**(V51_TINY_TRANSFORMER if tiny else V51_TRANSFORMER_12B))
        vae = AutoencoderKLMagvit(**(V51_TINY_VAE if tiny else V51_VAE_12B))
    transformer.to(dtype).eval()
    vae.to(dtype).eval()
    # V5.1's scheduler: flow matching with shift 3 (the releases' scheduler_config.json).
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def v51_build_device(tiny: bool, device: torch.device, dtype: torch.dtype, offload: bool) -> torch.device:
    """Where to build: ``device``, except for an offload mode when the weights would not fit the GPU's free memory."""
    if not offload or device.type != "cuda":
        return device
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel

    with torch.device("meta"):
        count = sum(
            p.numel()
            for m in (
                EasyAnimateTransformer3DModel(**(V51_TINY_TRANSFORMER if tiny else V51_TRANSFORMER_12B)),
                AutoencoderKLMagvit(**(V51_TINY_VAE if tiny else V51_VAE_12B)),
            )
            for p in m.parameters()
        )
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > 1.2 * count * torch.finfo(dtype).bits / 8 else torch.device("cpu")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers wherever they are (float8 storage counts 1 byte each)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def host_peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Linux/macOS
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def bench_v51(args) -> list[dict]:
    device = torch.device(args.device)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random weights: no from_pretrained, nothing to warn about
    info = device_report(device)
    print(f"device: {info['device_name']} | torch {info['torch']}", flush=True)
    return [bench_v51_mode(args, device, info, mode) for mode in args.modes]


def bench_v51_mode(args, device: torch.device, info: dict, memory_mode: str) -> dict:
    from diffusers import EasyAnimatePipeline

    from easyanimate.families.v51 import OFFLOAD_MODES, apply_memory_mode, parse_memory_mode

    modes = parse_memory_mode(memory_mode, setting="--modes")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    text_tokens = V51_TINY_TEXT_TOKENS if args.tiny else V51_TEXT_TOKENS
    result = {
        "part": "v51",
        **info,
        "tiny": args.tiny,
        "memory_mode": memory_mode,
        "modes": modes,
        "model": "tiny" if args.tiny else "EasyAnimate V5.1 12B (random weights)",
        "dtype": args.dtype,
        "size": args.size,
        "frames": args.frames,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "text_tokens": text_tokens,
        "tile_sample_min_size": args.tile_size if "vae_tiling" in modes else None,
        "tile_sample_stride": args.tile_stride if "vae_tiling" in modes else None,
        "status": "ok",
        "message": "",
    }
    print(f"-- memory_mode {memory_mode}: {args.size}x{args.size}x{args.frames}, {args.steps} steps", flush=True)
    offload = [m for m in modes if m in OFFLOAD_MODES]
    if offload and device.type != "cuda" and not args.offload_on_cpu:
        result.update(status="skipped", message=f"{'+'.join(offload)} offloads to a CUDA device; none on {device}")
        print(f"result: SKIPPED ({result['message']})", flush=True)
        return result

    began = time.perf_counter()
    try:
        # Random init is fast on the GPU; the offload modes then keep the weights in CPU memory (their hooks move
        # them), and are built there directly when the GPU could not hold them.
        parts = v51_components(args.tiny, v51_build_device(args.tiny, device, dtype, bool(offload)), dtype)
        if offload:
            for module in (parts["transformer"], parts["vae"]):
                module.to("cpu")
        pipe = EasyAnimatePipeline(text_encoder=None, tokenizer=None, **parts)
        pipe.set_progress_bar_config(disable=True)
        transformer_bytes_built = module_bytes(pipe.transformer)
        apply_memory_mode(
            pipe, memory_mode, device=device, tile_sample_min_size=args.tile_size, tile_sample_stride=args.tile_stride
        )
        sync(device)
    except RuntimeError as exc:  # the weights alone do not fit: a result too
        if not is_out_of_memory(exc):
            raise
        result.update(status="oom", message="building the model: " + str(exc).strip().splitlines()[0][:300])
        parts = pipe = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"result: {format_v51(result)}", flush=True)
        return result
    result["build_s"] = time.perf_counter() - began
    result["transformer_params"] = sum(p.numel() for p in pipe.transformer.parameters())
    result["transformer_weights_gib"] = gib(module_bytes(pipe.transformer))
    result["transformer_weights_built_gib"] = gib(transformer_bytes_built)
    result["vae_weights_gib"] = gib(module_bytes(pipe.vae))
    exec_device = pipe._execution_device
    text_dim = pipe.transformer.config.text_embed_dim
    gen = torch.Generator(device=exec_device).manual_seed(0)
    embeds = torch.randn(2, text_tokens, text_dim, generator=gen, device=exec_device).to(dtype)
    mask = torch.ones(1, text_tokens, dtype=torch.long, device=exec_device)
    print(
        f"built in {result['build_s']:.1f} s: transformer {result['transformer_params'] / 1e9:.3f} B params, "
        f"{fmt_gib(result['transformer_weights_gib'])} stored; VAE {fmt_gib(result['vae_weights_gib'])}",
        flush=True,
    )

    marks: list[tuple[float, int | None]] = []

    def on_step(_pipe, _step, _timestep, tensors):
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        marks.append((time.perf_counter(), peak))
        return tensors

    output = None
    with PeakMemory(device) as mem:  # no inference_mode: the pipeline runs under its own no_grad, as in use
        began = time.perf_counter()
        try:
            output = pipe(
                prompt_embeds=embeds[:1],
                prompt_attention_mask=mask,
                negative_prompt_embeds=embeds[1:],
                negative_prompt_attention_mask=mask,
                num_frames=args.frames,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator(device=exec_device).manual_seed(0),
                output_type="pt",
                callback_on_step_end=on_step,
            ).frames
            sync(device)
        except RuntimeError as exc:  # OOM, or a kernel refusing a tensor this large
            result["status"] = "oom" if is_out_of_memory(exc) else "error"
            result["message"] = str(exc).strip().splitlines()[0][:300]
        ended = time.perf_counter()
    if output is not None:
        result["output_shape"] = list(output.shape)
        result["output_finite"] = bool(torch.isfinite(output).all())
        if output.shape[1] != args.frames:
            raise SystemExit(f"generated {output.shape[1]} frames, expected {args.frames}")
    result.update(
        peak_memory_gib=gib(mem.peak),
        denoise_peak_memory_gib=gib(marks[-1][1]) if marks else None,
        resident_before_gib=gib(mem.before),
        host_peak_rss_gib=gib(host_peak_rss()),
        steps_done=len(marks),
        seconds=ended - began,
        # The first step also pays for setup (kernel selection, the first offload transfers); the next ones do not.
        step_s=(marks[-1][0] - marks[0][0]) / (len(marks) - 1) if len(marks) > 1 else None,
        first_step_s=marks[0][0] - began if marks else None,
        decode_s=ended - marks[-1][0] if marks and output is not None else None,
    )
    del pipe, parts, output, embeds
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"result: {format_v51(result)}", flush=True)
    return result


def format_v51(r: dict) -> str:
    if r["status"] == "skipped":
        return f"skipped: {r['message']}"
    if r["status"] != "ok":
        where = f" after {r['steps_done']} denoising steps" if r.get("steps_done") else ""
        peak = "" if r.get("peak_memory_gib") is None else f", peak {r['peak_memory_gib']:.2f} GiB before it"
        return f"{r['status'].upper()}{where}: {r['message']}{peak}"
    step = "n/a" if r["step_s"] is None else f"{r['step_s']:.2f} s/step"
    return (
        f"peak {fmt_gib(r['peak_memory_gib'])} (denoising {fmt_gib(r['denoise_peak_memory_gib'])}, resident before "
        f"{fmt_gib(r['resident_before_gib'])}), {step}, decode {r['decode_s']:.1f} s, transformer weights "
        f"{fmt_gib(r['transformer_weights_gib'])}, host peak RSS {fmt_gib(r['host_peak_rss_gib'])}"
    )


def fmt_gib(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 0.1:
        return f"{value:.2f} GiB"
    return f"{value * 1024:.1f} MiB" if value * 1024 >= 0.1 else f"{value * 2**20:.1f} KiB"


# ------------------------------------------------------------------------------------------ summary
def summarize(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    lines = ["", "==================== GPU benchmark summary ===================="]
    dit = [r for r in rows if r["part"] == "dit"]
    if dit:
        r = dit[-1]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g}"
        lines += [
            f"device: {r['device_name']} (torch {r['torch']})",
            f"DiT train step ({r['precision']}), {r['resolution']} px x {r['frames']} frames, "
            f"batch {r['batch']}: {r['step_s'] * 1000:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
            f"{r['tflops_counted']:.1f} TFLOP/s, MFU {mfu}, peak memory "
            + ("n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"),
        ]
    else:
        lines.append("DiT: no result (failed or timed out: see its log above)")
    vae = {r["slicing"]: r for r in rows if r["part"] == "vae"}
    for slicing in (True, False):
        r = vae.get(slicing)
        name = "sliced  " if slicing else "unsliced"
        if r is None:
            lines.append(f"VAE decode {name}: no result (failed or timed out: see its log above)")
        elif r["status"] != "ok":
            lines.append(
                f"VAE decode {name} {r['size']}x{r['size']}x{r['frames']} ({r['dtype']}): "
                f"{r['status'].upper()}: {r['message']}"
            )
        else:
            peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
            lines.append(
                f"VAE decode {name} {r['size']}x{r['size']}x{r['frames']} ({r['dtype']}): peak {peak}, "
                f"{r['seconds']:.1f} s"
            )
    on, off = vae.get(True), vae.get(False)
    if on and off and on["status"] == off["status"] == "ok" and on["peak_memory_gib"] and off["peak_memory_gib"]:
        lines.append(f"VAE peak memory unsliced / sliced: {off['peak_memory_gib'] / on['peak_memory_gib']:.1f}x")
    lines += summarize_v51([r for r in rows if r["part"] == "v51"])
    return "\n".join(lines)


def summarize_v51(rows: list[dict]) -> list[str]:
    """One line per memory mode (the last result of each), in V51_MODES order, then any other modes."""
    if not rows:
        return ["V5.1: no result (failed or timed out: see its log above)"]
    last = {r["memory_mode"]: r for r in rows}
    r = rows[-1]
    model = "tiny V5.1" if r["tiny"] else "V5.1 12B"
    lines = [
        f"{model} denoise {r['size']}x{r['size']}x{r['frames']}, {r['steps']} steps, CFG {r['guidance_scale']:g}, "
        f"{r['dtype']}, then decode: peak GPU memory per v51.memory_mode"
    ]
    width = max(len(m) for m in last)
    order = [m for m in V51_MODES if m in last] + [m for m in last if m not in V51_MODES]
    lines += [f"  {mode:<{width}}  {format_v51(last[mode])}" for mode in order]
    return lines


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda")
    common.add_argument("--tiny", action="store_true", help="tiny model and input (CPU tests)")
    common.add_argument("--json", type=Path, help="append the result as one JSON line")

    dit = sub.add_parser("dit", parents=[common], help="DiT training throughput and MFU")
    dit.add_argument("--resolution", type=int, help="pixels, square (default 256; --tiny: 64)")
    dit.add_argument("--frames", type=int, default=16, help="video frames before the VAE")
    dit.add_argument("--batch", type=int, default=0, help="0: largest that fits (CUDA)")
    dit.add_argument("--max-batch", type=int, default=64)
    dit.add_argument("--memory-fraction", type=float, default=0.85, help="of GPU memory, for the auto batch")
    dit.add_argument("--warmup", type=int, default=3)
    dit.add_argument("--steps", type=int, default=10)
    dit.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    dit.add_argument("--text-dim", type=int, help="text encoder width (default: from weights, else T5-XXL)")
    dit.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, for MFU")
    dit.add_argument("--matmul-size", type=int, default=8192, help="0 skips the matmul ceiling check")

    vae = sub.add_parser("vae", parents=[common], help="Slice VAE decode peak memory")
    vae.add_argument("--slicing", choices=("on", "off"), default="on")
    vae.add_argument("--size", type=int, help="output pixels, square (default 512; --tiny: 64)")
    vae.add_argument("--frames", type=int, help="output frames (default 144; --tiny: 16)")
    vae.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")

    v51 = sub.add_parser("v51", parents=[common], help="EasyAnimate V5.1 12B denoising peak memory per memory mode")
    v51.add_argument("--modes", nargs="+", default=list(V51_MODES), help="v51.memory_mode values, each a fresh model")
    v51.add_argument("--size", type=int, help="output pixels, square (default 512; --tiny: 64)")
    v51.add_argument("--frames", type=int, help="output frames, 1 + 4k (default 49, the releases' longest; --tiny: 9)")
    v51.add_argument("--steps", type=int, default=2, help="denoising steps")
    v51.add_argument("--guidance", type=float, default=6.0, help="> 1: classifier-free guidance (batch of 2)")
    v51.add_argument("--tile-size", type=int, help="vae_tiling tile edge in pixels (default 256; --tiny: 32)")
    v51.add_argument("--tile-stride", type=int, help="vae_tiling tile stride in pixels (default 192; --tiny: 24)")
    v51.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    v51.add_argument(
        "--offload-on-cpu",
        action="store_true",
        help="tests: run the offload modes' hooks with the CPU as their compute device instead of skipping them",
    )

    summary = sub.add_parser("summary", help="print the figures gathered in --json")
    summary.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.part == "dit":
        args.resolution = args.resolution or (64 if args.tiny else 256)
    elif args.part == "vae":
        args.size = args.size or (64 if args.tiny else 512)
        args.frames = args.frames or (16 if args.tiny else 144)
    elif args.part == "v51":
        args.size = args.size or (64 if args.tiny else 512)
        args.frames = args.frames or (9 if args.tiny else 49)
        # Below the VAE's own 512 px tiles nothing is tiled at 512x512: vae_tiling is measured with smaller tiles.
        args.tile_size = args.tile_size or (32 if args.tiny else 256)
        args.tile_stride = args.tile_stride or (24 if args.tiny else 192)
        if (args.frames - 1) % 4 or args.size % 16:
            parser.error(f"v51: --frames must be 1 + 4k and --size a multiple of 16 (got {args.frames}, {args.size})")
    return args


def main(argv=None) -> dict | list[dict] | None:
    """The part's result (v51: one result per memory mode), appended to ``--json`` one line each."""
    args = parse_args(argv)
    if args.part == "summary":
        print(summarize(args.json))
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
            "this part needs a GPU, or --device cpu --tiny for a smoke run"
        )
    result = {"dit": bench_dit, "vae": bench_vae, "v51": bench_v51}[args.part](args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:  # one line per result; gpu.sh runs parts one after another
            for row in result if isinstance(result, list) else [result]:
                handle.write(json.dumps(row) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when easyanimate is not installed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
