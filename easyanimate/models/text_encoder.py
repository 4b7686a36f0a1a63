"""Frozen text encoder (T5 in the paper; any local Hugging Face encoder works, e.g. MiniLM for tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_text_encoder(path: str | Path):
    """Load ``(tokenizer, encoder)`` from a local folder only; the encoder is frozen and in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {path}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Only the encoder half of a T5 is needed; AutoModel would also build the decoder.
    model_cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
    model = model_cls.from_pretrained(path, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts to ``(hidden (B, L, D), mask (B, L))`` with L = max_length (padded and truncated)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    input_ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden, mask


__all__ = ["encode_prompts", "load_text_encoder"]
