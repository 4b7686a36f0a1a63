"""Evaluate a candidate pipeline on the held-out clips, deterministically, and decide its gate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from easyanimate.config import EvaluateConfig, Settings, resolve_weight_path
from easyanimate.data.buckets import BucketTable
from easyanimate.data.datasets import load_clip_frames, to_model_range
from easyanimate.data.video_io import write_video
from easyanimate.evaluation.metrics import flicker, psnr, ssim
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.utils import atomic_directory, atomic_write_json, atomic_write_text

# Every setting that changes the metric values (not the gate thresholds): metrics computed under a
# different protocol are not comparable, so promotion re-evaluates instead of comparing them.
PROTOCOL_SETTINGS = (
    "evaluate.val_timesteps",
    "evaluate.seed",
    "evaluate.retrieval_max_captions",
    "generate",
    "dit.num_train_timesteps",
    "dit.beta_schedule",
    "dit.model.max_text_tokens",
    "vae.stage1.sample_fps",
)


@dataclass
class EvalReport:
    metrics: dict[str, float]
    passed: bool
    reasons: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    context: dict = field(default_factory=dict)  # what the metrics were computed on (data, protocol, clip ids)


def evaluation_protocol_hash(settings: Settings) -> str:
    return settings.section_hash(*PROTOCOL_SETTINGS)


def assemble_pipeline(settings: Settings, vae_dir: Path, dit_dir: Path, out_dir: Path) -> Path:
    """Put the trained VAE and DiT, the text encoder and the inference scheduler into one pipeline folder."""
    from easyanimate.models.dit import EasyAnimateTransformer3DModel
    from easyanimate.models.text_encoder import load_text_encoder
    from easyanimate.models.vae import SliceVAE
    from easyanimate.pipelines import EasyAnimatePipeline
    from easyanimate.schedulers import make_inference_scheduler

    tokenizer, text_encoder = load_text_encoder(
        resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder")
    )
    pipe = EasyAnimatePipeline(
        vae=SliceVAE.from_pretrained(vae_dir),
        transformer=EasyAnimateTransformer3DModel.from_pretrained(dit_dir),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_inference_scheduler(settings),
    )
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def vae_reconstruction_metrics(vae, clips, num_frames: int) -> dict[str, float]:
    psnrs, ssims = [], []
    for clip in clips:
        length = num_frames if clip.frames.shape[0] >= num_frames else 1
        x = to_model_range(clip.frames[:length].unsqueeze(0))
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        ref, out = _to_uint8(x[0]), _to_uint8(recon[0])
        psnrs.append(psnr(ref, out))
        ssims.append(ssim(ref, out))
    return {"eval/vae_psnr": float(np.mean(psnrs)), "eval/vae_ssim": float(np.mean(ssims))}


@torch.no_grad()
def dit_validation_loss(settings: Settings, pipe, clips, num_frames: int) -> dict[str, float]:
    """Loss at fixed timesteps with fixed noise: deterministic, so versions compare fairly."""
    from easyanimate.models.text_encoder import encode_prompts
    from easyanimate.schedulers import make_train_scheduler
    from easyanimate.training.dit import LatentBank, TextBank, diffusion_loss, encode_windows

    captions = [""] + sorted({c.caption for c in clips if c.caption})
    hidden, mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions, settings.dit.model.max_text_tokens)
    text = TextBank(captions, hidden, mask)
    bank: LatentBank = encode_windows(pipe.vae, clips, num_frames, text, settings.evaluate.seed)
    if len(bank) == 0:
        bank = encode_windows(pipe.vae, clips, 1, text, settings.evaluate.seed)
    scheduler = make_train_scheduler(settings)
    latents = torch.stack(bank.latents)
    model = pipe.transformer.eval()
    metrics, losses = {}, []
    for t in settings.evaluate.val_timesteps:
        generator = torch.Generator().manual_seed(settings.evaluate.seed + t)
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
        loss = float(
            diffusion_loss(
                model,
                scheduler,
                latents,
                text.hidden[bank.caption_ids],
                text.mask[bank.caption_ids],
                generator,
                timesteps,
            )
        )
        metrics[f"eval/val_loss_t{t}"] = loss
        losses.append(loss)
    metrics["eval/val_loss"] = float(np.mean(losses))
    return metrics


def gate_reasons(metrics: dict[str, float], e: EvaluateConfig) -> list[str]:
    """Why the evaluation gate refuses these metrics (``evaluate.*`` bounds; every family's evaluation)."""
    reasons = [f"{key} is not finite ({value})" for key, value in metrics.items() if not math.isfinite(value)]
    if "eval/vae_psnr" in metrics and metrics["eval/vae_psnr"] < e.min_vae_psnr:
        reasons.append(f"eval/vae_psnr {metrics['eval/vae_psnr']:.2f} < evaluate.min_vae_psnr {e.min_vae_psnr}")
    if "eval/val_loss" in metrics and metrics["eval/val_loss"] > e.max_val_loss:
        reasons.append(f"eval/val_loss {metrics['eval/val_loss']:.4f} > evaluate.max_val_loss {e.max_val_loss}")
    if "eval/caption_retrieval" in metrics and metrics["eval/caption_retrieval"] < e.min_caption_retrieval:
        reasons.append(
            f"eval/caption_retrieval {metrics['eval/caption_retrieval']:.2f} < "
            f"evaluate.min_caption_retrieval {e.min_caption_retrieval}"
        )
    if metrics.get("eval/flicker", 0.0) > e.max_flicker:
        reasons.append(f"eval/flicker {metrics['eval/flicker']:.4f} > evaluate.max_flicker {e.max_flicker}")
    return reasons


def write_sample(frames: np.ndarray, out_dir: Path, index: int, fps: int) -> list[Path]:
    """``samples/sample_<index>.mp4`` and ``.gif`` of uint8 or [0, 1] frames (T, H, W, 3)."""
    import imageio.v3 as iio

    mp4 = out_dir / "samples" / f"sample_{index}.mp4"
    write_video(frames, mp4, fps=fps)
    gif = mp4.with_suffix(".gif")
    iio.imwrite(gif, frames, extension=".gif", duration=1000 / fps, loop=0)
    return [mp4, gif]


def generate_samples(settings: Settings, pipe, out_dir: Path) -> tuple[dict[str, float], list[Path]]:
    g = settings.generate
    flickers, paths = [], []
    for i, prompt in enumerate(g.prompts):
        generator = torch.Generator().manual_seed(g.seed + i)
        frames = pipe(
            prompt,
            generator=generator,
            output_type="np",
            **settings.generate.pipeline_kwargs(settings.dit.model.max_text_tokens),
        ).frames[0]
        paths += write_sample(frames, out_dir, i, g.fps)
        flickers.append(flicker(frames))
    return {"eval/flicker": float(np.mean(flickers))}, paths


def write_val_loss_plot(metrics: dict[str, float], path: Path) -> Path:
    """Per-timestep validation loss as a CSV that ``dvc plots diff`` draws (x: timestep)."""
    rows = sorted((int(k.rsplit("_t", 1)[1]), v) for k, v in metrics.items() if k.startswith("eval/val_loss_t"))
    atomic_write_text(path, "timestep,val_loss\n" + "".join(f"{t},{v:.6f}\n" for t, v in rows))
    return path


def generation_geometry(settings: Settings) -> BucketTable:
    """One bucket, the generated size: clips are resized to cover it and centre-cropped (no distortion), so
    they are scored at the shape the pipeline generates (and the DiT trained on, with matching buckets)."""
    return BucketTable(((settings.generate.height, settings.generate.width),))


def _caption_retrieval(settings: Settings, pipe, curated_dir: Path, skipped: dict[str, str]):
    from easyanimate.evaluation.retrieval import caption_retrieval

    g = settings.generate
    if settings.evaluate.retrieval_max_captions == 0:
        skipped["caption_retrieval"] = "off: evaluate.retrieval_max_captions is 0"
        return None
    clips = [
        c
        for c in load_clip_frames(
            curated_dir, "train", g.height, settings.vae.stage1.sample_fps, buckets=generation_geometry(settings)
        )
        if c.frames.shape[0] >= g.num_frames
    ]
    if len({c.caption for c in clips if c.caption}) < 2:
        skipped["caption_retrieval"] = "skipped: fewer than 2 distinct captions among the training clips"
        return None
    return caption_retrieval(settings, pipe, clips)


def evaluate_pipeline(settings: Settings, pipeline_dir: Path, curated_dir: Path, out_dir: Path) -> EvalReport:
    """Score a pipeline folder on ``curated_dir``'s held-out (``split == "val"``) clips.

    Writes into ``out_dir``: samples, ``val_loss.csv`` (DVC plot), ``eval_context.json`` (the DVC hash
    of the data and the protocol hash the metrics belong to) and ``report.md``.
    """
    from easyanimate.evaluation.report import evaluation_markdown
    from easyanimate.lineage import dvc_hash
    from easyanimate.pipelines import EasyAnimatePipeline

    torch.manual_seed(settings.evaluate.seed)
    pipe = EasyAnimatePipeline.from_pretrained(pipeline_dir)
    num_frames = settings.generate.num_frames
    clips = load_clip_frames(
        curated_dir,
        "val",
        settings.generate.height,
        settings.vae.stage1.sample_fps,
        buckets=generation_geometry(settings),
    )
    metrics: dict[str, float] = {}
    reasons: list[str] = []
    skipped = {
        "clipscore": "skipped: no local CLIP weights configured (weights.aesthetic_clip)",
        "fvd": "skipped: no local I3D weights configured",
    }
    if clips:
        metrics.update(vae_reconstruction_metrics(pipe.vae, clips, num_frames))
        metrics.update(dit_validation_loss(settings, pipe, clips, num_frames))
    else:
        reasons.append("no held-out clips in the manifest (split == 'val')")
    sample_metrics, artifacts = generate_samples(settings, pipe, out_dir)
    metrics.update(sample_metrics)
    metrics["eval/num_val_clips"] = float(len(clips))
    retrieval = _caption_retrieval(settings, pipe, curated_dir, skipped)
    if retrieval is not None:
        metrics["eval/caption_retrieval"] = retrieval.rate
        metrics["eval/caption_retrieval_captions"] = float(len(retrieval.captions))

    reasons += gate_reasons(metrics, settings.evaluate)
    metrics["eval/passed"] = float(not reasons)

    out_dir = Path(out_dir)
    context = {
        "data_dvc_hash": dvc_hash(curated_dir),
        "protocol_hash": evaluation_protocol_hash(settings),
        "latent_space": pipe.vae.latent_space_id(),
        "val_clip_ids": sorted(c.clip_id for c in clips),
    }
    if retrieval is not None:
        context["caption_retrieval"] = retrieval.table()
    atomic_write_json(out_dir / "eval_context.json", context)
    plot = write_val_loss_plot(metrics, out_dir / "val_loss.csv")
    report = out_dir / "report.md"
    atomic_write_text(report, evaluation_markdown(metrics, not reasons, reasons, skipped, artifacts, out_dir))
    artifacts = artifacts + [plot, report, out_dir / "eval_context.json"]
    return EvalReport(metrics, not reasons, reasons, skipped, artifacts, context)


def evaluation_result(name: str, report: EvalReport, outputs: dict[str, Path], ctx: StageContext) -> StageResult:
    """What every family's evaluate stage records: ``metrics.json``, ``gate.json`` (the register stage reads both),
    the markdown summary and the run tags."""
    from easyanimate.evaluation.report import evaluation_markdown

    write_reports(ctx.report_dir, report.metrics)
    atomic_write_json(
        ctx.report_dir / "gate.json", {"passed": report.passed, "reasons": report.reasons, "skipped": report.skipped}
    )
    samples = [str(p) for p in report.artifacts if "samples" in str(p)]
    markdown = evaluation_markdown(report.metrics, report.passed, report.reasons, report.skipped, samples)
    if ctx.run_id:
        markdown += f"\nMLflow artifacts: `runs:/{ctx.run_id}/{name}`"
    tags = {
        "eval_passed": str(report.passed),
        "eval_reasons": "; ".join(report.reasons) or "all gates passed",
        "eval_protocol_hash": report.context.get("protocol_hash", ""),
        "eval_latent_space": report.context.get("latent_space", ""),
        "eval_num_val_clips": str(len(report.context.get("val_clip_ids", []))),
        **{f"skipped.{k}": v for k, v in report.skipped.items()},
    }
    return StageResult(
        name,
        report.metrics,
        outputs,
        report.artifacts,
        info={"passed": report.passed, "reasons": report.reasons, "skipped": report.skipped, "samples": samples},
        tags=tags,
        markdown={"evaluation": ("held-out metrics, gate and samples", markdown)},
    )


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    """Assemble ``paths.pipeline`` from the trained VAE and DiT, score it, and record its gate."""
    assemble_pipeline(settings, settings.paths.vae_stage2, settings.paths.dit_stage3, settings.paths.pipeline)
    report = evaluate_pipeline(settings, settings.paths.pipeline, settings.paths.curated, ctx.report_dir)
    return evaluation_result("evaluate", report, {"pipeline": settings.paths.pipeline}, ctx)
