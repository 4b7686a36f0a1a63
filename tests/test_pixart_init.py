"""dit.init_from: the video DiT initialised from a diffusers PixArtTransformer2DModel equals PixArt.

Everything is tiny and random, built from configs (no downloads): a PixArt transformer and a T5 encoder with
its tokenizer are saved to folders and loaded back the way stage 1 loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate.config import load_settings
from easyanimate.models.dit.pixart import NEW_MODULES, init_from_pixart
from easyanimate.models.text_encoder import encode_prompts, load_text_encoder
from easyanimate.training.dit import build_transformer, pixart_init_source
from tests.conftest import REPO

HEADS, HEAD_DIM, DEPTH, T5_DIM, MAX_TOKENS = 2, 12, 4, 12, 8
WORDS = "a the rabbit wakes up bird on branch tree in meadow red car snowy mountain sunset".split()
PROMPTS = ["a rabbit wakes up", "a bird on a branch", ""]


def save_tiny_t5(folder: Path) -> Path:
    """A random T5 encoder (config only) with a small Unigram tokenizer, in transformers' folder layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in WORDS]
    tok = Tokenizer(models.Unigram([(w, -1.0 - i / 10) for i, w in enumerate(vocab)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=T5_DIM, d_kv=6, num_heads=2, d_ff=24, num_layers=1)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_pixart(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random PixArt-alpha-style transformer (learned sigma: out_channels = 2 x in_channels)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    kwargs = dict(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=DEPTH,
        cross_attention_dim=HEADS * HEAD_DIM,
        sample_size=8,
        patch_size=2,
        caption_channels=T5_DIM,
        use_additional_conditions=False,
    )
    model = PixArtTransformer2DModel(**{**kwargs, **overrides}).eval()
    model.save_pretrained(folder)
    return folder


def settings_for(tmp: Path, pixart: Path | None = None, t5: Path | None = None, **model):
    """Tiny-preset settings whose dit.model matches the tiny PixArt above (sample_size 8 = 64 px / 8)."""
    dit_model = {
        "hidden_size": HEADS * HEAD_DIM,
        "depth": DEPTH,
        "num_heads": HEADS,
        "max_text_tokens": MAX_TOKENS,
        "base_resolution": 64,
        "pos_embed_order": "wh",
        **model,
    }
    overrides = {
        "paths": {"cache": str(tmp / "cache")},
        "dit": {
            "model": dit_model,
            "init_from": str(pixart) if pixart else None,
            "stage1": {
                "steps": 2,
                "batch_size": 2,
                "resolution": 64,
                "checkpoint_every": 2,
                "buckets": {"enabled": False},
            },
        },
    }
    if t5 is not None:
        overrides["weights"] = {"text_encoder": str(t5)}
    return load_settings(REPO / "params.yaml", preset="tiny", overrides=overrides)


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def text(t5):
    tokenizer, encoder = load_text_encoder(t5)
    hidden, mask = encode_prompts(tokenizer, encoder, PROMPTS, MAX_TOKENS)
    assert mask[0].sum() < MAX_TOKENS  # padding is masked, so the mask path is exercised
    return hidden, mask


def pixart_reference(folder: Path, x: torch.Tensor, t: torch.Tensor, hidden, mask) -> torch.Tensor:
    """PixArt on every frame of x (B, C, T, h, w) as a batch of images; epsilon channels only (as its pipeline)."""
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel.from_pretrained(folder).eval()
    b, c, frames, h, w = x.shape
    images = x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
    cond = None
    if pixart.use_additional_conditions:  # what PixArtAlphaPipeline passes: pixel size and aspect ratio
        cond = {
            "resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b * frames, 1),
            "aspect_ratio": torch.tensor([[h / w]]).repeat(b * frames, 1),
        }
    out = pixart(
        images,
        encoder_hidden_states=hidden.repeat_interleave(frames, 0),
        timestep=t.repeat_interleave(frames),
        encoder_attention_mask=mask.repeat_interleave(frames, 0),
        added_cond_kwargs=cond,
    ).sample[:, :c]
    return out.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)


ALPHA_512 = {}  # sample_size != 128: no micro-conditions, interpolation_scale 1 (PixArt-XL-2-512x512 style)
ALPHA_1024 = {"use_additional_conditions": True, "interpolation_scale": 2}  # PixArt-XL-2-1024-MS style


@torch.no_grad()
@pytest.mark.parametrize(
    "pixart_kwargs,model_kwargs",
    [(ALPHA_512, {}), (ALPHA_1024, {"use_additional_conditions": True, "interpolation_scale": 2.0})],
    ids=["alpha512", "alpha1024"],
)
def test_fresh_video_dit_equals_pixart_on_images_and_every_frame(tmp_path, text, pixart_kwargs, model_kwargs):
    folder = save_tiny_pixart(tmp_path / "pixart", **pixart_kwargs)
    settings = settings_for(tmp_path, folder, **model_kwargs)
    torch.manual_seed(123)  # a different seed from PixArt's: nothing matches unless it is loaded
    model = build_transformer(settings, 4, T5_DIM).eval()
    report = init_from_pixart(model, folder)

    hidden, mask = text
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([5, 400, 999])
    # Images (T = 1) and videos (T = 3; the motion module must leave every frame as PixArt has it), square and not.
    for frames, h, w in [(1, 8, 8), (1, 8, 12), (3, 8, 8), (3, 12, 8)]:
        x = torch.randn(3, 4, frames, h, w, generator=g)
        ours = model(x, t, hidden, encoder_attention_mask=mask).sample
        ref = pixart_reference(folder, x, t, hidden, mask)
        assert ref.abs().max() > 0.5  # a real signal, not two zero predictors agreeing
        torch.testing.assert_close(ours, ref, atol=5e-6, rtol=1e-6)  # measured: <= 6e-7

    # The equality holds with the motion module and the long skips present (as no-ops), not by leaving them out.
    assert model.skip_linears is not None and all(b.motion_module is not None for b in model.blocks)
    assert report.new and all(any(rx.match(k) for rx in NEW_MODULES.values()) for k in report.new)


def test_key_map_report_accounts_for_every_key(tmp_path):
    from diffusers import PixArtTransformer2DModel

    folder = save_tiny_pixart(tmp_path / "pixart")
    model = build_transformer(settings_for(tmp_path, folder), 4, T5_DIM)
    report = init_from_pixart(model, folder)
    pixart_keys = set(PixArtTransformer2DModel.from_pretrained(folder).state_dict())
    ours = set(model.state_dict())
    assert set(report.loaded) == pixart_keys  # every PixArt key consumed
    assert set(report.loaded.values()) | set(report.new) == ours  # every video-DiT key loaded or new
    assert not set(report.loaded.values()) & set(report.new)
    summary = report.summary()
    assert summary["loaded"] == len(pixart_keys) and summary["new"] == len(ours) - len(pixart_keys)
    assert set(summary["new_by_module"]) == {"motion_module", "long_skips"}
    assert set(summary["transformed"]) == {"proj_out.weight", "proj_out.bias"}  # learned sigma dropped
    assert report.loaded["adaln_single.linear.weight"] == "t_block.1.weight"
    assert report.loaded["transformer_blocks.3.ff.net.0.proj.weight"] == "blocks.3.ff.net.0.weight"
    json.loads(report.to_json())
    # The new modules are no-ops: zero output projections.
    for key in report.new:
        if key.endswith("to_out.0.weight") or key.startswith("skip_linears."):
            assert model.state_dict()[key].abs().max() == 0, key


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    folder = save_tiny_pixart(tmp_path / "pixart")
    model = build_transformer(settings_for(tmp_path, folder), 4, T5_DIM + 4)  # another text encoder width
    with pytest.raises(ValueError) as err:
        init_from_pixart(model, folder)
    msg = str(err.value)
    assert "caption_projection.linear_1.weight (24, 12)" in msg and "caption_projection.0.weight (24, 16)" in msg


@pytest.mark.parametrize(
    "model_kwargs,needle",
    [
        ({"pos_embed_order": "hw"}, "pos_embed_order"),
        ({"depth": 2}, "transformer_blocks.2"),
        ({"num_heads": 4}, "num_heads"),
    ],
)
def test_settings_pixart_cannot_match_are_errors(tmp_path, model_kwargs, needle):
    folder = save_tiny_pixart(tmp_path / "pixart")
    model = build_transformer(settings_for(tmp_path, folder, **model_kwargs), 4, T5_DIM)
    with pytest.raises(ValueError, match=needle):
        init_from_pixart(model, folder)


def test_not_a_pixart_folder(tmp_path, t5):
    model = build_transformer(settings_for(tmp_path), 4, T5_DIM)
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        init_from_pixart(model, t5)


def test_init_from_applies_to_a_fresh_stage1_only(tmp_path, t5):
    folder = save_tiny_pixart(tmp_path / "pixart")
    settings = settings_for(tmp_path, folder, t5)
    ckpt = tmp_path / "ckpt"
    assert pixart_init_source(settings, 1, None, ckpt) == (folder, None)
    assert pixart_init_source(settings, 2, None, ckpt) == (None, None)
    assert pixart_init_source(settings_for(tmp_path), 1, None, ckpt) == (None, None)
    assert pixart_init_source(settings, 1, tmp_path / "warm", ckpt)[1].startswith("warm start")
    (ckpt / "checkpoint-0000002").mkdir(parents=True)
    (ckpt / "checkpoint-0000002" / "trainer_state.json").write_text('{"step": 2, "losses": [1, 1]}')
    folder_, reason = pixart_init_source(settings, 1, None, ckpt)
    assert folder_ is None and reason.startswith("resuming")


def test_wrong_text_encoder_or_folder_fails_before_any_work(tmp_path, t5):
    folder = save_tiny_pixart(tmp_path / "pixart", caption_channels=T5_DIM + 4)
    with pytest.raises(ValueError, match=r"dit\.init_from.*16-wide.*weights\.text_encoder"):
        pixart_init_source(settings_for(tmp_path, folder, t5), 1, None, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"dit\.init_from.*PixArtTransformer2DModel"):
        pixart_init_source(settings_for(tmp_path, t5, t5), 1, None, tmp_path / "ckpt")


def test_missing_folder_names_the_setting(tmp_path):
    settings = settings_for(tmp_path, tmp_path / "no_such_pixart")
    with pytest.raises(FileNotFoundError, match=r"dit\.init_from.*no_such_pixart"):
        pixart_init_source(settings, 1, None, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """Two real Big Buck Bunny clips, curated."""
    from easyanimate.data.manifest import to_frame, write_manifest
    from easyanimate.data.video_io import decode_frames, write_video
    from tests.conftest import SAMPLES
    from tests.test_buckets import _row

    root = tmp_path_factory.mktemp("curated")
    frames = decode_frames(SAMPLES / "bigbuckbunny.mp4", times=list(np.arange(0.0, 1.0, 1 / 8)), size=(64, 64))
    write_video(frames[:4], root / "clips" / "a.mp4", fps=8)
    write_video(frames[4:8], root / "clips" / "b.mp4", fps=8)
    rows = [_row("a", "a.mp4", 64, 64, 0.5, "a rabbit wakes up"), _row("b", "b.mp4", 64, 64, 0.5, "a bird on a branch")]
    write_manifest(to_frame(rows), root / "manifest.parquet")
    return root


def test_stage1_trains_from_pixart(tmp_path, t5, curated, one_torch_thread):
    """train_dit: PixArt loaded before the first step (report returned), then the usual training."""
    from easyanimate.models.dit import EasyAnimateTransformer3DModel
    from easyanimate.models.vae import SliceVAE
    from easyanimate.training import dit as dit_training

    vae_dir = tmp_path / "vae"
    SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(vae_dir)
    folder = save_tiny_pixart(tmp_path / "pixart")
    settings = settings_for(tmp_path, folder, t5)
    seen = {}
    real_loss = dit_training.diffusion_loss

    def first_step_loss(model, *args, **kwargs):
        if not seen:  # weights as training starts
            seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_loss(model, *args, **kwargs)

    dit_training.diffusion_loss = first_step_loss
    try:
        result = dit_training.train_dit(
            settings, 1, curated, vae_dir, tmp_path / "out", tmp_path / "ckpt", show_progress=False
        )
    finally:
        dit_training.diffusion_loss = real_loss
    assert result.init is not None and result.init_summary()["loaded"] == len(result.init.loaded)
    torch.testing.assert_close(
        seen["blocks.1.attn2.to_k.weight"], _pixart_tensor(folder, "transformer_blocks.1.attn2.to_k.weight")
    )
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()
    trained = EasyAnimateTransformer3DModel.from_pretrained(tmp_path / "out")
    assert trained.config.pos_embed_order == "wh"
    # A rerun resumes its checkpoint and leaves init_from alone.
    again = dit_training.train_dit(
        settings, 1, curated, vae_dir, tmp_path / "out2", tmp_path / "ckpt", show_progress=False
    )
    assert again.init is None and again.init_summary()["skipped"].startswith("resuming")


def _pixart_tensor(folder: Path, key: str) -> torch.Tensor:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(folder).state_dict()[key]


def test_stage1_logs_the_key_map(tmp_path, monkeypatch):
    """run_stage puts the key-map summary in the run info, counts in the metrics, every key in a report file."""
    from easyanimate.models.dit.pixart import KeyMapReport
    from easyanimate.stage_api import StageContext
    from easyanimate.training import dit as dit_training

    report = KeyMapReport("pixart", {"proj_out.weight": "proj_out.weight"}, ["skip_linears.0.weight"])
    result = dit_training.DiTTrainResult(steps=1, final_loss=0.5, losses=[0.5], init=report)
    monkeypatch.setattr(dit_training, "train_dit", lambda *a, **k: result)
    monkeypatch.setattr(dit_training, "render_samples", lambda *a, **k: [])
    ctx = StageContext(report_dir=tmp_path / "reports", checkpoint_dir=tmp_path / "ckpt", show_progress=False)
    out = dit_training.run_stage1(settings_for(tmp_path), ctx)
    assert out.info["init_from"] == report.summary()
    assert out.metrics["dit_stage1/init_loaded_keys"] == 1 and out.metrics["dit_stage1/init_new_keys"] == 1
    saved = json.loads((tmp_path / "reports" / "init_key_map.json").read_text())
    assert saved["new"] == ["skip_linears.0.weight"] and tmp_path / "reports" / "init_key_map.json" in out.artifacts
    skipped = dit_training.DiTTrainResult(steps=1, final_loss=0.5, losses=[0.5], init_skipped="resuming x")
    monkeypatch.setattr(dit_training, "train_dit", lambda *a, **k: skipped)
    out = dit_training.run_stage1(settings_for(tmp_path), ctx)
    assert out.info["init_from"] == {"skipped": "resuming x"} and "dit_stage1/init_loaded_keys" not in out.metrics
