"""Tests for the Slice VAE (causal 3D video VAE with sliced encode/decode)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from easyanimate.models.vae import SliceVAE
from easyanimate.models.vae.slice_vae import CausalConv3d, FrameGroupNorm, _blend_into, _tile_spans, _TileGrid

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_groups=4, latent_channels=4)


def make_vae(**overrides) -> SliceVAE:
    torch.manual_seed(0)
    return SliceVAE(**{**TINY, **overrides}).eval()


def clip(t: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, size, size, generator=g) * 2 - 1


def assert_no_cache_left(vae: SliceVAE) -> None:
    for m in vae.modules():
        if isinstance(m, CausalConv3d):
            assert m._cache is None and not m._cache_enabled


def test_geometry_and_submodules():
    vae = make_vae()
    assert vae.spatial_compression == 8 and vae.temporal_compression == 4
    assert SliceVAE(block_out_channels=(8, 8, 8), norm_groups=4).spatial_compression == 4
    for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        assert isinstance(getattr(vae, name), torch.nn.Module)
    assert vae.quant_conv.out_channels == 2 * vae.config.latent_channels
    assert [SliceVAE.latent_num_frames(t) for t in (1, 8, 12, 16)] == [1, 2, 3, 4]


@pytest.mark.parametrize("t,lt", [(1, 1), (8, 2), (12, 3), (16, 4)])
def test_shapes_round_trip(t, lt):
    vae = make_vae()
    with torch.no_grad():
        out = vae.encode(clip(t))
        assert isinstance(out, AutoencoderKLOutput)
        assert isinstance(out.latent_dist, DiagonalGaussianDistribution)
        z = out.latent_dist.mode()
        assert z.shape == (1, 4, lt, 4, 4)
        dec = vae.decode(z)
        assert isinstance(dec, DecoderOutput)
        assert dec.sample.shape == (1, 3, t, 32, 32)
        assert torch.isfinite(dec.sample).all()
    assert_no_cache_left(vae)


@pytest.mark.parametrize("t", [0, 2, 3, 4, 5, 6, 7, 9, 10, 13])
def test_invalid_frame_counts(t):
    with pytest.raises(ValueError, match="num_frames"):
        SliceVAE.check_num_frames(t)
    if t > 0:
        with pytest.raises(ValueError, match="num_frames"):
            make_vae().encode(clip(t))


def test_invalid_inputs():
    vae = make_vae()
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 8, 36, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 32, 20))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        vae.encode(torch.zeros(3, 8, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="encoder_slice_frames"):
        SliceVAE(encoder_slice_frames=6)


@pytest.mark.parametrize("use_slicing", [False, True])
def test_encoder_is_causal(use_slicing):
    # Latent k sees input frames <= 4k + 3 only.
    vae = make_vae()
    x = clip(16)
    with torch.no_grad():
        ref = vae.encode(x, use_slicing=use_slicing).latent_dist.parameters
        for t in (4, 9, 15):
            x2 = x.clone()
            x2[:, :, t] += 0.5
            new = vae.encode(x2, use_slicing=use_slicing).latent_dist.parameters
            first_dependent = t // 4
            torch.testing.assert_close(new[:, :, :first_dependent], ref[:, :, :first_dependent], rtol=0, atol=0)
            # ...and the frame is actually encoded (the clip's last frames are not dropped).
            assert (new[:, :, first_dependent] - ref[:, :, first_dependent]).abs().max() > 1e-4


@pytest.mark.parametrize("use_slicing", [False, True])
def test_decoder_is_causal(use_slicing):
    # Output frames before 4k never depend on latent k.
    vae = make_vae()
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z, use_slicing=use_slicing).sample
        for k in (1, 2, 3):
            z2 = z.clone()
            z2[:, :, k] += 1.0
            new = vae.decode(z2, use_slicing=use_slicing).sample
            torch.testing.assert_close(new[:, :, : 4 * k], ref[:, :, : 4 * k], rtol=0, atol=0)
            assert (new[:, :, 4 * k] - ref[:, :, 4 * k]).abs().max() > 1e-4


@pytest.mark.parametrize("enc_slice,dec_slice", [(8, 2), (4, 1), (16, 4)])
def test_sliced_matches_unsliced(enc_slice, dec_slice):
    # T=24 -> 6 latents; (16, 4) leaves shorter tail slices on both sides.
    vae = make_vae(encoder_slice_frames=enc_slice, decoder_slice_latents=dec_slice)
    x = clip(24)
    with torch.no_grad():
        full = vae.encode(x, use_slicing=False).latent_dist.parameters
        sliced = vae.encode(x, use_slicing=True).latent_dist.parameters
        assert sliced.shape == (1, 8, 6, 4, 4)
        torch.testing.assert_close(sliced, full, rtol=0, atol=1e-5)
        z = full[:, :4]
        full_dec = vae.decode(z, use_slicing=False).sample
        sliced_dec = vae.decode(z, use_slicing=True).sample
        assert sliced_dec.shape == (1, 3, 24, 32, 32)
        torch.testing.assert_close(sliced_dec, full_dec, rtol=0, atol=1e-5)
    assert_no_cache_left(vae)


def test_image_vs_video_decided_from_full_latent():
    # A 1-latent tail slice of a video must still upsample in time; a lone latent is an image.
    vae = make_vae(decoder_slice_latents=2)
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert vae.decode(z).sample.shape[2] == 12
        torch.testing.assert_close(vae.decode(z).sample, vae.decode(z, use_slicing=False).sample, rtol=0, atol=1e-5)
        assert vae.decode(z[:, :, :1]).sample.shape[2] == 1


def test_posterior_mode_sample_and_forward():
    vae = make_vae()
    x = clip(8)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        s1 = dist.sample(generator=torch.Generator().manual_seed(7))
        s2 = dist.sample(generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        assert s1.shape == dist.mode().shape == (1, 4, 2, 4, 4)
        assert not torch.equal(s1, dist.mode())
        out = vae(x, sample_posterior=False)
        assert isinstance(out, DecoderOutput) and out.sample.shape == x.shape
        torch.testing.assert_close(out.sample, vae.decode(dist.mode()).sample, rtol=0, atol=1e-6)
        (tup,) = vae(x, generator=torch.Generator().manual_seed(7), return_dict=False)
        assert tup.shape == x.shape
        (post,) = vae.encode(x, return_dict=False)
        assert isinstance(post, DiagonalGaussianDistribution)


def test_save_load_round_trip(tmp_path):
    vae = make_vae(encoder_slice_frames=4, decoder_slice_latents=1)
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SliceVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_slice_frames == 4
    assert tuple(loaded.config.block_out_channels) == (8, 16, 16, 16)
    x = clip(8)
    with torch.no_grad():
        a = vae(x, sample_posterior=False).sample
        b = loaded(x, sample_posterior=False).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _grads(vae: SliceVAE, x: torch.Tensor, use_slicing: bool) -> dict[str, torch.Tensor]:
    vae.zero_grad(set_to_none=True)
    z = vae.encode(x, use_slicing=use_slicing).latent_dist.mode()
    vae.decode(z, use_slicing=use_slicing).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in vae.named_parameters()}


def test_gradient_checkpointing_with_slicing():
    vae = make_vae(encoder_slice_frames=4, decoder_slice_latents=1).train()
    x = clip(8, size=16)
    ref = _grads(vae, x, use_slicing=False)
    vae.enable_gradient_checkpointing()
    assert vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    for use_slicing in (True, False):
        got = _grads(vae, x, use_slicing=use_slicing)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert_no_cache_left(vae)


# ------------------------------------------------------------------------------------------ spatial tiling
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.mark.parametrize("length,tile,overlap", [(24, 8, 2), (15, 8, 2), (17, 4, 1), (9, 4, 2), (8, 8, 2), (5, 8, 2)])
def test_tile_spans_cover_evenly_with_full_tiles(length, tile, overlap):
    spans = _tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(e - s == min(tile, length) for s, e in spans)  # no small remainder tile
    assert all(prev_end - start >= overlap for (_, prev_end), (start, _) in zip(spans, spans[1:]))


def test_tile_grid_blend_is_normalised_and_ramps_across_seams():
    grid = _TileGrid(11, 17, tile=6, overlap=2)
    assert (len(grid.rows), len(grid.cols)) == (3, 4)  # 11 -> [0,6) [3,9) [5,11): a triple overlap at row 5
    for scale in (1, 8):
        alphas = grid.alphas(scale)
        full = torch.randn(2, 3, 11 * scale, 17 * scale, dtype=torch.float64)
        # Tiles that are exact crops of one field blend back to that field, whatever the overlaps.
        out = torch.zeros_like(full)
        consts = torch.zeros_like(full)
        for i, j, ys, xs in grid:
            region = (..., slice(ys.start * scale, ys.stop * scale), slice(xs.start * scale, xs.stop * scale))
            _blend_into(out[region], full[region], alphas[i, j])
            # Tiles that disagree (a constant per tile) must meet through ramps, not steps.
            _blend_into(consts[region], torch.full_like(full[region], 4.0 * i + j), alphas[i, j])
        torch.testing.assert_close(out, full, rtol=0, atol=1e-12)
        # Neighbouring tiles differ by 1 (columns) or 4 (rows); the smallest overlap spreads that over 2*scale px.
        assert consts.diff(dim=-1).abs().max() <= 1.0 / (2 * scale) + 1e-9
        # Row 5 is in tiles 0, 1 and 2 at once: tiles 0 and 2 (8 apart) meet there inside the ramps of tile 1
        # (3 and 4 rows): still a ramp, where a step would be 4 or 8 in one pixel.
        assert consts.diff(dim=-2).abs().max() <= 8.0 / (2 * scale) + 1e-9
    assert alphas[0, 0] is None  # the first tile is written, not blended


def test_tiling_settings_and_save_load(tmp_path):
    vae = make_vae(tile_sample_size=32, tile_overlap_factor=0.5)
    assert not vae.use_tiling and vae.tile_sample_min_size == 32 and vae.tile_latent_min_size == 4
    vae.enable_tiling()
    assert vae.use_tiling
    vae.disable_tiling()
    assert not vae.use_tiling
    vae.save_pretrained(tmp_path)
    loaded = SliceVAE.from_pretrained(tmp_path)
    assert (loaded.config.tile_sample_size, loaded.config.tile_overlap_factor) == (32, 0.5)
    assert not loaded.use_tiling  # a runtime choice, never saved on
    with pytest.raises(ValueError, match="tile_sample_size"):
        make_vae(tile_sample_size=36)
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        make_vae(tile_overlap_factor=0.75)
    # Models saved before tiling existed have no tile keys: defaults apply.
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tile_sample_size"], config["tile_overlap_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert SliceVAE.from_pretrained(tmp_path).tile_sample_min_size == 256


@pytest.fixture(scope="module")
def bunny_128x192() -> torch.Tensor:
    from easyanimate.data.video_io import decode_frames

    frames = decode_frames(SAMPLES / "bigbuckbunny.mp4", times=[2.0 + k / 8 for k in range(8)], size=(192, 128))
    return torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)


def _worst_extra_step(tiled: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest step between neighbouring pixels (per row/column, averaged over the rest) that ``tiled`` has
    beyond ``ref``'s: a visible seam is a line of such steps."""
    worst = 0.0
    for dim in (-1, -2):
        dims = [d for d in range(5) if d != dim % 5]
        steps = [y.clamp(-1, 1).diff(dim=dim).abs().mean(dim=dims) for y in (tiled, ref)]
        worst = max(worst, (steps[0] - steps[1]).max().item())
    return worst


