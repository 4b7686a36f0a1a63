"""Weight-backed curation components (LAION aesthetic, VLM captioner) on tiny random models.

Real weights are never available offline; these tests build randomly initialised models of the real
architectures, save them to a temp folder, and check the local-only load + inference path end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

from easyanimate.config import PRESETS_DIR, CaptionConfig, load_settings

# The tiny preset on its own (no project params.yaml): the defaults these tests are written against.
PRESET_ONLY = PRESETS_DIR / "tiny.yaml"


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_laion(tmp_path_factory):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("laion")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    CLIPModel(cfg).save_pretrained(d / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d / "clip")
    from easyanimate.data.filters.laion import _head

    head = _head(24)
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(d / "head.safetensors"))
    return {"aesthetic_clip": str(d / "clip"), "aesthetic_head": str(d / "head.safetensors")}


def _laion_settings(threshold: float = 4.0, **weights):
    return load_settings(
        PRESET_ONLY,
        overrides={"weights": weights, "curate": {"aesthetic": {"scorer": "laion", "threshold": threshold}}},
    )


def test_laion_scores_with_local_weights(tiny_laion, frames, monkeypatch):
    from easyanimate.data.filters import build_filters
    from easyanimate.data.filters.laion import LaionAesthetic

    loads = []
    real_init = LaionAesthetic.__init__
    monkeypatch.setattr(LaionAesthetic, "__init__", lambda self, *a: loads.append(a) or real_init(self, *a))
    aesthetic = next(f for f in build_filters(_laion_settings(0.0, **tiny_laion)) if f.name == "aesthetic")
    assert aesthetic.name == "aesthetic" and aesthetic.uses_device and loads == []  # nothing loads before setup
    aesthetic.setup("cpu")
    aesthetic.setup("cpu")
    assert len(loads) == 1 and loads[0][2] == "cpu"  # one model per filter instance, on the device given
    scores = aesthetic.score(frames)
    assert np.isfinite(scores["aesthetic"])
    reason = aesthetic.accept(scores)
    assert reason == (None if scores["aesthetic"] >= 0.0 else "low_aesthetic")
    assert aesthetic.record(scores)["aesthetic"] == round(scores["aesthetic"], 4)
    per_frame = aesthetic._model.score_frames(frames)
    assert per_frame.shape == (4,) and scores["aesthetic"] == pytest.approx(float(per_frame.mean()), abs=1e-5)


def test_laion_missing_weights_names_setting():
    from easyanimate.data.filters import build_filters

    # Construction resolves the paths: a bad setting fails before any video is decoded.
    with pytest.raises(FileNotFoundError, match="weights.aesthetic_clip"):
        build_filters(_laion_settings())
    with pytest.raises(FileNotFoundError, match="weights.aesthetic_head"):
        build_filters(_laion_settings(aesthetic_clip="/"))


def build_tiny_blip(d):
    """A randomly initialised BLIP captioner saved to folder ``d`` (the real architecture, tiny)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "rabbit", "in", "the", "meadow", "green"]
    (d / "vocab.txt").write_text("\n".join(words))
    tok = BertTokenizer(str(d / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            bos_token_id=5,
            pad_token_id=0,
            sep_token_id=3,
            eos_token_id=3,
            max_position_embeddings=64,
            encoder_hidden_size=32,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(cfg)
    model.generation_config.min_new_tokens = 2  # a random model may emit [SEP] first; force some text
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_vlm_captioner_runs_batched(tiny_blip, frames):
    from easyanimate.data.captioners.vlm import VLMCaptioner

    cap = VLMCaptioner(tiny_blip, CaptionConfig(batch_size=3, max_new_tokens=6))
    with pytest.raises(RuntimeError, match="setup"):
        cap.caption_frames(frames)  # nothing is loaded until setup
    cap.setup("cpu")
    per_frame = cap.caption_frames(frames)
    assert len(per_frame) == 4 and all(isinstance(c, str) for c in per_frame)
    caption = cap("x.mp4", 0.0, 4.0, frames)
    assert isinstance(caption, str) and caption.strip()


def test_vlm_from_settings_and_missing_weights(tiny_blip):
    from easyanimate.data.captioners import build_captioner
    from easyanimate.data.captioners.vlm import VLMCaptioner

    s = load_settings(
        PRESET_ONLY,
        overrides={"weights": {"captioner": str(tiny_blip)}, "curate": {"caption": {"captioner": "vlm"}}},
    )
    cap = build_captioner(s)
    # No process-wide cache: each Curator owns its captioner; the model loads in setup, once.
    assert isinstance(cap, VLMCaptioner) and cap is not build_captioner(s) and cap.model is None
    assert cap.uses_device and cap.frames_per_clip == s.curate.caption.num_frames
    cap.setup("cpu")
    model = cap.model
    cap.setup("cpu")
    assert cap.model is model
    missing = load_settings(PRESET_ONLY, overrides={"curate": {"caption": {"captioner": "vlm"}}})
    with pytest.raises(FileNotFoundError, match="weights.captioner"):
        build_captioner(missing)
