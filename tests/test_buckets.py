"""Aspect-ratio and frame-count buckets: the table, clip assignment, one-bucket batches, and DiT training on
the real 16:9 sample clips producing non-square latents, reproducibly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from easyanimate.config import BucketConfig, ConfigError, load_settings
from easyanimate.data.buckets import (
    BucketTable,
    draw_batch,
    frame_bucket,
    frame_buckets_for,
    group_indices,
)
from easyanimate.data.datasets import center_crop, cover_size
from easyanimate.data.manifest import to_frame, write_manifest
from easyanimate.models.dit import EasyAnimateTransformer3DModel
from easyanimate.models.vae import SliceVAE
from tests.conftest import REPO, SAMPLES

RATIOS = BucketConfig().aspect_ratios


def log_aspect(height: float, width: float) -> float:
    return math.log(width / height)


# ------------------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("resolution,multiple", [(64, 16), (128, 16), (256, 32), (512, 32), (768, 32)])
def test_sizes_are_multiples_near_the_pixel_budget(resolution, multiple):
    table = BucketTable.build(resolution, RATIOS, multiple)
    assert (resolution, resolution) in table.sizes
    for h, w in table.sizes:
        assert h % multiple == 0 and w % multiple == 0 and h >= multiple and w >= multiple
        # Rounding each side to the nearest multiple moves it by at most multiple / 2.
        worst = (1 + multiple / 2 / min(h, w)) ** 2
        assert 1 / worst <= h * w / resolution**2 <= worst
    if resolution >= 256:
        assert all(abs(h * w / resolution**2 - 1) < 0.12 for h, w in table.sizes)
    assert len(set(table.sizes)) == len(table.sizes)


def test_sixteen_by_nine_gets_a_wide_bucket_at_the_tiny_budget():
    """The bundled samples are 1280x720: at the tiny preset's 64 px budget they must not become squares."""
    table = BucketTable.build(64, RATIOS, 16)
    h, w = table.nearest(720, 1280)
    assert w > h and abs(log_aspect(h, w) - log_aspect(720, 1280)) < 0.1
    assert 0.85 < h * w / 64**2 < 1.15  # same compute as the old 64x64 crop
    ph, pw = table.nearest(1280, 720)
    assert (ph, pw) == (w, h)  # portrait mirrors landscape


@pytest.mark.parametrize(
    "clip", [(720, 1280), (1280, 720), (1000, 1000), (480, 640), (640, 480), (1080, 1620), (500, 3000), (2000, 333)]
)
def test_each_clip_goes_to_the_nearest_ratio_and_is_not_distorted(clip):
    height, width = clip
    table = BucketTable.build(512, RATIOS, 32)
    bucket = table.nearest(height, width)
    errors = [abs(log_aspect(*s) - log_aspect(height, width)) for s in table.sizes]
    assert abs(log_aspect(*bucket) - log_aspect(height, width)) == min(errors)
    # Resize to cover: aspect kept (up to a pixel of rounding) and both sides at least the bucket's.
    ch, cw = cover_size(height, width, bucket)
    assert ch >= bucket[0] and cw >= bucket[1] and (ch == bucket[0] or cw == bucket[1])
    assert abs(log_aspect(ch, cw) - log_aspect(height, width)) <= 1.0 / min(ch, cw)
    frames = torch.arange(ch * cw).view(1, 1, ch, cw)
    crop = center_crop(frames, bucket)
    assert tuple(crop.shape[-2:]) == bucket
    # The crop only trims the remainder: the share of the frame kept is set by the ratio mismatch alone.
    kept = bucket[0] * bucket[1] / (ch * cw)
    assert kept >= math.exp(-min(errors)) - 2.0 / min(ch, cw)
    if clip in ((720, 1280), (1280, 720), (1000, 1000)):  # ratios that are in the table lose ~nothing
        assert kept > 0.95


def test_frame_buckets():
    assert frame_buckets_for(24, (8, 16, 32, 48)) == (8, 16, 24)  # num_frames itself is always a bucket
    assert frame_buckets_for(8, ()) == (8,)
    buckets = frame_buckets_for(24, (8, 16))
    assert [frame_bucket(n, buckets) for n in (5, 8, 12, 16, 23, 24, 100)] == [None, 8, 8, 16, 16, 24, 24]


