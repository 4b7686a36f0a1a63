"""EasyAnimatePipeline end to end with a tiny Slice VAE, a tiny DiT and the real (offline) MiniLM encoder."""

import numpy as np
import pytest
import torch
from peft import LoraConfig

from easyanimate.config import load_settings, resolve_weight_path
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.text_encoder import load_text_encoder
from easyanimate.models.vae.slice_vae import SliceVAE
from easyanimate.pipelines import EasyAnimatePipeline, EasyAnimatePipelineOutput, make_scheduler

SCHED_CFG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(resolve_weight_path(load_settings().weights.text_encoder, "weights.text_encoder"))


def _perturb(model, seed):
    # Random weights everywhere so zero-initialised output layers do not make every output trivially equal.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _pipe(text_encoder, scheduler="dpm++"):
    torch.manual_seed(0)
    vae = SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).eval()
    dit = _perturb(EasyAnimateTransformer3DModel(hidden_size=32, depth=2, num_heads=2, text_embed_dim=384), 1).eval()
    tokenizer, encoder = text_encoder
    pipe = EasyAnimatePipeline(
        vae=vae,
        transformer=dit,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler(scheduler, SCHED_CFG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(text_encoder):
    return _pipe(text_encoder)


def _run(pipe, seed=0, **kw):
    kw = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(seed), **kw}
    return pipe("a cat playing piano", **kw).frames


def test_generates_uint8_video(pipe):
    out = pipe("a cat playing piano", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, EasyAnimatePipelineOutput)
    assert out.frames.shape == (1, 8, 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.frames.std() > 0


def test_output_types_and_image_mode(pipe):
    pt = _run(pipe, output_type="pt")
    assert pt.shape == (1, 3, 8, 64, 64) and pt.min() >= 0 and pt.max() <= 1
    np.testing.assert_array_equal((pt * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy(), _run(pipe))
    assert _run(pipe, output_type="latent").shape == (1, 4, 2, 8, 8)
    assert _run(pipe, num_frames=1, height=32, width=48).shape == (1, 1, 32, 48, 3)
    batch = pipe(["a cat", "a dog"], negative_prompt="blurry", num_inference_steps=2, output_type="latent").frames
    assert batch.shape == (2, 4, 2, 8, 8)


def test_encoded_video_outputs(pipe, tmp_path):
    import imageio.v3 as iio

    from easyanimate.data.video_io import probe

    frames = _run(pipe)
    mp4 = _run(pipe, output_type="mp4", fps=4)
    assert isinstance(mp4, list) and len(mp4) == 1 and isinstance(mp4[0], bytes)
    (tmp_path / "bytes.mp4").write_bytes(mp4[0])
    info = probe(tmp_path / "bytes.mp4")
    assert (info.num_frames, info.width, info.height, round(info.fps)) == (8, 64, 64, 4)
    gif_bytes = _run(pipe, output_type="gif", fps=4)[0]
    gif = iio.imread(gif_bytes, extension=".gif")
    # Pillow merges identical consecutive frames into one longer frame; the running time is kept.
    durations = [iio.immeta(gif_bytes, index=i, extension=".gif")["duration"] for i in range(len(gif))]
    assert sum(durations) == 8 * 250 and gif.shape[1:3] == (64, 64)
    # GIF is palette-quantised, not lossy-compressed: colours stay close to the decoded frames.
    assert np.abs(gif[0, ..., :3].astype(float) - frames[0, 0]).mean() < 8
    written = pipe(
        ["a cat", "a dog"],
        num_inference_steps=1,
        output_type="mp4",
        output_path=tmp_path / "out" / "v.mp4",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert written == [tmp_path / "out" / "v_0.mp4", tmp_path / "out" / "v_1.mp4"]
    assert all(probe(p).num_frames == 8 for p in written)
    with pytest.raises(ValueError, match="2 output paths for 1 prompts"):
        _run(pipe, output_type="gif", output_path=[tmp_path / "a.gif", tmp_path / "b.gif"])


def test_memory_controls(pipe):
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # 16 frames: 2 decode slices
    sliced = _run(pipe, num_frames=16, latents=latents, output_type="pt")
    pipe.disable_vae_slicing()
    try:
        assert not pipe.vae_slicing
        whole = _run(pipe, num_frames=16, latents=latents, output_type="pt")
    finally:
        pipe.enable_vae_slicing()
    # The Slice VAE shares features across slices, so slicing changes memory, not the video.
    torch.testing.assert_close(sliced, whole, atol=1e-4, rtol=1e-4)
    if not torch.cuda.is_available():
        assert pipe.enable_idle_component_offload() is False  # nothing to offload: honest no-op
        assert pipe._execution_device.type == "cpu"


def test_seed_determinism(pipe):
    np.testing.assert_array_equal(_run(pipe, seed=3), _run(pipe, seed=3))
    assert not torch.allclose(_run(pipe, seed=3, output_type="latent"), _run(pipe, seed=4, output_type="latent"))


def test_guidance_changes_output(pipe):
    a = _run(pipe, output_type="latent", guidance_scale=1.0)
    b = _run(pipe, output_type="latent", guidance_scale=6.0)
    assert not torch.allclose(a, b)
    other = pipe(
        "a snowy mountain", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).frames
    assert not torch.allclose(other, _run(pipe, output_type="latent"))


def test_given_latents_are_used(pipe):
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    a = _run(pipe, seed=0, latents=latents, output_type="latent")
    b = _run(pipe, seed=1, latents=latents, output_type="latent")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="latents must have shape"):
        _run(pipe, latents=torch.randn(1, 4, 1, 8, 8))


@pytest.mark.parametrize("name", ["dpm++", "ddim", "euler", "euler_a", "pndm"])
def test_all_schedulers_run(text_encoder, name):
    pipe = _pipe(text_encoder, name)
    out = _run(pipe, num_inference_steps=3, output_type="latent")
    assert out.shape == (1, 4, 2, 8, 8) and torch.isfinite(out).all()


def test_make_scheduler_types_and_unknown():
    sched = make_scheduler("dpm++", SCHED_CFG)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="ddim.*dpm\\+\\+.*euler.*euler_a.*pndm"):
        make_scheduler("lcm", SCHED_CFG)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = EasyAnimatePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is EasyAnimateTransformer3DModel and type(loaded.vae) is SliceVAE
    assert type(loaded.scheduler) is type(pipe.scheduler)
    np.testing.assert_array_equal(_run(loaded), _run(pipe))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["ok", "  "]}, "prompt"),
        ({"height": 60}, "multiples of 16"),
        ({"width": 72}, "multiples of 16"),
        ({"num_frames": 5}, "num_frames"),
        ({"num_frames": 4}, "num_frames"),
        ({"output_type": "webm"}, "output_type"),
        ({"output_type": "np", "output_path": "x.mp4"}, "output_path"),
        ({"output_type": "mp4", "output_path": "x.gif"}, "must end in .mp4"),
        ({"negative_prompt": ["a", "b"]}, "negative"),
    ],
)
def test_invalid_inputs(pipe, kwargs, match):
    kwargs = {"prompt": "a cat", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_lora_scale_fuse_unload_save_load(text_encoder, tmp_path):
    pipe = _pipe(text_encoder)
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(7))

    def run():
        return _run(pipe, latents=latents, output_type="latent")

    base = run()
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False), "tmp")
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), base)  # unloading an unfused adapter restores the base exactly
    torch.manual_seed(11)
    # init_lora_weights=False: random non-zero B so the adapter really changes the output.
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    with_lora = run()
    assert not torch.allclose(with_lora, base, atol=1e-4)

    pipe.set_lora_scale(0.0)
    torch.testing.assert_close(run(), base)
    pipe.set_adapters("default", 1.0)
    torch.testing.assert_close(run(), with_lora)

    pipe.fuse_lora()
    torch.testing.assert_close(run(), with_lora, atol=1e-4, rtol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(run(), with_lora, atol=1e-4, rtol=1e-4)

    saved = pipe.save_lora_weights(tmp_path / "lora")
    assert saved.name == "pytorch_lora_weights.safetensors"
    pipe.save_lora_weights(tmp_path / "single.safetensors")

    pipe.unload_lora_weights()
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    # fuse+unfuse leaves float round-off (W + BA - BA) in the base weights, hence the tolerance.
    torch.testing.assert_close(run(), base, atol=1e-3, rtol=1e-3)

    pipe.load_lora_weights(tmp_path / "lora")  # folder
    torch.testing.assert_close(run(), with_lora, atol=1e-3, rtol=1e-3)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path / "single.safetensors", adapter_name="style", scale=0.0)  # file
    torch.testing.assert_close(run(), base, atol=1e-3, rtol=1e-3)
    pipe.set_lora_scale(1.0, "style")
    torch.testing.assert_close(run(), with_lora, atol=1e-3, rtol=1e-3)
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights(tmp_path / "missing")


def test_top_level_lazy_exports():
    import subprocess
    import sys

    import easyanimate

    assert easyanimate.SliceVAE is SliceVAE
    assert easyanimate.EasyAnimateTransformer3DModel is EasyAnimateTransformer3DModel
    assert easyanimate.EasyAnimatePipeline is EasyAnimatePipeline
    with pytest.raises(AttributeError):
        easyanimate.NoSuchThing  # noqa: B018
    code = "import sys, easyanimate; print(sorted(m for m in ('torch', 'diffusers', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `import easyanimate` stays cheap
