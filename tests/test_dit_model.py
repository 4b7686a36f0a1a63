"""EasyAnimateTransformer3DModel: shapes, zero-init insertions, motion module, LoRA, serialization."""

import pytest
import torch
from peft import LoraConfig

from easyanimate.models.dit import EasyAnimateTransformer3DModel

TINY = dict(in_channels=4, patch_size=2, hidden_size=64, depth=4, num_heads=4, text_embed_dim=384)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return EasyAnimateTransformer3DModel(**{**TINY, **overrides}).eval()


def _perturb(model, seed=1, skip=()):
    """Random non-zero weights everywhere (so zero-init layers no longer hide anything), except `skip` names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(b=2, t=2, h=8, w=8, seed=0, length=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, t, h, w, generator=g)
    text = torch.randn(b, length, 384, generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return x, torch.tensor([10, 700])[:b], text, mask


@torch.no_grad()
@pytest.mark.parametrize("t,h,w", [(1, 8, 8), (2, 8, 8), (4, 8, 8), (2, 8, 12), (1, 12, 4)])
def test_output_shape(t, h, w):
    model = _perturb(_model())
    x, ts, text, mask = _inputs(t=t, h=h, w=w)
    out = model(x, ts, text, mask).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert model(x, ts, text, mask, return_dict=False)[0].shape == x.shape


@torch.no_grad()
def test_scalar_timestep_and_no_mask():
    model = _perturb(_model())
    x, _, text, _ = _inputs()
    a = model(x, 500, text).sample
    b = model(x, torch.tensor([500, 500]), text).sample
    torch.testing.assert_close(a, b)


@torch.no_grad()
@pytest.mark.parametrize("t", [1, 4])
def test_motion_module_insertion_is_noop(t):
    image_dit = _perturb(_model(motion_module=False))
    video_dit = _model(seed=5, motion_module=True)
    missing, unexpected = video_dit.load_state_dict(image_dit.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".motion_module." in k for k in missing)
    x, ts, text, mask = _inputs(t=t)
    torch.testing.assert_close(video_dit(x, ts, text, mask).sample, image_dit(x, ts, text, mask).sample)


@torch.no_grad()
def test_long_skip_insertion_is_noop():
    plain = _perturb(_model(long_skips=False))
    uvit = _model(seed=5, long_skips=True)
    missing, unexpected = uvit.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("skip_linears.") for k in missing)
    x, ts, text, mask = _inputs()
    torch.testing.assert_close(uvit(x, ts, text, mask).sample, plain(x, ts, text, mask).sample)
    _perturb(uvit, seed=3)  # once trained, the skips matter
    assert not torch.allclose(uvit(x, ts, text, mask).sample, plain(x, ts, text, mask).sample)


@torch.no_grad()
def test_motion_module_mixes_frames_only_when_present():
    x, ts, text, mask = _inputs(t=4)
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change the last frame only
    for motion, should_change in [(True, True), (False, False)]:
        model = _perturb(_model(motion_module=motion))
        a, b = model(x, ts, text, mask).sample, model(x2, ts, text, mask).sample
        assert torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6) != should_change


@torch.no_grad()
def test_grid_reshape():
    x, ts, text, mask = _inputs(t=2, h=8, w=8)  # token grid 4x4
    base = _perturb(_model(grid_reshape=1))
    grid = _model(grid_reshape=2)
    grid.load_state_dict(base.state_dict())
    out = grid(x, ts, text, mask).sample
    assert out.shape == x.shape
    assert not torch.allclose(out, base(x, ts, text, mask).sample)  # tokens now attend across 2x2 grids
    img = grid(*_inputs(t=1, h=8, w=8)[:1], ts, text, mask).sample
    assert img.shape == (2, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="grid_reshape=2"):
        grid(*_inputs(t=2, h=6, w=8)[:1], ts, text, mask)  # token grid 3x4


@torch.no_grad()
def test_bad_patch_size_and_too_many_frames():
    model = _model(max_frames_latent=2)
    x, ts, text, mask = _inputs(t=4)
    with pytest.raises(ValueError, match="max_frames_latent"):
        model(x, ts, text, mask)
    with pytest.raises(ValueError, match="patch_size"):
        model(_inputs(t=1, h=7, w=8)[0], ts, text, mask)


@torch.no_grad()
def test_text_conditioning_and_mask():
    model = _perturb(_model())
    x, ts, text, mask = _inputs()
    ref = model(x, ts, text, mask).sample
    assert not torch.allclose(model(x, ts, torch.randn_like(text), mask).sample, ref)
    # Masked-out tokens (second half of the last sample) must not matter.
    text2 = text.clone()
    text2[-1, text.shape[1] // 2 :] = 100.0
    torch.testing.assert_close(model(x, ts, text2, mask).sample, ref)
    # A fully masked row stays finite.
    assert torch.isfinite(model(x, ts, text, torch.zeros_like(mask)).sample).all()


@torch.no_grad()
def test_timestep_conditioning():
    model = _perturb(_model())
    x, _, text, mask = _inputs()
    assert not torch.allclose(model(x, 1, text, mask).sample, model(x, 900, text, mask).sample)


def test_motion_parameters_are_the_temporal_attention():
    model = _model()
    motion = {id(p) for p in model.motion_parameters()}
    expected = {id(p) for n, p in model.named_parameters() if ".motion_module." in n}
    assert motion == expected and len(motion) > 0
    names = {n for n, p in model.named_parameters() if id(p) in motion}
    assert any("motion_module.attn.to_q" in n for n in names)
    assert list(_model(motion_module=False).motion_parameters()) == []
    # zero-initialised output projection
    for block in model.blocks:
        assert block.motion_module.attn.to_out[0].weight.abs().sum() == 0


def test_gradient_checkpointing_matches():
    x, ts, text, mask = _inputs()
    grads = []
    for ckpt in (False, True):
        model = _perturb(_model()).train()
        if ckpt:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        model(x, ts, text, mask).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = _perturb(_model(grid_reshape=2, max_frames_latent=16))
    model.save_pretrained(tmp_path)
    loaded = EasyAnimateTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.grid_reshape == 2 and loaded.config.max_frames_latent == 16
    x, ts, text, mask = _inputs()
    torch.testing.assert_close(loaded(x, ts, text, mask).sample, model(x, ts, text, mask).sample)


@torch.no_grad()
def test_peft_lora_attaches():
    model = _perturb(_model())
    x, ts, text, mask = _inputs()
    ref = model(x, ts, text, mask).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    # 4 projections x (spatial, cross, temporal) attention x 4 blocks x (A, B)
    assert len(lora) == 4 * 3 * 4 * 2
    torch.testing.assert_close(model(x, ts, text, mask).sample, ref)  # lora_B starts at zero
