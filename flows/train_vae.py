"""Slice VAE training flow: stage 1 (encoder + decoder), stage 2 (decoder only)."""

from __future__ import annotations

from prefect import flow

from flows.common import run_training_stage, settings_from


@flow(name="train-vae", log_prints=True)
def train_vae_flow(stage: int = 1, params_path: str | None = None, parent_run_id: str | None = None,
                   upstream_run_id: str | None = None) -> dict:
    return run_training_stage(f"vae_stage{stage}", settings_from(params_path), parent_run_id, upstream_run_id)
