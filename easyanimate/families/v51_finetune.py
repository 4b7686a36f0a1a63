"""The ``v51_finetune`` stage: LoRA (``v51.finetune: lora``) or full fine-tune of the released V5.1 transformer on
the latent cache, with the flow-matching objective the release trained with (``train_v51_transformer``).

Only the transformer is loaded: the VAE and the text encoder did their work in ``v51_latents``. The stage resumes
from its newest checkpoint in ``ctx.checkpoint_dir`` (keyed by its inputs and settings). Output ``paths.v51_finetune``:
a LoRA in diffusers' format (``pytorch_lora_weights.safetensors`` + ``adapter_config.json``) or ``transformer/``,
each with ``train_summary.json``.
"""

from __future__ import annotations

import json
import time

from easyanimate.config import Settings
from easyanimate.families.v51 import DTYPES, check_v51_folder, default_device, train_v51_transformer
from easyanimate.families.v51_latents import load_latent_cache
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.utils import atomic_directory


def load_transformer(settings: Settings, device=None):
    from diffusers import EasyAnimateTransformer3DModel

    folder = check_v51_folder(settings.v51.model_dir)
    transformer = EasyAnimateTransformer3DModel.from_pretrained(
        folder / "transformer", torch_dtype=DTYPES[settings.v51.dtype], local_files_only=True
    )
    return transformer.to(device or default_device())


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    v = settings.v51
    samples, empty, index = load_latent_cache(settings.paths.v51_latents, "train")
    transformer = load_transformer(settings)
    scheduler_config = json.loads((check_v51_folder(v.model_dir) / "scheduler" / "scheduler_config.json").read_text())

    def log(step: int, loss: float) -> None:
        for tracker in ctx.trackers:
            tracker.log({"train/loss": loss}, step=step)
        if ctx.show_progress and (step % max(1, v.train_steps // 10) == 0 or step == v.train_steps):
            print(f"v51_finetune ({v.finetune}) step {step}/{v.train_steps} loss {loss:.4f}")

    started = time.perf_counter()
    with atomic_directory(settings.paths.v51_finetune) as tmp:
        train_v51_transformer(
            transformer,
            scheduler_config,
            index["scaling_factor"],
            samples,
            empty,
            v,
            tmp,
            mode=v.finetune,
            checkpoint_dir=ctx.checkpoint_dir,
            log=log,
        )
        summary = json.loads((tmp / "train_summary.json").read_text())
    all_losses = summary["losses"]
    metrics = {
        "train/final_loss": all_losses[-1],
        "train/steps": float(summary["steps"]),
        "train/resumed_from": float(summary["resumed_from"]),
        "train/num_samples": float(summary["num_samples"]),
        "train/seconds": time.perf_counter() - started,
    }
    write_reports(ctx.report_dir, metrics, all_losses)
    return StageResult(
        "v51_finetune",
        metrics,
        {"v51_finetune": settings.paths.v51_finetune},
        [ctx.report_dir / "loss.csv"],
        info={"mode": v.finetune, "resumed_from": summary["resumed_from"]},
        tags={"v51_finetune": v.finetune, "model.family": "easyanimate-v5.1"},
    )
