"""EasyAnimate V5.1 family (easyanimate/families/v51.py) on tiny random components saved in the release layout.

Nothing comes from a hub: tests/v51_tiny.py builds the components from configs, as diffusers' own tests do.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from easyanimate.config import GenerateConfig, Settings, V51Config
from easyanimate.families.v51 import (
    MEMORY_MODES,
    V51Error,
    check_v51_folder,
    generate_v51,
    generate_v51_from_settings,
    image_to_video_condition,
    is_inpaint_checkpoint,
    load_v51_lora,
    load_v51_pipeline,
    set_v51_lora_scale,
    train_v51_lora,
)
from tests.v51_tiny import save_tiny_v51

FRAMES, SIZE, STEPS, GUIDANCE = 5, 32, 2, 3.0
PROMPT = "a red fox runs"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("v51")
    return {"t2v": save_tiny_v51(root / "t2v", inpaint=False), "inp": save_tiny_v51(root / "inp", inpaint=True)}


def _load(folder, memory_mode="none", **kw):
    return load_v51_pipeline(folder, memory_mode, dtype=torch.float32, device="cpu", **kw)


@pytest.fixture(scope="module")
def t2v(folders):
    return _load(folders["t2v"])


@pytest.fixture(scope="module")
def inp(folders):
    return _load(folders["inp"])


def _images():
    rng = np.random.default_rng(0)
    start = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not the output size: scaled and cropped
    other = 255 - start
    end = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    return start, other, end


def _gen(pipe, image=None, end_image=None, seed=0, **kw):
    return generate_v51(pipe, PROMPT, FRAMES, SIZE, SIZE, STEPS, GUIDANCE, seed, image, end_image, **kw)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------- folder + loading
def test_folder_layout_and_kind(folders):
    for kind, folder in folders.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["transformer"] == ["diffusers", "EasyAnimateTransformer3DModel"]
        assert index["vae"] == ["diffusers", "AutoencoderKLMagvit"]
        assert index["text_encoder"] == ["transformers", "Qwen2VLForConditionalGeneration"]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert check_v51_folder(folder) == folder
        assert is_inpaint_checkpoint(folder) is (kind == "inp")


def test_clear_folder_errors(folders, tmp_path):
    with pytest.raises(V51Error, match="v51.model_dir is not set"):
        load_v51_pipeline(None)
    with pytest.raises(V51Error, match="v51.model_dir=.*nowhere.* is not a folder"):
        load_v51_pipeline(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(folders["t2v"], broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(V51Error, match=r"v51.model_dir=.*missing scheduler/scheduler_config.json"):
        load_v51_pipeline(broken)
    with pytest.raises(V51Error, match="InP"):
        load_v51_pipeline(folders["t2v"], inpaint=True)
    with pytest.raises(V51Error, match="unknown \\['turbo'\\]"):
        load_v51_pipeline(folders["t2v"], "vae_tiling+turbo")
    with pytest.raises(V51Error, match="exclude each other"):
        load_v51_pipeline(folders["t2v"], "model_cpu_offload+sequential_cpu_offload")


def test_config_knows_the_same_memory_modes():
    assert set(V51Config.memory_modes()) == set(MEMORY_MODES)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        V51Config(num_frames=8)


# ----------------------------------------------------------------------------------------- generation
def test_t2v_generation(t2v):
    video = _gen(t2v)
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8
    assert np.array_equal(video, _gen(t2v)), "same seed, same video"
    assert _diff(video, _gen(t2v, seed=1)) > 0.5, "another seed, another video"
    one = generate_v51(t2v, PROMPT, 1, SIZE, 2 * SIZE, STEPS, GUIDANCE, 0)
    assert one.shape == (1, SIZE, 2 * SIZE, 3)


def test_bad_sizes_are_clear_errors(t2v):
    for frames in (0, 4, 8, 48):
        with pytest.raises(V51Error, match=r"num_frames=\d+: .*1 \+ 4k frames"):
            generate_v51(t2v, PROMPT, frames, SIZE, SIZE, STEPS, GUIDANCE, 0)
    with pytest.raises(V51Error, match="height=40: must be a positive multiple of 16"):
        generate_v51(t2v, PROMPT, FRAMES, 40, SIZE, STEPS, GUIDANCE, 0)


def test_image_on_non_inp_checkpoint_is_a_clear_error(t2v, folders):
    start, _, _ = _images()
    with pytest.raises(V51Error, match="image-to-video needs a V5.1 InP checkpoint"):
        _gen(t2v, image=start)
    settings = Settings(
        v51=V51Config(model_dir=folders["t2v"], dtype="float32", num_frames=FRAMES),
        generate=GenerateConfig(height=SIZE, width=SIZE, num_inference_steps=STEPS),
    )
    with pytest.raises(V51Error, match="--image needs a V5.1 InP checkpoint"):
        generate_v51_from_settings(settings, image=start, pipe=t2v)
    with pytest.raises(V51Error, match="--end-image needs --image"):
        generate_v51_from_settings(settings, end_image=start, pipe=t2v)


def test_generate_from_settings_image_to_video(folders):
    start, _, end = _images()
    settings = Settings(
        v51=V51Config(model_dir=folders["inp"], dtype="float32", num_frames=FRAMES),
        generate=GenerateConfig(
            prompts=("a fox", "a cat"), height=SIZE, width=2 * SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE
        ),
    )
    videos = generate_v51_from_settings(settings, image=start, end_image=end, device="cpu")
    assert [v.shape for v in videos] == [(FRAMES, SIZE, 2 * SIZE, 3)] * 2
    assert not np.array_equal(videos[0], videos[1])


def test_i2v_condition_tensors():
    start, _, end = _images()
    video, mask = image_to_video_condition(start, end, FRAMES, SIZE, SIZE)
    assert video.shape == (1, 3, FRAMES, SIZE, SIZE) and mask.shape == (1, 1, FRAMES, SIZE, SIZE)
    assert 0 <= float(video.min()) and float(video.max()) <= 1
    assert mask[0, 0, :, 0, 0].tolist() == [0, 255, 255, 255, 0]
    assert torch.equal(video[:, :, 1], video[:, :, 0]) and not torch.equal(video[:, :, -1], video[:, :, 0])
    _, mask = image_to_video_condition(start, None, FRAMES, SIZE, SIZE)
    assert mask[0, 0, :, 0, 0].tolist() == [0, 255, 255, 255, 255]


def test_i2v_start_and_end_frames_condition_the_video(inp):
    start, other, end = _images()
    plain = _gen(inp)
    with_start = _gen(inp, image=start)
    with_other = _gen(inp, image=other)
    with_both = _gen(inp, image=start, end_image=end)
    for video in (plain, with_start, with_other, with_both):
        assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8
    assert _diff(with_start, plain) > 0.5, "a start image changes the video"
    assert _diff(with_start, with_other) > 0.5, "another start image, another video"
    # The end frame shares its latent frame with generated ones (the MagViT packs 4 frames in one), so the
    # inpaint pipeline's trilinear mask resize dilutes it: with random weights its effect is small, but there.
    assert not np.array_equal(with_both, with_start), "an end image changes the video"
    assert not np.array_equal(with_both, _gen(inp, image=start, end_image=other)), "another end, another video"
    assert np.array_equal(with_start, _gen(inp, image=start)), "deterministic for a seed"


# ----------------------------------------------------------------------------------------- memory modes
# Tolerances in mean |uint8 difference|. Offload, slicing and tiling below the tile size move or split work
# without changing the math; float8 storage quantises the transformer's weights (3 mantissa bits), so its video
# only stays close.
MODE_CASES = {
    "model_cpu_offload": 0.0,
    "sequential_cpu_offload": 0.0,
    "vae_slicing": 0.0,
    "vae_tiling": 0.0,
    "fp8_layerwise": 2.0,
    "model_cpu_offload+fp8_layerwise+vae_slicing+vae_tiling": 2.0,
}


@pytest.fixture(scope="module")
def inp_reference(inp):
    start, _, _ = _images()
    return _gen(inp, image=start)


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_memory_modes_match_none_on_cpu(folders, inp_reference, mode):
    # diffusers' offloads need an accelerator unless given device=; "cpu" runs the very same hooks on the CPU.
    pipe = _load(folders["inp"], mode)
    start, _, _ = _images()
    video = _gen(pipe, image=start)
    assert video.shape == inp_reference.shape
    diff = _diff(video, inp_reference)
    assert diff <= MODE_CASES[mode], f"{mode}: mean |diff| {diff:.3f}"
    if "fp8_layerwise" in mode:
        assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
        assert pipe.transformer.proj_out.weight.dtype == torch.float32, "diffusers skips the output projection"
    if "vae_tiling" in mode:
        assert pipe.vae.use_tiling
    if "vae_slicing" in mode:
        assert pipe.vae.use_slicing
    if "model_cpu_offload" in mode:
        assert pipe._all_hooks, "accelerate's model offload hooks are in place"
    if "sequential_cpu_offload" in mode:
        from diffusers.hooks.group_offloading import _get_group_onload_device

        assert _get_group_onload_device(pipe.transformer) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without an accelerator")
@pytest.mark.parametrize("mode", ["model_cpu_offload", "sequential_cpu_offload"])
def test_offload_without_accelerator_is_a_clear_error(folders, mode):
    with pytest.raises(V51Error, match=f"{mode} offloads to an accelerator"):
        load_v51_pipeline(folders["t2v"], mode, dtype=torch.float32)


def test_vae_tiling_really_tiles_with_small_tiles(folders):
    """Below the VAE's 512-pixel tile nothing is tiled (hence equal above). With 16-pixel tiles it encodes and decodes
    tile by tile; the blended seams of a random-weight VAE are not close to the untiled video, so only the path and
    the output's shape are checked here."""
    from unittest import mock

    pipe = _load(folders["inp"], "vae_tiling", tile_sample_min_size=16, tile_sample_stride=12)
    assert pipe.vae.tile_sample_min_height == 16 and pipe.vae.tile_sample_stride_width == 12
    start, _, _ = _images()
    with (
        mock.patch.object(pipe.vae, "tiled_decode", wraps=pipe.vae.tiled_decode) as decode,
        mock.patch.object(pipe.vae, "tiled_encode", wraps=pipe.vae.tiled_encode) as encode,
    ):
        video = _gen(pipe, image=start)
    assert decode.called and encode.called
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8


