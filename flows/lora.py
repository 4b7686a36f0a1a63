"""LoRA fine-tuning flow (peft adapters on the DiT's attention projections)."""

from __future__ import annotations

from prefect import flow

from flows.common import run_training_stage, settings_from


@flow(name="lora", log_prints=True)
def lora_flow(params_path: str | None = None, parent_run_id: str | None = None,
              upstream_run_id: str | None = None) -> dict:
    return run_training_stage("lora", settings_from(params_path), parent_run_id, upstream_run_id)
