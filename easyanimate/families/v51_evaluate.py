"""The ``v51_evaluate`` stage: assemble the fine-tuned V5.1 pipeline, score it on the held-out clips, decide its gate.

``paths.v51_pipeline`` is a complete V5.1 ``-diffusers`` folder: the release's components (hard links where the file
system allows, so no second copy of the weights), with ``transformer/`` replaced by a full fine-tune's. A LoRA stays a
separate adapter (``paths.v51_finetune``), registered as its own version.

Metrics (the native family's names, so reports and promotion read them alike): ``eval/vae_psnr``/``eval/vae_ssim``
(MagViT reconstruction of the held-out clips), ``eval/val_loss`` in the family's own objective (flow matching, the
cached held-out latents at each of ``v51.eval_sigmas`` with fixed noise: deterministic, so versions compare fairly;
``eval/val_loss_base`` the release's own loss, LoRA scale 0, so the report shows what the fine-tune changed),
``eval/flicker`` of the generated samples. ``eval_context.json`` names the latent space (the MagViT config's hash):
promotion never compares losses across latent spaces.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from easyanimate.config import Settings
from easyanimate.evaluation.evaluate import EvalReport, evaluation_result, gate_reasons, write_sample
from easyanimate.evaluation.metrics import flicker, psnr, ssim
from easyanimate.families.v51 import (
    LORA_WEIGHTS_NAME,
    SUBFOLDERS,
    LatentSample,
    check_v51_folder,
    flow_matching_loss,
    generate_v51_from_settings,
    load_v51_pipeline,
    set_v51_lora_scale,
)
from easyanimate.families.v51_latents import clips_by_split, load_latent_cache
from easyanimate.stage_api import StageContext, StageResult
from easyanimate.utils import atomic_directory, atomic_write_json, atomic_write_text, link_or_copy

PROTOCOL_SETTINGS = (
    "evaluate.seed",
    "generate",
    "v51.eval_sigmas",
    "v51.eval_num_samples",
    "v51.num_frames",
    "v51.train_height",
    "v51.train_width",
    "v51.train_num_frames",
    "v51.sample_fps",
    "v51.bucket_aspect_ratios",
)


def protocol_hash(settings: Settings) -> str:
    return settings.section_hash(*PROTOCOL_SETTINGS)


def latent_space_id(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return "magvit-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def assemble_v51_pipeline(base: Path, vae: Path, finetune: Path, out: Path) -> Path:
    """The release folder with the ``v51_vae`` stage's VAE and a full fine-tune's ``transformer/`` in place of its
    own (a LoRA leaves the transformer as it is)."""
    with atomic_directory(out) as tmp:
        (tmp / "model_index.json").write_bytes((base / "model_index.json").read_bytes())
        for sub in SUBFOLDERS:
            source = base / sub
            if sub == "transformer" and (finetune / "transformer").is_dir():
                source = finetune / "transformer"
            elif sub == "vae":
                source = vae
            shutil.copytree(source, tmp / sub, copy_function=link_or_copy)
            (tmp / sub / "train_summary.json").unlink(missing_ok=True)
    return out


@torch.no_grad()
def validation_loss(transformer, samples: list[LatentSample], scaling: float, sigmas, scheduler_config, seed: int):
    """Mean flow-matching loss over ``samples`` at each noise level in ``sigmas`` (fixed noise per sample and level)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    device = next(transformer.parameters()).device
    per_sigma = {}
    for level in sigmas:
        # The training sigma nearest the requested level, with its timestep, as the scheduler pairs them.
        index = int(torch.argmin((scheduler.sigmas[:-1] - level).abs()))
        sigma = scheduler.sigmas[index].reshape(1).to(device, torch.float32)
        timestep = scheduler.timesteps[index].reshape(1).to(device)
        losses = []
        for i, sample in enumerate(samples):
            generator = torch.Generator().manual_seed(seed * 7919 + i * 101 + int(level * 1000))
            x0 = (sample.mean.float() * scaling)[None].to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            inpaint = None if sample.inpaint_latents is None else sample.inpaint_latents[None].to(device)
            text = sample.prompt_embeds[None].to(device)
            losses.append(float(flow_matching_loss(transformer, x0, noise, sigma, timestep, text, inpaint)))
        per_sigma[float(level)] = float(np.mean(losses))
    return per_sigma


@torch.no_grad()
def vae_metrics(vae, clips, num_frames: int) -> dict[str, float]:
    from easyanimate.families.v51 import sample_frames

    psnrs, ssims = [], []
    for clip in clips:
        frames = sample_frames(clip.frames.permute(0, 2, 3, 1).numpy(), num_frames)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
        x = x.to(vae.device, vae.dtype)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].float()
        out = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        psnrs.append(psnr(frames, out))
        ssims.append(ssim(frames, out))
    return {"eval/vae_psnr": float(np.mean(psnrs)), "eval/vae_ssim": float(np.mean(ssims))}


