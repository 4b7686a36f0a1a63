"""Text encoder loading (offline, local folder only) and prompt encoding with the real MiniLM."""

import pytest
import torch

from easyanimate.config import load_settings, resolve_weight_path
from easyanimate.models.text_encoder import encode_prompts, load_text_encoder


@pytest.fixture(scope="module")
def encoder():
    path = resolve_weight_path(load_settings().weights.text_encoder, "weights.text_encoder")
    return load_text_encoder(path)


def test_loads_frozen_in_eval(encoder):
    _, model = encoder
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_encode_shapes_and_mask(encoder):
    tokenizer, model = encoder
    hidden, mask = encode_prompts(tokenizer, model, ["a dog runs on the beach", "sunset"], max_length=16)
    assert hidden.shape == (2, 16, 384)
    assert mask.shape == (2, 16)
    assert mask[0].sum() > mask[1].sum() > 0  # longer prompt keeps more tokens; padding masked
    assert mask[1, -1] == 0
    assert not hidden.requires_grad
    long_hidden, long_mask = encode_prompts(tokenizer, model, ["word " * 100], max_length=8)
    assert long_hidden.shape == (1, 8, 384) and long_mask.all()  # truncated


def test_different_prompts_differ(encoder):
    tokenizer, model = encoder
    hidden, _ = encode_prompts(tokenizer, model, ["a red car", "a snowy mountain"], max_length=12)
    assert not torch.allclose(hidden[0], hidden[1])
    again, _ = encode_prompts(tokenizer, model, ["a red car"], max_length=12)
    torch.testing.assert_close(again[0], hidden[0], atol=1e-5, rtol=1e-5)


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        load_text_encoder(missing)