@pytest.mark.parametrize(
    "bad,culprit",
    [
        ({"aspect_ratios": ["16-9"]}, "'16-9'"),
        ({"aspect_ratios": ["0:1"]}, "'0:1'"),
        ({"frame_buckets": [8, 10]}, "[10]"),
    ],
)
def test_bad_bucket_settings_name_the_key(bad, culprit):
    with pytest.raises(ConfigError) as err:
        load_settings(REPO / "params.yaml", overrides={"dit": {"stage2": {"buckets": bad}}})
    assert "dit.stage2.buckets" in str(err.value) and culprit in str(err.value)


# ------------------------------------------------------------------------------------------ batches
def test_every_batch_comes_from_one_bucket_in_proportion_and_deterministically():
    keys = [(4, 1, 6, 10)] * 30 + [(4, 1, 10, 6)] * 10 + [(4, 1, 8, 8)] * 60
    order = np.random.default_rng(0).permutation(len(keys))
    keys = [keys[i] for i in order]
    groups = group_indices(keys)
    assert sorted(len(g) for g in groups) == [10, 30, 60]
    drawn = {}
    for step in range(600):
        picks = draw_batch(groups, np.random.default_rng([7, step]), 5)
        assert len({keys[i] for i in picks}) == 1  # stacks
        drawn[keys[picks[0]]] = drawn.get(keys[picks[0]], 0) + 1
        assert picks == draw_batch(groups, np.random.default_rng([7, step]), 5)  # seeded per step
    # A bucket is chosen in proportion to its size (binomial sd ~ 0.02 at 600 draws).
    assert abs(drawn[(4, 1, 8, 8)] / 600 - 0.6) < 0.08 and abs(drawn[(4, 1, 10, 6)] / 600 - 0.1) < 0.06
    # One bucket: exactly the draws the sampler made before buckets existed.
    single = group_indices([(1,)] * 9)
    assert draw_batch(single, np.random.default_rng(3), 4) == list(np.random.default_rng(3).integers(9, size=4))