def evaluate_v51(settings: Settings, out_dir: Path, folder: Path, lora_dir: Path | None) -> EvalReport:
    """Score the V5.1 pipeline ``folder`` (with the adapter in ``lora_dir``, if any) on the held-out samples of
    ``paths.v51_latents`` and the clips of ``paths.curated``; writes samples, ``val_loss.csv``, ``eval_context.json``
    and ``report.md`` into ``out_dir``."""
    v, e, g = settings.v51, settings.evaluate, settings.generate
    has_lora = lora_dir is not None
    torch.manual_seed(e.seed)
    pipe = load_v51_pipeline(
        folder,
        v.memory_mode,
        dtype=v.dtype,
        lora_dir=lora_dir,
        tile_sample_min_size=v.tile_sample_min_size,
        tile_sample_stride=v.tile_sample_stride,
    )
    val, _, index = load_latent_cache(settings.paths.v51_latents, "val")
    metrics: dict[str, float] = {}
    reasons: list[str] = []
    skipped = {
        "caption_retrieval": "not computed for the V5.1 family (it compares latents of the native VAE)",
        "clipscore": "skipped: no local CLIP weights configured (weights.aesthetic_clip)",
        "fvd": "skipped: no local I3D weights configured",
    }
    scheduler_config = dict(pipe.scheduler.config)
    if val:
        clips = clips_by_split(settings, ("val",))["val"]
        metrics.update(vae_metrics(pipe.vae, clips, v.train_num_frames))
        args = (val, index["scaling_factor"], v.eval_sigmas, scheduler_config, e.seed)
        tuned = validation_loss(pipe.transformer, *args)
        metrics.update({f"eval/val_loss_sigma{s:g}": loss for s, loss in tuned.items()})
        metrics["eval/val_loss"] = float(np.mean(list(tuned.values())))
        if has_lora:
            set_v51_lora_scale(pipe, 0.0)
            base = validation_loss(pipe.transformer, *args)
            set_v51_lora_scale(pipe, 1.0)
            metrics["eval/val_loss_base"] = float(np.mean(list(base.values())))
    else:
        reasons.append("no held-out clips in the latent cache (split == 'val')")
    flickers, artifacts = [], []
    videos = (
        generate_v51_from_settings(settings, g.prompts[: v.eval_num_samples], pipe=pipe) if v.eval_num_samples else []
    )
    for i, frames in enumerate(videos):
        artifacts += write_sample(frames, out_dir, i, g.fps)
        flickers.append(flicker(frames))
    metrics["eval/flicker"] = float(np.mean(flickers)) if flickers else 0.0
    metrics["eval/num_val_clips"] = float(len(val))
    reasons += gate_reasons(metrics, e)
    metrics["eval/passed"] = float(not reasons)

    from easyanimate.evaluation.report import evaluation_markdown
    from easyanimate.lineage import dvc_hash

    context = {
        "family": "easyanimate-v5.1",
        "data_dvc_hash": dvc_hash(settings.paths.curated),
        "protocol_hash": protocol_hash(settings),
        "latent_space": latent_space_id(folder),
        "val_clip_ids": sorted(s.key for s in val),
        "finetune": "lora" if has_lora else "full",
    }
    atomic_write_json(out_dir / "eval_context.json", context)
    rows = sorted((float(k.removeprefix("eval/val_loss_sigma")), x) for k, x in metrics.items() if "_sigma" in k)
    plot = out_dir / "val_loss.csv"
    atomic_write_text(plot, "sigma,val_loss\n" + "".join(f"{s:g},{x:.6f}\n" for s, x in rows))
    report = out_dir / "report.md"
    atomic_write_text(report, evaluation_markdown(metrics, not reasons, reasons, skipped, artifacts, out_dir))
    return EvalReport(
        metrics, not reasons, reasons, skipped, artifacts + [plot, report, out_dir / "eval_context.json"], context
    )


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    """Assemble ``paths.v51_pipeline``, score it, and record its gate (``gate.json``) for ``v51_register``."""
    base = check_v51_folder(settings.v51.model_dir)
    assemble_v51_pipeline(base, settings.paths.v51_vae, settings.paths.v51_finetune, settings.paths.v51_pipeline)
    finetune = settings.paths.v51_finetune
    adapter = finetune if (finetune / LORA_WEIGHTS_NAME).is_file() else None
    report = evaluate_v51(settings, ctx.report_dir, settings.paths.v51_pipeline, adapter)
    result = evaluation_result("v51_evaluate", report, {"v51_pipeline": settings.paths.v51_pipeline}, ctx)
    result.tags["model.family"] = "easyanimate-v5.1"
    return result
