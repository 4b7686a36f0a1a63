"""Test-wide environment: offline, and all tool state (Prefect, caches) in a throwaway folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="easyanimate-test-state-"))
os.environ.setdefault("EASYANIMATE_STATE_DIR", str(_STATE))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Each test workspace would start (and keep, until idle) its own Prefect server: tests use Prefect's temporary
# per-command server instead; tests/test_prefect_server.py runs the default workspace server on purpose.
os.environ.setdefault("EASYANIMATE_PREFECT_SERVER", "temporary")

from easyanimate.runtime import configure_environment  # noqa: E402

configure_environment()

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and are then immune to other busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pipeline(folder: Path, lora_folder: Path) -> None:
    """The tiny pipeline the serving tests use (MiniLM text encoder, 8-channel VAE, 2-block DiT) and a LoRA
    adapter with random weights, so the adapter visibly changes the video."""
    import torch
    from peft import LoraConfig

    from easyanimate.config import load_settings, resolve_weight_path
    from easyanimate.models.dit import EasyAnimateTransformer3DModel
    from easyanimate.models.text_encoder import load_text_encoder
    from easyanimate.models.vae import SliceVAE
    from easyanimate.pipelines import EasyAnimatePipeline, make_scheduler, save_transformer_lora

    torch.manual_seed(0)
    tokenizer, encoder = load_text_encoder(resolve_weight_path(load_settings().weights.text_encoder, "w"))
    dit = EasyAnimateTransformer3DModel(hidden_size=32, depth=2, num_heads=2, text_embed_dim=384)
    with torch.no_grad():  # random output layer so generations are not all-zero noise predictions
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    EasyAnimatePipeline(
        vae=SliceVAE(block_out_channels=(8, 8, 8, 8), norm_groups=4),
        transformer=dit,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler("dpm++", {"num_train_timesteps": 1000}),
    ).save_pretrained(folder)
    dit.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    save_transformer_lora(dit, lora_folder)
