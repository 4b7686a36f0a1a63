"""Tests for the Slice VAE (causal 3D video VAE with sliced encode/decode)."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from easyanimate.models.vae import SliceVAE
from easyanimate.models.vae.slice_vae import CausalConv3d

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
