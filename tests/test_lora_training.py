"""LoRA training as a user runs it: a folder of style images (or videos) with captions -> a small
safetensors adapter that moves generations toward the style, loadable by the pipeline and the CLI.

The base models are tiny and trained here, briefly, on flat images of random colours: a VAE that
reconstructs colour and a DiT that generates colours. The style set is flat red, so "toward the
style" is measured as the distance between the generated mean colour and red as this VAE renders it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from easyanimate.config import load_settings, resolve_weight_path
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.text_encoder import encode_prompts, load_text_encoder
from easyanimate.models.vae.slice_vae import SliceVAE
from easyanimate.pipelines import EasyAnimatePipeline, make_scheduler
from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME
from easyanimate.schedulers import make_train_scheduler
from easyanimate.training.dit import diffusion_loss
from easyanimate.training.lora import build_latent_banks, load_style_folder, train_lora

pytestmark = pytest.mark.slow
SCHED_CFG = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
RED = (220, 30, 30)
STYLE_CAPTION = "a flat red minimalist painting"
SIZE = 32  # smallest side the tiny DiT (VAE /8, patch 2) takes with more than one token


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


def flat(rgb, n: int = 1, size: int = SIZE) -> torch.Tensor:
    """n flat-colour images as (n, 3, 1, size, size) in [-1, 1]."""
    return (torch.as_tensor(rgb, dtype=torch.float32).view(-1, 3, 1, 1, 1) / 127.5 - 1).expand(n, 3, 1, size, size)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A colour VAE and a colour-generating DiT, saved as the lora stage reads them."""
    root = tmp_path_factory.mktemp("lora_base")
    settings = load_settings()
    tokenizer, encoder = load_text_encoder(resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder"))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    colours = torch.randint(0, 256, (64, 3), generator=g).float()

    vae = SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(120):
        x = flat(colours[torch.randint(0, 64, (16,), generator=g)], 16, size=8)
        posterior = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.mode()).sample, x) + 1e-4 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    latents = vae.encode(flat(colours, 64)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))  # unit-variance latents, as SD chose 0.18215
    latents = latents * vae.config.scaling_factor

    dit = EasyAnimateTransformer3DModel(hidden_size=32, depth=2, num_heads=2, text_embed_dim=384)
    hidden, mask = encode_prompts(tokenizer, encoder, ["a flat colour painting"], settings.dit.model.max_text_tokens)
    scheduler = make_train_scheduler(settings)
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3)
    for _ in range(250):
        picks = torch.randint(0, 64, (16,), generator=g)
        loss = diffusion_loss(dit, scheduler, latents[picks], hidden.expand(16, -1, -1), mask.expand(16, -1), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dit.eval().requires_grad_(False)
    vae.save_pretrained(root / "vae")
    dit.save_pretrained(root / "dit")
    with torch.no_grad():
        rendered = vae.decode(vae.encode(flat(RED)).latent_dist.mode()).sample
    target = ((rendered / 2 + 0.5).clamp(0, 1) * 255).mean(dim=(0, 2, 3, 4))
    pipe = EasyAnimatePipeline(
        vae=vae,
        transformer=dit,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler("dpm++", SCHED_CFG),
    )
    pipe.set_progress_bar_config(disable=True)
    return {"root": root, "pipe": pipe, "target": target}


def style_settings(data_dir, **train):
    train = {
        "steps": 40,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "resolution": SIZE,
        "num_frames": 1,
        "image_ratio": 1.0,
        "checkpoint_every": 1000,
        **train,
    }
    return load_settings(overrides={"lora": {"rank": 8, "alpha": 8, "data_dir": str(data_dir), "train": train}})


def colour_distance(pipe, target, prompt=STYLE_CAPTION) -> float:
    """Mean distance (0-255 RGB) between each generated video's mean colour and the style colour."""
    video = (
        pipe(
            [prompt] * 4,
            num_frames=1,
            height=SIZE,
            width=SIZE,
            num_inference_steps=10,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).frames
        * 255
    )
    return float((video.mean(dim=(2, 3, 4)) - target).norm(dim=1).mean())


@pytest.fixture(scope="module")
def style_adapter(base):
    root = base["root"]
    style = root / "style"
    style.mkdir()
    for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 64), (32, 32)]):  # odd sizes: centre crops
        Image.new("RGB", (w, h), RED).save(style / f"red_{i}.png")
        (style / f"red_{i}.txt").write_text(STYLE_CAPTION)
    (style / "notes.md").write_text("not an image: ignored")
    result = train_lora(
        style_settings(style),
        root / "unused_curated",
        root / "vae",
        root / "dit",
        root / "lora",
        root / "ckpt_style",
        show_progress=False,
    )
    return root / "lora", result