def _tiled_round_trip(vae: SliceVAE, x: torch.Tensor, overlap: float) -> torch.Tensor:
    vae.tile_overlap_factor = overlap
    vae.enable_tiling()
    try:
        return vae.decode(vae.encode(x).latent_dist.mode()).sample
    finally:
        vae.disable_tiling()


@torch.no_grad()
def test_tiled_matches_untiled_without_seams_on_real_frames(bunny_128x192, monkeypatch):
    x = bunny_128x192  # 8 frames, 128x192: 64 px tiles (0.25 overlap) make a 3x4 grid with uneven overlaps
    vae = make_vae(tile_sample_size=64)
    ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
    blended, hard = (_tiled_round_trip(vae, x, f) for f in (0.25, 0.0))
    assert blended.shape == hard.shape == x.shape
    # Seams: hard tiles leave steps at tile borders; blended tiles must add far smaller steps anywhere
    # (measured 0.087 vs 0.240; the untiled output's mean step is 0.075).
    assert _worst_extra_step(blended, ref) < 0.5 * _worst_extra_step(hard, ref)
    # Closeness: tiles see zero padding instead of neighbours, and their per-frame GroupNorm statistics are the
    # tile's. The statistics dominate (random weights amplify them: measured mean |diff| 0.19, std of ref 0.25),
    # so closeness is tested with normalisation that has no statistics (a fixed per-channel affine), where only
    # the tile borders' missing context differs. Measured over 3 seeds, mean |diff| / std(ref): blended 1.2-2.6%,
    # hard 3.8-8.4%; max |diff| / std(ref): blended 0.13-0.31, hard 0.72-1.6.
    monkeypatch.setattr(
        FrameGroupNorm, "forward", lambda self, h: h * self.weight.view(-1, 1, 1, 1) + self.bias.view(-1, 1, 1, 1)
    )
    ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
    blended, hard = ((_tiled_round_trip(vae, x, f) - ref).abs() for f in (0.25, 0.0))
    assert blended.mean() < 0.5 * hard.mean() and blended.max() < 0.5 * hard.max()
    assert blended.mean() < 0.04 * ref.std()
    assert_no_cache_left(vae)


