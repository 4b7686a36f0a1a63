"""Slice VAE training: losses, stage-2 encoder freeze, exact resume, held-out evaluation, streaming and CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate.config import load_settings
from easyanimate.data.manifest import to_frame, write_manifest
from easyanimate.models.vae import SliceVAE
from easyanimate.training.losses import (
    LPIPS,
    VideoDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from easyanimate.training.vae import evaluate_vae, perceptual_status, train_vae
from tests.conftest import REPO, SAMPLES

TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "norm_groups": 4, "latent_channels": 4}
STAGE = {
    "batch_size": 1,
    "resolution": 32,
    "num_frames": 8,
    "image_ratio": 0.5,
    "learning_rate": 1e-3,
    "sample_fps": 8.0,
    "checkpoint_every": 3,
    "lr_scheduler": "cosine",
    "warmup_steps": 1,
}
ADV = {"enabled": True, "disc_start_step": 1, "channels": 8, "layers": 2}


def _row(clip_id: str, path: str, split: str, duration: float) -> dict:
    return {
        "clip_id": clip_id,
        "source": "trailer_bbb.mp4",
        "start_s": 0.0,
        "end_s": duration,
        "duration_s": duration,
        "width": 64,
        "height": 36,
        "fps": 8.0,
        "aesthetic": 5.0,
        "text_area": 0.0,
        "motion": 0.01,
        "caption": "a rabbit",
        "status": "accepted",
        "reject_reason": None,
        "clip_path": f"clips/{path}",
        "split": split,
    }


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """A real (tiny) curated folder: a train clip and a later, held-out val clip of the Big Buck Bunny trailer."""
    from easyanimate.data.video_io import decode_frames, write_video

    root = tmp_path_factory.mktemp("curated")
    frames = decode_frames(SAMPLES / "trailer_bbb.mp4", times=list(np.arange(0.0, 3.5, 1 / 8)), size=(64, 36))
    write_video(frames[:16], root / "clips" / "train0.mp4", fps=8)
    write_video(frames[16:], root / "clips" / "val0.mp4", fps=8)
    write_manifest(
        to_frame([_row("train0", "train0.mp4", "train", 2.0), _row("val0", "val0.mp4", "val", 1.5)]),
        root / "manifest.parquet",
    )
    return root


def make_settings(tmp: Path, stage1: dict | None = None, stage2: dict | None = None):
    return load_settings(
        REPO / "params.yaml",
        preset="tiny",
        overrides={
            "paths": {"reports": str(tmp / "reports"), "checkpoints": str(tmp / "ckpt")},
            "vae": {
                "model": TINY_VAE,
                "stage1": {**STAGE, "steps": 4, **(stage1 or {})},
                "stage2": {**STAGE, "steps": 2, **(stage2 or {})},
                "eval": {"num_frames": 8},
            },
        },
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------ losses
def test_hinge_losses_and_adaptive_weight():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75; 0.5*(0.25+0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gan = (3 * w).sum(), (w**2).sum()  # grads: (3, 3) and (2, 4)
    expected = torch.tensor([3.0, 3.0]).norm() / (torch.tensor([2.0, 4.0]).norm() + 1e-4)
    assert adaptive_weight(rec, gan, w, max_weight=1e4).item() == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_weight(rec, gan, w, max_weight=0.5).item() == 0.5


def test_discriminators_judge_images_per_frame_and_videos_in_3d():
    disc = VideoDiscriminator(3, channels=8, layers=2)
    video, image = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 1, 32, 32)
    logits = disc(video)
    assert len(logits) == 2 and logits[0].shape[0] == 2 * 8 and logits[1].shape[:2] == (2, 1)
    assert len(disc(image)) == 1  # a single frame has no motion for the 3D critic to judge
    assert disc(image)[0].shape[0] == 2


def test_lpips_is_off_without_weights_and_loads_a_local_file(tmp_path):
    settings = load_settings(
        REPO / "params.yaml", preset="tiny", overrides={"vae": {"stage1": {"perceptual_weight": 0.1}}}
    )
    status = perceptual_status(settings)
    assert not status.enabled and "weights.lpips" in status.reason
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in LPIPS().state_dict().items()}
    save_file(state, str(tmp_path / "lpips.safetensors"))
    lpips = LPIPS.from_file(tmp_path / "lpips.safetensors")
    assert all(torch.equal(lpips.state_dict()[k], v) for k, v in state.items())
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    assert lpips(x, x).item() == 0.0
    assert lpips(x, x.flip(-1)).item() > 0.0
    on = load_settings(
        REPO / "params.yaml",
        preset="tiny",
        overrides={
            "vae": {"stage1": {"perceptual_weight": 0.1}},
            "weights": {"lpips": str(tmp_path / "lpips.safetensors")},
        },
    )
    assert perceptual_status(on).enabled


# ------------------------------------------------------------------------------------------ training
def test_stage2_freezes_encoder_bit_for_bit_and_evaluates_held_out(curated, tmp_path):
    settings = make_settings(
        tmp_path,
        stage1={"steps": 1, "ema_decay": 0.9},
        stage2={"adversarial": {**ADV, "disc_start_step": 0}, "ema_decay": 0.9},
    )
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    train_vae(settings, 1, curated, s1, tmp_path / "c1", show_progress=False)
    result = train_vae(settings, 2, curated, s2, tmp_path / "c2", init_dir=s1, show_progress=False)
    assert result.steps == 2
    before, after = weights(s1), weights(s2)
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    metrics, videos = evaluate_vae(settings, s2, curated, tmp_path / "report", 32, 8.0)
    assert set(metrics) == {"vae_psnr", "vae_ssim", "vae_eval_clips"} and metrics["vae_eval_clips"] == 1.0
    assert 0 < metrics["vae_psnr"] < 60 and -1 <= metrics["vae_ssim"] <= 1
    from easyanimate.data.video_io import probe

    info = probe(videos[0])
    assert (info.width, info.height, info.num_frames) == (64, 32, 8)  # original | reconstruction


def test_killed_run_resumes_to_the_same_weights(curated, tmp_path, monkeypatch):
    """6 steps straight vs. killed in step 5 (checkpoint at 3) and rerun: same weights, GAN + EMA included."""
    import easyanimate.training.vae as vae_training

    settings = make_settings(tmp_path, stage1={"steps": 6, "adversarial": ADV, "ema_decay": 0.8})
    straight = train_vae(settings, 1, curated, tmp_path / "a", tmp_path / "ca", show_progress=False)

    real_batch = vae_training.ClipSampler.batch

    def dies_at_step_5(self, step, batch_size):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, step, batch_size)

    monkeypatch.setattr(vae_training.ClipSampler, "batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_vae(settings, 1, curated, tmp_path / "b", tmp_path / "cb", show_progress=False)
    monkeypatch.setattr(vae_training.ClipSampler, "batch", real_batch)
    resumed = train_vae(settings, 1, curated, tmp_path / "b", tmp_path / "cb", show_progress=False)

    assert resumed.resumed_from == 3 and straight.resumed_from == 0
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=0, atol=1e-6)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


# ------------------------------------------------------------------------------------------ streaming + CLI
def test_streamed_reconstruction_matches_decode_of_encode():
    torch.manual_seed(0)
    vae = SliceVAE(**{**TINY_VAE, "block_out_channels": tuple(TINY_VAE["block_out_channels"])}).eval()
    frames = (torch.rand(16, 32, 32, 3) * 255).to(torch.uint8).numpy()
    seen = []
    out = vae.reconstruct_video(frames, callback=lambda done, total: seen.append((done, total)))
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)
    with torch.no_grad():
        ref = vae.decode(vae.encode(x, use_slicing=False).latent_dist.mode(), use_slicing=False).sample
    ref_u8 = ref[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.abs(out.astype(int) - ref_u8.astype(int)).max() <= 1  # float summation order only
    assert seen == [(i, 4) for i in range(1, 5)]  # 2 encoder slices (8 frames) + 2 decoder slices (2 latents)
    with pytest.raises(ValueError, match="num_frames"):
        vae.reconstruct_video(frames[:6])


def test_cli_vae_reconstruct(tmp_path):
    from typer.testing import CliRunner

    from easyanimate.cli import app
    from easyanimate.data.video_io import probe

    torch.manual_seed(0)
    SliceVAE(**TINY_VAE).save_pretrained(tmp_path / "vae")
    out = tmp_path / "recon.mp4"
    result = CliRunner().invoke(
        app,
        [
            "vae",
            "reconstruct",
            str(SAMPLES / "trailer_bbb.mp4"),
            str(out),
            "--model",
            str(tmp_path / "vae"),
            "--frames",
            "10",
            "--size",
            "36",
        ],
    )
    assert result.exit_code == 0, result.output
    info = probe(out)
    # 10 -> 8 frames (valid lengths are 1 or multiples of 4 >= 8); 36 px short side -> cropped to 32, 16:9 -> 64
    assert (info.num_frames, info.height, info.width) == (8, 32, 64)
    bad = CliRunner().invoke(
        app, ["vae", "reconstruct", str(SAMPLES / "trailer_bbb.mp4"), str(out), "--model", str(tmp_path / "nope")]
    )
    assert bad.exit_code == 2 and "not a saved VAE" in bad.output


def test_stage1_fits_the_scaling_factor_and_stage2_keeps_it(curated, tmp_path):
    """scaling_factor = 1 / std of the training latents, so the DiT sees unit-variance latents."""
    from easyanimate.data.datasets import ClipSampler, load_clip_frames
    from easyanimate.models.vae import SliceVAE

    settings = make_settings(tmp_path, stage1={"steps": 1, "scaling_batches": 4, "image_ratio": 0.0})
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    train_vae(settings, 1, curated, s1, tmp_path / "c1", show_progress=False)
    vae = SliceVAE.from_pretrained(s1).eval()
    factor = vae.config.scaling_factor
    assert factor != pytest.approx(0.18215)
    cfg = settings.vae.stage1
    sampler = ClipSampler(load_clip_frames(curated, "train", cfg.resolution, cfg.sample_fps), cfg.num_frames, 0.0, 0)
    with torch.no_grad():
        z = torch.cat([vae.encode(sampler.batch(i, 2)[0]).latent_dist.mode().flatten() for i in range(4)])
    assert float((z * factor).std()) == pytest.approx(1.0, rel=0.35)  # other windows, same statistics
    train_vae(settings, 2, curated, s2, tmp_path / "c2", init_dir=s1, show_progress=False)
    assert SliceVAE.from_pretrained(s2).config.scaling_factor == factor


def test_init_logvar_starts_a_fresh_posterior_quiet_but_not_a_warm_start(curated, tmp_path):
    """At the default logvar 0 an unused latent channel is pure noise and stays unused; init_logvar avoids that."""
    from easyanimate.data.datasets import load_clip_frames

    x = load_clip_frames(curated, "val", 32, 8.0)[0].frames[:8].float().permute(1, 0, 2, 3).unsqueeze(0) / 127.5 - 1

    def logvar(folder: Path) -> torch.Tensor:
        with torch.no_grad():
            return SliceVAE.from_pretrained(folder).eval().encode(x).latent_dist.logvar

    settings = make_settings(tmp_path, stage1={"steps": 1, "init_logvar": -6.0, "learning_rate": 1e-5})
    train_vae(settings, 1, curated, tmp_path / "quiet", tmp_path / "c1", show_progress=False)
    assert logvar(tmp_path / "quiet").sub(-6.0).abs().max() < 0.05

    default = make_settings(tmp_path, stage1={"steps": 1, "init_logvar": None, "learning_rate": 1e-5})
    train_vae(default, 1, curated, tmp_path / "loud", tmp_path / "c2", show_progress=False)
    assert logvar(tmp_path / "loud").abs().mean() < 1.0  # the layer's own init: std about 1

    # Retraining from a champion keeps its learned posterior.
    warm = make_settings(tmp_path, stage1={"steps": 1, "init_logvar": -6.0, "learning_rate": 1e-5})
    train_vae(warm, 1, curated, tmp_path / "warm", tmp_path / "c3", init_dir=tmp_path / "loud", show_progress=False)
    assert torch.allclose(logvar(tmp_path / "warm"), logvar(tmp_path / "loud"), atol=0.05)