def test_style_adapter_moves_generations_toward_the_style(base, style_adapter):
    pipe, target = base["pipe"], base["target"]
    adapter, result = style_adapter
    file = adapter / LORA_WEIGHT_NAME
    assert file.is_file() and len(result.losses) == 40 and np.isfinite(result.losses).all()
    # Small: rank-8 attention adapters, a fraction of the DiT they modify.
    assert file.stat().st_size < 0.5 * (base["root"] / "dit" / "diffusion_pytorch_model.safetensors").stat().st_size

    before = colour_distance(pipe, target)
    pipe.load_lora_weights(adapter)
    try:
        full = colour_distance(pipe, target)
        pipe.set_lora_scale(0.5)
        half = colour_distance(pipe, target)
        pipe.set_lora_scale(0.0)
        assert colour_distance(pipe, target) == pytest.approx(before, abs=1e-4)
    finally:
        pipe.unload_lora_weights()
    print(f"distance to the style colour: base {before:.1f}, scale 0.5 {half:.1f}, scale 1 {full:.1f}")
    assert full < 0.5 * before  # measurably toward the style ...
    assert full < half < before  # ... and the adapter scale is a dial between base and style


def test_lora_trains_on_a_video_folder(base, tmp_path):
    from easyanimate.data.video_io import write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    frames = np.zeros((16, 40, 48, 3), np.uint8)
    frames[..., 2] = np.linspace(60, 250, 16, dtype=np.uint8)[:, None, None]  # a blue fade-in
    write_video(frames, folder / "fade.mp4", fps=8)
    (folder / "fade.txt").write_text("a blue fade in")
    Image.new("RGB", (32, 32), (0, 0, 200)).save(folder / "still.png")  # images and videos mix

    items = load_style_folder(folder, SIZE, 8.0, (".mp4",))
    assert {c.clip_id: tuple(c.frames.shape) for c in items} == {
        "fade": (16, 3, SIZE, SIZE),
        "still": (1, 3, SIZE, SIZE),
    }
    assert items[0].caption == "a blue fade in" and items[1].caption == ""

    settings = style_settings(folder, steps=4, num_frames=8, image_ratio=0.5, batch_size=2)
    from easyanimate.training.dit import TextBank

    text = TextBank.build(settings, [c.caption for c in items])
    images, videos = build_latent_banks(base["pipe"].vae, items, 8, text, seed=0)
    assert len(images) == 17 and len(videos) == 2  # every frame as an image; two 8-frame windows
    assert tuple(videos.latents[0].shape) == (4, 2, 4, 4)

    root = base["root"]
    result = train_lora(
        settings,
        root / "unused",
        root / "vae",
        root / "dit",
        tmp_path / "adapter",
        tmp_path / "ckpt",
        show_progress=False,
    )
    assert len(result.losses) == 4 and np.isfinite(result.losses).all()
    assert (tmp_path / "adapter" / LORA_WEIGHT_NAME).is_file()

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lora.data_dir .* holds no images"):
        load_style_folder(tmp_path / "empty", SIZE, 8.0, (".mp4",))
    with pytest.raises(ValueError, match="lora: no video has lora.train.num_frames=32"):
        train_lora(
            style_settings(folder, num_frames=32, image_ratio=0.5),
            root / "unused",
            root / "vae",
            root / "dit",
            tmp_path / "adapter32",
            tmp_path / "ckpt32",
            show_progress=False,
        )


def test_cli_generate_applies_the_trained_adapter(base, style_adapter, tmp_path):
    from easyanimate.cli import app
    from easyanimate.data.video_io import decode_frames, probe

    pipeline_dir = tmp_path / "pipeline"
    base["pipe"].save_pretrained(pipeline_dir)
    adapter, _ = style_adapter
    runner = CliRunner()
    common = [
        "--model",
        str(pipeline_dir),
        "--steps",
        "10",
        "--frames",
        "8",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--guidance",
        "1",
        "--seed",
        "0",
    ]

    def generate(out, *extra):
        result = runner.invoke(app, ["generate", STYLE_CAPTION, "--out", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
        assert probe(out).num_frames == 8
        return float(np.linalg.norm(decode_frames(out).reshape(-1, 3).mean(0) - base["target"].numpy()))

    plain = generate(tmp_path / "base.mp4")
    styled = generate(tmp_path / "styled.mp4", "--lora", str(adapter))
    faint = generate(tmp_path / "faint.mp4", "--lora", str(adapter / LORA_WEIGHT_NAME), "--lora-scale", "0.3")
    assert styled < faint < plain  # through encode + decode of the mp4 too

    result = runner.invoke(
        app, ["generate", "x", "--out", str(tmp_path / "y.mp4"), *common, "--lora", str(tmp_path / "missing")]
    )
    assert result.exit_code == 2 and "neither a LoRA folder" in result.output
    result = runner.invoke(app, ["generate", "x", "--out", str(tmp_path / "y.webm"), *common])
    assert result.exit_code == 2 and "must end in .mp4 or .gif" in result.output
