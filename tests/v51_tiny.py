"""Tiny random EasyAnimate V5.1 components, saved in the layout of the V5.1 ``-diffusers`` releases.

Built the way diffusers' own EasyAnimate tests build them (``get_dummy_components``): a 1-layer transformer with
head dim 16, a MagViT VAE with ``block_out_channels=(8, 8, 8, 8)`` and 4 latent channels, plus a tiny Qwen2-VL made
from a transformers config and a byte-level Qwen2 tokenizer with a Qwen-style chat template, made here: nothing
comes from a hub. The folder is written by ``pipe.save_pretrained`` so ``model_index.json`` and every sub-folder
(``vae/``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) are what diffusers itself writes.

An InP checkpoint differs only in the transformer's ``in_channels``: latents (4) + the resized mask (1, with
``resize_inpaint_mask_directly``) + the masked video's latents (4), which is how the diffusers inpaint pipeline tells
an InP transformer from a text-to-video one.
"""

from __future__ import annotations

from pathlib import Path

import torch

LATENT_CHANNELS = 4
TEXT_HIDDEN = 16

# Qwen2-VL's template, reduced to the text parts EasyAnimate's encode_prompt sends.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer():
    """A byte-level Qwen2 tokenizer over the 256 byte symbols (no merges) plus Qwen's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(vocab_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": vocab_size - 3,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 3,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": TEXT_HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 1,
        vision_start_token_id=vocab_size - 1,
        vision_end_token_id=vocab_size - 1,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_components(inpaint: bool, seed: int = 0) -> dict:
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    in_channels = LATENT_CHANNELS + 1 + LATENT_CHANNELS if inpaint else LATENT_CHANNELS
    transformer = EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=8,
        text_embed_dim=TEXT_HIDDEN,
        num_layers=1,
        mmdit_layers=1,
        sample_width=4,
        sample_height=4,
        patch_size=2,
    )
    with torch.no_grad():  # diffusers zero-inits nothing here, but make sure the output projection is not tiny
        transformer.proj_out.weight.normal_(0.0, 0.2)
    torch.manual_seed(seed)
    vae = AutoencoderKLMagvit(
        in_channels=3,
        out_channels=3,
        down_block_types=(
            "SpatialDownBlock3D",
            "SpatialTemporalDownBlock3D",
            "SpatialTemporalDownBlock3D",
            "SpatialTemporalDownBlock3D",
        ),
        up_block_types=(
            "SpatialUpBlock3D",
            "SpatialTemporalUpBlock3D",
            "SpatialTemporalUpBlock3D",
            "SpatialTemporalUpBlock3D",
        ),
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        spatial_group_norm=False,
    )
    # Not an __init__ argument, but the V5.1 VAE configs carry it and the inpaint pipeline reads it.
    vae.register_to_config(cache_mag_vae=True)
    # V5.1 releases: shift 3.0 flow matching.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(len(tokenizer))
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def save_tiny_v51(folder: str | Path, inpaint: bool, seed: int = 0) -> Path:
    """Write a tiny random V5.1 (``inpaint=True``: V5.1 InP) checkpoint folder and return it."""
    from diffusers import EasyAnimateInpaintPipeline, EasyAnimatePipeline

    pipeline_class = EasyAnimateInpaintPipeline if inpaint else EasyAnimatePipeline
    pipe = pipeline_class(**tiny_components(inpaint, seed))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_v51_lora(model_dir: str | Path, folder: str | Path, seed: int = 0) -> Path:
    """A LoRA on ``model_dir``'s transformer with random ``lora_B`` (a fresh one is zero, i.e. no change), saved as
    ``save_v51_lora`` writes adapters (diffusers' LoRA format + peft's adapter_config.json)."""
    from easyanimate.families.v51 import add_v51_lora, load_v51_pipeline, save_v51_lora

    pipe = load_v51_pipeline(model_dir, dtype=torch.float32, device="cpu")
    config = add_v51_lora(pipe.transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_v51_lora(pipe, folder, config)