@torch.no_grad()
def test_dit_takes_every_bucket_of_a_grid_reshaping_model():
    """Sizes are multiples of VAE x patch x grid, so a motion module with grid_reshape=2 accepts them all."""
    from easyanimate.training.dit import latent_multiple

    vae = SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4)
    model = EasyAnimateTransformer3DModel(hidden_size=32, depth=2, num_heads=2, grid_reshape=2).eval()
    table = BucketTable.build(128, RATIOS, latent_multiple(vae, model.config))
    assert any(h != w for h, w in table.sizes)
    text = torch.randn(1, 3, 384)
    for h, w in table.sizes:
        x = torch.randn(1, 4, 2, h // vae.spatial_compression, w // vae.spatial_compression)
        assert model(x, 10, text).sample.shape == x.shape


# ------------------------------------------------------------------------------------------ DiT training
def _row(clip_id: str, path: str, width: int, height: int, duration: float, caption: str) -> dict:
    return {
        "clip_id": clip_id,
        "source": "bigbuckbunny.mp4",
        "start_s": 0.0,
        "end_s": duration,
        "duration_s": duration,
        "width": width,
        "height": height,
        "fps": 8.0,
        "aesthetic": 5.0,
        "text_area": 0.0,
        "motion": 0.01,
        "caption": caption,
        "status": "accepted",
        "reject_reason": None,
        "clip_path": f"clips/{path}",
        "split": "train",
    }


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """Real Big Buck Bunny clips: a long 16:9 one, a short 16:9 one (12 frames) and a 9:16 crop."""
    from easyanimate.data.video_io import decode_frames, write_video

    root = tmp_path_factory.mktemp("curated")
    frames = decode_frames(SAMPLES / "bigbuckbunny.mp4", times=list(np.arange(0.0, 4.5, 1 / 8)), size=(160, 90))
    write_video(frames[:24], root / "clips" / "wide.mp4", fps=8)
    write_video(frames[24:36], root / "clips" / "short.mp4", fps=8)
    write_video(np.ascontiguousarray(frames[:16, :, 55:105]), root / "clips" / "tall.mp4", fps=8)
    write_manifest(
        to_frame(
            [
                _row("wide", "wide.mp4", 160, 90, 3.0, "a rabbit wakes up"),
                _row("short", "short.mp4", 160, 90, 1.5, "a bird on a branch"),
                _row("tall", "tall.mp4", 50, 90, 2.0, "a tree in the meadow"),
            ]
        ),
        root / "manifest.parquet",
    )
    return root


def _settings(tmp: Path, **stage1):
    return load_settings(
        REPO / "params.yaml",
        preset="tiny",
        overrides={
            "paths": {"cache": str(tmp / "cache")},
            "dit": {
                "model": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                "stage1": {
                    "steps": 4,
                    "batch_size": 2,
                    "resolution": 64,
                    "num_frames": 16,
                    "image_ratio": 0.5,
                    "sample_fps": 8.0,
                    "checkpoint_every": 2,
                    "learning_rate": 1e-3,
                    **stage1,
                },
            },
        },
    )


@pytest.mark.slow
def test_dit_trains_on_non_square_buckets_reproducibly(curated, tmp_path, monkeypatch, one_torch_thread):
    from easyanimate.training import dit as dit_training

    vae_dir = tmp_path / "vae"
    SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(vae_dir)
    settings = _settings(tmp_path)
    shapes: list[tuple[int, ...]] = []
    real_loss = dit_training.diffusion_loss

    def recording_loss(model, scheduler, latents, *args, **kwargs):
        shapes.append(tuple(latents.shape))
        return real_loss(model, scheduler, latents, *args, **kwargs)

    monkeypatch.setattr(dit_training, "diffusion_loss", recording_loss)
    straight = dit_training.train_dit(
        settings, 1, curated, vae_dir, tmp_path / "a", tmp_path / "ca", show_progress=False
    )
    assert len(straight.losses) == 4 and np.isfinite(straight.losses).all()
    assert len(set(shapes)) > 1  # batches change bucket from step to step
    # 16:9 clips train at the wide bucket (latent 6x10 at 64 px), the 9:16 one at the tall bucket: never squares.
    table = BucketTable.build(64, settings.dit.stage1.buckets.aspect_ratios, 16)
    wide, tall = table.nearest(90, 160), table.nearest(90, 50)
    assert wide[1] > wide[0] and tall[0] > tall[1]
    assert all(s[-2:] in {(wide[0] // 8, wide[1] // 8), (tall[0] // 8, tall[1] // 8)} for s in shapes), shapes

    # The cache holds every bucket: images of both sizes; 16-frame windows of the long clips and an 8-frame
    # window of the 12-frame clip (the largest frame bucket it fills) instead of dropping it.
    cache_dirs = list((tmp_path / "cache" / "latents").iterdir())
    assert len(cache_dirs) == 1
    (video_file,) = cache_dirs[0].glob("windows-16*.safetensors")
    videos = {tuple(t.shape[1:]) for t in load_file(str(video_file)).values()}
    assert videos == {(4, 4, 6, 10), (4, 4, 10, 6), (4, 2, 6, 10)}
    images = {tuple(t.shape[1:]) for t in load_file(str(cache_dirs[0] / "windows-1.safetensors")).values()}
    assert images == {(4, 1, 6, 10), (4, 1, 10, 6)}
    # A stage differing only in frame buckets reuses those images but not the video windows.
    sampling = ("train", 64, 8.0, None, table.sizes)
    other = dit_training.LatentCache(tmp_path / "cache" / "latents", vae_dir, curated, sampling, 0, (16,))
    assert other.dir == cache_dirs[0] and other.has({1}) and not other.has({16})

    # Batches are seeded per step: stopping after 2 steps and resuming gives the same weights, from the cache.
    monkeypatch.setattr(
        dit_training,
        "load_clip_frames",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again despite the cache")),
    )
    dit_training.train_dit(
        _settings(tmp_path, steps=2), 1, curated, vae_dir, tmp_path / "b", tmp_path / "cb", show_progress=False
    )
    resumed = dit_training.train_dit(
        settings, 1, curated, vae_dir, tmp_path / "b", tmp_path / "cb", show_progress=False
    )
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Other bucket geometry, other cache entry: a square-crop run does not read the bucketed latents.
    monkeypatch.undo()
    square = _settings(tmp_path, steps=1, buckets={"enabled": False})
    dit_training.train_dit(square, 1, curated, vae_dir, tmp_path / "c", tmp_path / "cc", show_progress=False)
    (new,) = set((tmp_path / "cache" / "latents").iterdir()) - set(cache_dirs)
    squares = {tuple(t.shape[1:]) for t in load_file(str(new / "windows-1.safetensors")).values()}
    assert squares == {(4, 1, 8, 8)}