@pytest.mark.parametrize("frames,height,width", [(1, 40, 72), (12, 40, 56)])
def test_tiled_shapes_and_streamed_reconstruction(frames, height, width):
    # Sizes that are not multiples of the 32 px tile; 4-frame / 1-latent slices so every tile runs several slices.
    vae = make_vae(tile_sample_size=32, encoder_slice_frames=4, decoder_slice_latents=1)
    with torch.no_grad():
        # Keep decoded values inside [-1, 1] so clamping (per tile in the uint8 path) does not differ from
        # clamping after the float blend.
        vae.decoder.conv_out.weight.mul_(0.1)
        vae.decoder.conv_out.bias.zero_()
    vae.enable_tiling()
    video = (torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    x = video.float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 4, SliceVAE.latent_num_frames(frames), height // 8, width // 8)
        y = vae.decode(z).sample
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert y.abs().max() < 1
    seen = []
    out = vae.reconstruct_video(video.numpy(), callback=lambda done, total: seen.append((done, total)))
    grid = _TileGrid(height // 8, width // 8, 4, 1)
    slices = -(-frames // 4) + SliceVAE.latent_num_frames(frames)
    assert len(grid) > 1 and seen[-1] == (len(grid) * slices, len(grid) * slices)
    ref = y[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    # Blending reads earlier tiles back as uint8: at most one level off the float blend.
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert_no_cache_left(vae)


def test_tiled_training_step_has_gradients():
    vae = make_vae(tile_sample_size=16, tile_overlap_factor=0.5).train()
    vae.enable_tiling()
    x = clip(8, size=24).requires_grad_()  # 2x2 tiles of 2 latents, overlapping by 1
    vae(x, sample_posterior=False).sample.square().mean().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in vae.parameters())


def test_cli_vae_reconstruct_with_tiles(tmp_path):
    from typer.testing import CliRunner

    from easyanimate.cli import app
    from easyanimate.data.video_io import probe

    make_vae(tile_sample_size=24).save_pretrained(tmp_path / "vae")
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
            "8",
            "--size",
            "32",
            "--tile",
        ],
    )
    assert result.exit_code == 0, result.output
    # 32x56 frames (16:9, cropped to multiples of 8) in 2x3 tiles of 24 px, 1 encoder + 1 decoder slice each.
    assert "12/12 slices" in result.output
    info = probe(out)
    assert (info.num_frames, info.height, info.width) == (8, 32, 56)


@pytest.mark.parametrize("motion", [False, True])
def test_pixel_shortcut_alone_is_a_block_mean_codec_and_keeps_slicing_exact(motion):
    """With the learned branches silenced the shortcut VAE is exactly block means + bilinear/hold upsampling (plus,
    with motion, each cell's luminance ramp over its 4 frames); with them live, slicing and causality still hold."""
    from easyanimate.models.vae.slice_vae import _block_means, _block_slopes, _expand_means, _expand_slopes

    torch.manual_seed(0)
    vae = SliceVAE(
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        norm_groups=4,
        pixel_shortcut=True,
        pixel_shortcut_motion=motion,
        encoder_slice_frames=4,
        decoder_slice_latents=1,
    ).eval()
    x = torch.rand(1, 3, 12, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        live = vae.decode(z).sample
        assert torch.allclose(live, vae.decode(z, use_slicing=False).sample, atol=1e-5)
        assert torch.allclose(z, vae.encode(x, use_slicing=False).latent_dist.mode(), atol=1e-5)
        later = x.clone()
        later[:, :, 8:] = 0  # frames of latent 2 only
        assert torch.allclose(vae.encode(later).latent_dist.mode()[:, :, :2], z[:, :, :2], atol=1e-5)
        assert torch.allclose(vae.decode(z[:, :, :2]).sample, live[:, :, :8], atol=1e-5)
        for conv in (vae.quant_conv, vae.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
        z = vae.encode(x).latent_dist.mode()
        means = _block_means(x, 8)
        assert torch.allclose(z[:, :3], means, atol=1e-6)
        expected = _expand_means(means, 8, is_image=False)
        if motion:
            slopes = _block_slopes(x, 8)
            assert torch.allclose(z[:, 3:], slopes, atol=1e-6)
            expected = expected + _expand_slopes(slopes, 8, is_image=False)
        else:
            assert torch.count_nonzero(z[:, 3:]) == 0
        assert torch.allclose(vae.decode(z).sample, expected, atol=1e-5)
        image = x[:, :, :1]
        zi = vae.encode(image).latent_dist.mode()
        assert torch.count_nonzero(zi[:, 3:]) == 0  # one frame has no slope
        assert torch.allclose(vae.decode(zi).sample, _expand_means(_block_means(image, 8), 8, is_image=True), atol=1e-6)
    with pytest.raises(ValueError, match="latent_channels"):
        SliceVAE(latent_channels=2, pixel_shortcut=True)
    with pytest.raises(ValueError, match="pixel_shortcut_motion"):
        SliceVAE(latent_channels=3, pixel_shortcut=True, pixel_shortcut_motion=True)


def test_motion_shortcut_codes_a_brightness_ramp_exactly():
    """A cell that brightens linearly over its 4 frames is coded by its mean and slope alone (no learned part)."""
    from easyanimate.models.vae.slice_vae import _block_slopes, _expand_slopes

    ramp = torch.linspace(-0.6, 0.6, 4).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8)
    video = ramp.repeat(1, 1, 2, 1, 1)  # two latent frames, same ramp
    slopes = _block_slopes(video, 8)
    assert slopes.shape == (1, 1, 2, 1, 1)
    assert torch.allclose(_expand_slopes(slopes, 8, is_image=False).expand_as(video), video, atol=1e-6)


def test_latent_space_id_follows_the_encoder_side_only():
    """Same encoder weights, config and scaling factor -> same latents -> same id; decoder and slicing don't count."""
    torch.manual_seed(0)
    vae = SliceVAE(latent_channels=4, block_out_channels=(8, 8, 16, 16), norm_groups=4)
    base = vae.latent_space_id()
    torch.manual_seed(0)
    assert (
        SliceVAE(
            latent_channels=4,
            block_out_channels=(8, 8, 16, 16),
            norm_groups=4,
            encoder_slice_frames=4,
            decoder_slice_latents=1,
        ).latent_space_id()
        == base
    )
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # stage 2 fine-tunes the decoder: latents unchanged
        assert vae.latent_space_id() == base
        vae.encoder.conv_in.bias.add_(1e-3)
    moved = vae.latent_space_id()
    assert moved != base
    vae.register_to_config(scaling_factor=0.5)
    assert vae.latent_space_id() not in (base, moved)