# ----------------------------------------------------------------------------------------- LoRA
def _samples():
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (9, 40, 48, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [(clip, "a red fox runs"), (image, "a still red fox")]


def _lora_cfg(**kw):
    base = dict(
        dtype="float32",
        lora_rank=4,
        lora_alpha=4,
        train_steps=3,
        learning_rate=5e-2,
        max_grad_norm=1.0,
        train_height=SIZE,
        train_width=SIZE,
        train_num_frames=5,
        inpaint_i2v_ratio=0.5,
        caption_dropout=0.0,
        checkpoint_every=2,
    )
    base.update(kw)
    return V51Config(**base)


def test_lora_training_changes_output_and_scale_zero_is_base(folders, inp_reference, tmp_path):
    pipe = _load(folders["inp"])
    start, _, _ = _images()
    adapter = train_v51_lora(pipe, _samples(), _lora_cfg(), tmp_path / "lora", checkpoint_dir=tmp_path / "ckpt")
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3 and all(np.isfinite(summary["losses"]))
    assert (adapter / "pytorch_lora_weights.safetensors").is_file() and (adapter / "adapter_config.json").is_file()

    tuned = _gen(pipe, image=start)
    assert _diff(tuned, inp_reference) > 0.5, "the trained LoRA changes the video"
    set_v51_lora_scale(pipe, 0.0)
    assert np.array_equal(_gen(pipe, image=start), inp_reference), "scale 0 is the base model"
    set_v51_lora_scale(pipe, 1.0)

    # The saved adapter reloads into a fresh pipeline (peft injection; diffusers' LoRA file format).
    fresh = _load(folders["inp"], lora_dir=adapter)
    assert np.array_equal(_gen(fresh, image=start), tuned)
    assert np.array_equal(_gen(fresh, image=start, lora_scale=0.0), inp_reference)
    names = [k for k, _ in fresh.transformer.named_parameters() if "lora_A" in k]
    assert any("attn1.to_q" in k for k in names) and any("add_q_proj" in k for k in names)
    # Without peft's adapter_config.json the config comes from the file's diffusers-style metadata.
    (adapter / "adapter_config.json").unlink()
    meta_only = _load(folders["inp"])
    load_v51_lora(meta_only, adapter, scale=1.0)
    assert np.array_equal(_gen(meta_only, image=start), tuned)
    # LoRA layers stay out of diffusers' float8 storage; the adapter still acts under the low-memory modes.
    low = _load(folders["inp"], "model_cpu_offload+fp8_layerwise", lora_dir=adapter)
    to_q = low.transformer.transformer_blocks[0].attn1.to_q
    assert to_q.base_layer.weight.dtype == torch.float8_e4m3fn and to_q.lora_A["default"].weight.dtype == torch.float32
    assert _diff(_gen(low, image=start), tuned) <= 2.0
    assert _diff(_gen(low, image=start, lora_scale=0.0), inp_reference) <= 2.0

    # Resume: a rerun with more steps starts from the newest checkpoint (step 3) instead of step 0.
    again = _load(folders["inp"])
    more = train_v51_lora(
        again, _samples(), _lora_cfg(train_steps=4), tmp_path / "lora4", checkpoint_dir=tmp_path / "ckpt"
    )
    summary4 = json.loads((more / "train_summary.json").read_text())
    assert summary4["resumed_from"] == 3 and summary4["losses"][:3] == summary["losses"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-3", "step-4"]


def test_lora_training_t2v_checkpoint(folders, tmp_path):
    pipe = _load(folders["t2v"])
    base = _gen(pipe)
    adapter = train_v51_lora(pipe, _samples(), _lora_cfg(train_steps=2), tmp_path / "lora")
    assert _diff(_gen(pipe), base) > 0.5
    set_v51_lora_scale(pipe, 0.0)
    assert np.array_equal(_gen(pipe), base)
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------- CLI
def _cli(args, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, EASYANIMATE_STATE_DIR=str(cwd / ".easyanimate"))
    easyanimate = Path(sys.executable).parent / "easyanimate"
    return subprocess.run([str(easyanimate), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_generate_v51_text_and_image_to_video(folders, tmp_path):
    from PIL import Image

    from easyanimate.data.video_io import probe

    start, _, end = _images()
    Image.fromarray(start).save(tmp_path / "start.png")
    Image.fromarray(end).save(tmp_path / "end.png")
    (tmp_path / "params.yaml").write_text("v51:\n  dtype: float32\n")
    size = ["--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)]
    i2v = ["--image", "start.png", "--end-image", "end.png"]
    proc = _cli(
        ["generate", PROMPT, "--out", "i2v.mp4", "--family", "v5.1", "--model", str(folders["inp"]), *size, *i2v],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = probe(tmp_path / "i2v.mp4")
    assert (info.num_frames, info.width, info.height) == (FRAMES, SIZE, SIZE)
    proc = _cli(
        ["generate", PROMPT, "--out", "t2v.gif", "--family", "v5.1", "--model", str(folders["t2v"]), *size], tmp_path
    )
    assert proc.returncode == 0 and (tmp_path / "t2v.gif").stat().st_size > 0, proc.stderr[-3000:]
    # An image for a text-to-video checkpoint, or for the native family: one clear line, rc 2.
    proc = _cli(
        ["generate", PROMPT, "--out", "x.mp4", "--family", "v5.1", "--model", str(folders["t2v"]), *size, *i2v],
        tmp_path,
    )
    assert proc.returncode == 2 and "needs a V5.1 InP checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(["generate", PROMPT, "--out", "x.mp4", "--image", "start.png"], tmp_path)
    assert proc.returncode == 2 and "--family v5.1" in proc.stderr
