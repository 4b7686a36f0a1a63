"""Slice VAE training flow: stage 1 (encoder + decoder), stage 2 (decoder only).

Each stage's run logs its losses, held-out PSNR/SSIM (``vae_stageN.vae_psnr`` / ``.vae_ssim``) and a
side-by-side original|reconstruction mp4; stage 1 also records whether the perceptual loss ran and why.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from prefect import flow

from flows.common import run_training_stage, settings_from, setup_mlflow


@flow(name="train-vae", log_prints=True)
def train_vae_flow(stage: int = 1, params_path: str | None = None, parent_run_id: str | None = None,
                   upstream_run_id: str | None = None) -> dict:
    from easyanimate.training.vae import perceptual_status

    settings = settings_from(params_path)
    if stage == 1:
        status = perceptual_status(settings)
        print(f"VAE stage 1 perceptual (LPIPS) loss {status.reason}")
    out = run_training_stage(f"vae_stage{stage}", settings, parent_run_id, upstream_run_id)
    if stage == 1:
        setup_mlflow(settings)
        MlflowClient().set_tag(out["run_id"], "perceptual_loss", status.reason)
    return out
