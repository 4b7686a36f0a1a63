"""benchmarks/gpu.sh + gpu_bench.py must work the first time a session is lent a GPU: run their code on CPU at a
tiny size, and check the FLOP formula behind the MFU figure against torch's FlopCounterMode."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.vae import SliceVAE
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


def test_bench_builds_the_dit_and_geometry_that_training_uses():
    from easyanimate.training.dit import build_transformer

    settings = gpu_bench.paper_settings(tiny=False)
    channels, spatial = gpu_bench.vae_geometry(settings)
    with torch.device("meta"):  # paper width: no real weights needed to compare configs
        ours = EasyAnimateTransformer3DModel(**gpu_bench.dit_kwargs(settings, channels, 4096))
        training = build_transformer(settings, channels, 4096)
    assert dict(ours.config) == dict(training.config)
    assert ours.config.motion_module and ours.config.hidden_size == settings.dit.model.hidden_size
    with torch.device("meta"):
        vae = SliceVAE(**settings.vae.model.model_dump())
    assert (channels, spatial) == (vae.config.latent_channels, vae.spatial_compression)


@pytest.mark.parametrize("motion_module,long_skips,grid_reshape", [(True, True, 2), (False, False, 1)])
def test_analytic_flops_equal_flop_counter(one_torch_thread, motion_module, long_skips, grid_reshape):
    torch.manual_seed(0)
    model = EasyAnimateTransformer3DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=4,
        num_heads=2,
        text_embed_dim=24,
        motion_module=motion_module,
        grid_reshape=grid_reshape,
        long_skips=long_skips,
        base_latent_size=8,
    )
    batch, frames, side, text_tokens = 2, 3, 8, 5
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, side, side),
        "timestep": torch.tensor([3, 700]),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 24),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    forward = gpu_bench.analytic_forward_flops(model, batch, frames, side, side, text_tokens)
    assert ("motion_module" in forward) == motion_module and ("long_skips" in forward) == long_skips

    with torch.no_grad():
        assert gpu_bench.counted_flops(lambda: model(**inputs), torch.device("cpu")) == sum(forward.values())
    train = gpu_bench.counted_flops(lambda: model(**inputs).sample.square().mean().backward(), torch.device("cpu"))
    assert train == gpu_bench.analytic_train_flops(forward)


def test_dit_part_runs_tiny_on_cpu(one_torch_thread, tmp_path):
    out = tmp_path / "results.jsonl"
    result = gpu_bench.main(
        ["dit", "--device", "cpu", "--tiny", "--warmup", "0", "--steps", "1", "--peak-tflops", "1", "--json", str(out)]
    )
    settings = gpu_bench.paper_settings(tiny=True)
    # 64 px / 16 frames through the paper VAE's geometry: 8x spatial, causal 4x temporal.
    assert result["latent_shape"] == [4, SliceVAE.latent_num_frames(16), 8, 8] == [4, 4, 8, 8]
    assert result["tokens_per_step"] == 4 * (8 // settings.dit.model.patch_size) ** 2
    assert result["text_tokens"] == settings.dit.model.max_text_tokens
    assert result["flops_counted"] == result["flops_analytic"] > 0
    assert result["mfu"] == pytest.approx(result["tflops_counted"] / 1.0)
    assert result["peak_memory_gib"] is None and math.isfinite(result["final_loss"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_vae_part_reports_sliced_unsliced_and_oom(tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"
    for slicing in ("on", "off"):
        result = gpu_bench.main(["vae", "--device", "cpu", "--tiny", "--slicing", slicing, "--json", str(out)])
        assert result["status"] == "ok" and result["output_shape"] == [1, 3, 16, 64, 64]
        assert result["latent_shape"] == [1, 4, 4, 8, 8]
    summary = gpu_bench.summarize(out)
    assert "VAE decode sliced   64x64x16 (bf16): peak n/a" in summary
    assert "VAE decode unsliced 64x64x16 (bf16): peak n/a" in summary

    # A decode that runs out of GPU memory is a figure ("OOM"), not a crash; the warm-up decode still works.
    real_decode, calls = SliceVAE.decode, []

    def decode_then_oom(self, z, *args, **kwargs):
        calls.append(z.shape)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return real_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(SliceVAE, "decode", decode_then_oom)
    result = gpu_bench.main(["vae", "--device", "cpu", "--tiny", "--slicing", "off", "--json", str(out)])
    assert result["status"] == "oom" and "Tried to allocate" in result["message"]
    assert "VAE decode unsliced 64x64x16 (bf16): OOM: CUDA out of memory" in gpu_bench.summarize(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run the real benchmark")
def test_gpu_sh_exits_with_a_clear_message_without_cuda(tmp_path):
    env = {**os.environ, "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ERROR: no CUDA device visible" in proc.stdout
    assert (tmp_path / "gpu_bench.log").read_text() == proc.stdout


# ----------------------------------------------------------------------------------------- V5.1 part
def test_v51_sizes_are_the_released_12b():
    """The 12B sizes the V5.1 part builds give the parameter counts of the release's weight files (bf16 transformer,
    fp32 VAE), as the Hub lists them for alibaba-pai/EasyAnimateV5.1-12b-zh-diffusers."""
    from diffusers import AutoencoderKLMagvit
    from diffusers import EasyAnimateTransformer3DModel as V51Transformer

    with torch.device("meta"):
        transformer = V51Transformer(**gpu_bench.V51_TRANSFORMER_12B)
        vae = AutoencoderKLMagvit(**gpu_bench.V51_VAE_12B)
    for name, model in (("transformer", transformer), ("vae", vae)):
        file_bytes, dtype = gpu_bench.V51_RELEASE_FILE_BYTES[name]
        params = sum(p.numel() for p in model.parameters())
        assert params * torch.finfo(dtype).bits / 8 == pytest.approx(file_bytes, rel=0.002), name
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == 3072
    assert vae.spatial_compression_ratio == 8 and vae.temporal_compression_ratio == 4


V51_ARGS = ["v51", "--device", "cpu", "--tiny", "--dtype", "fp32", "--steps", "2"]  # fp32: CPU bf16 convs are slow


def test_v51_part_runs_tiny_on_cpu(one_torch_thread, tmp_path):
    out = tmp_path / "results.jsonl"
    modes = ["none", "vae_slicing", "vae_tiling", "fp8_layerwise", "model_cpu_offload", "sequential_cpu_offload"]
    rows = gpu_bench.main([*V51_ARGS, "--modes", *modes, "--json", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == json.loads(json.dumps(rows))
    got = {r["memory_mode"]: r for r in rows}
    assert list(got) == modes
    for mode in ("none", "vae_slicing", "vae_tiling", "fp8_layerwise"):
        r = got[mode]
        assert r["status"] == "ok", r
        # 64 px x 9 frames: the MagViT VAE's 1 + 4k frames, (batch, frames, channels, height, width).
        assert r["output_shape"] == [1, 9, 3, 64, 64] and r["output_finite"]
        assert r["steps_done"] == 2 and r["peak_memory_gib"] is None  # no allocator statistics on a CPU
    # fp8 layerwise storage: the transformer's big weights take 1 byte instead of 4 (norms, patch embedding and
    # output projection stay in the compute dtype, as diffusers skips them).
    assert got["fp8_layerwise"]["transformer_weights_gib"] < 0.5 * got["none"]["transformer_weights_gib"]
    assert got["fp8_layerwise"]["transformer_weights_built_gib"] == got["none"]["transformer_weights_gib"]
    assert got["vae_tiling"]["tile_sample_min_size"] == 32 < 64  # smaller than the frame: really tiled
    for mode in ("model_cpu_offload", "sequential_cpu_offload"):
        assert got[mode]["status"] == "skipped" and "CUDA" in got[mode]["message"]
    summary = gpu_bench.summarize(out)
    assert "tiny V5.1 denoise 64x64x9, 2 steps, CFG 6" in summary
    assert "  model_cpu_offload       skipped: model_cpu_offload offloads to a CUDA device" in summary
    assert "  none                    peak n/a (denoising n/a, resident before n/a)" in summary


def test_v51_offload_hooks_and_oom(one_torch_thread, tmp_path, monkeypatch):
    """The offload modes' diffusers hooks with the CPU as compute device (what the GPU run does, minus CUDA), and an
    out-of-memory call reported as a figure."""
    from diffusers import EasyAnimatePipeline

    out = tmp_path / "results.jsonl"
    modes = ["model_cpu_offload+fp8_layerwise+vae_tiling", "sequential_cpu_offload"]
    rows = gpu_bench.main([*V51_ARGS, "--offload-on-cpu", "--modes", *modes, "--json", str(out)])
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["output_shape"] == [1, 9, 3, 64, 64] for r in rows)

    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 GiB")

    monkeypatch.setattr(EasyAnimatePipeline, "__call__", out_of_memory)
    [row] = gpu_bench.main([*V51_ARGS, "--modes", "none", "--json", str(out)])
    assert row["status"] == "oom" and "Tried to allocate" in row["message"] and "output_shape" not in row
    lines = {line.split()[0]: line for line in gpu_bench.summarize(out).splitlines() if line.startswith("  ")}
    assert lines["none"].endswith("OOM: CUDA out of memory. Tried to allocate 60.00 GiB")
    assert "peak n/a" in lines["sequential_cpu_offload"]

    # Weights that do not fit the GPU at all are a result as well.
    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.60 GiB")

    monkeypatch.setattr(gpu_bench, "v51_components", no_room)
    [row] = gpu_bench.main([*V51_ARGS, "--modes", "fp8_layerwise"])
    assert row["status"] == "oom" and row["message"].startswith("building the model: CUDA out of memory")
