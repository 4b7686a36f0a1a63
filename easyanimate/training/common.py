"""The training loop every stage shares: accelerate, checkpoints, resume, tracker logging.

Metrics leave through accelerate's tracker API (``accelerator.log``); the caller decides where
they go (the Prefect flows hand in an MLflow tracker), so the library imports no tracking client.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from easyanimate.config import TrainStageConfig
from easyanimate.utils import verify_safetensors

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    samples_per_second: float = 0.0

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/final_loss": self.final_loss,
            f"{prefix}/mean_loss_last10": float(sum(self.losses[-10:]) / max(1, len(self.losses[-10:]))),
            f"{prefix}/train_seconds": self.seconds,
            f"{prefix}/samples_per_second": self.samples_per_second,
            f"{prefix}/steps": float(self.steps),
            f"{prefix}/resumed_from_step": float(self.resumed_from),
        }


def make_accelerator(mixed_precision: str, trackers: Sequence[GeneralTracker] | None = None) -> Accelerator:
    cpu = not torch.cuda.is_available()
    return Accelerator(
        mixed_precision="no" if cpu else mixed_precision,
        cpu=cpu,
        log_with=list(trackers) if trackers else None,
    )


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    found = []
    if ckpt_dir.exists():
        for child in ckpt_dir.iterdir():
            match = _CKPT.match(child.name)
            if match and (child / "trainer_state.json").exists():
                found.append((int(match.group(1)), child))
    return max(found) if found else None


_EMA_FILE = "ema.safetensors"


def _save_ema(ema: EMAModel, folder: Path) -> None:
    # Saved as safetensors by hand: accelerate's custom-object checkpoints are pickles (torch.load unsafe).
    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}
    tensors["optimization_step"] = torch.tensor([ema.optimization_step], dtype=torch.int64)
    save_file(tensors, str(folder / _EMA_FILE))


def _load_ema(ema: EMAModel, folder: Path) -> None:
    path = folder / _EMA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {_EMA_FILE}: it was written without EMA; delete it to restart")
    tensors = load_file(str(path))
    for i, shadow in enumerate(ema.shadow_params):
        shadow.data.copy_(tensors[f"shadow.{i}"])
    ema.optimization_step = int(tensors["optimization_step"].item())


def _save_checkpoint(
    accelerator: Accelerator, ckpt_dir: Path, step: int, losses: list[float], keep: int, ema: EMAModel | None = None
) -> None:
    """Every rank calls this (DeepSpeed/FSDP shard their state); only the main rank commits."""
    final = ckpt_dir / f"checkpoint-{step:07d}"
    tmp = ckpt_dir / f".checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            _save_ema(ema, tmp)
        # The state file is the commit marker: a checkpoint without it is never resumed from.
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "losses": losses}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        existing = sorted(p for p in ckpt_dir.iterdir() if _CKPT.match(p.name))
        for old in existing[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train_loop(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    trainable: Iterable[torch.nn.Parameter],
    cfg: TrainStageConfig,
    compute_loss: Callable[[torch.nn.Module, int], torch.Tensor],
    ckpt_dir: Path,
    name: str,
    tracker_config: dict | None = None,
    show_progress: bool = True,
    lr_schedule: str = "constant_with_warmup",
    ema: EMAModel | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` optimisation steps of ``compute_loss(model, step)``; resume from ``ckpt_dir``.

    ``lr_schedule`` names a diffusers schedule. ``ema`` (over ``trainable``) is updated after every optimiser
    step and checkpointed with the run; copying its weights into the model at the end is the caller's choice.
    Modules/optimisers the caller ``accelerator.prepare``-d before this call (e.g. a discriminator) are saved
    and restored with the checkpoints too.
    """
    params = [p for p in trainable if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(
        lr_schedule, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.init_trackers(name, config=tracker_config or {})

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start, losses = 0, []
    latest = latest_checkpoint(ckpt_dir)
    if latest:
        verify_safetensors(latest[1])
        accelerator.load_state(str(latest[1]))
        state = json.loads((latest[1] / "trainer_state.json").read_text())
        start, losses = int(state["step"]), list(state["losses"])
        if ema is not None:
            _load_ema(ema, latest[1])

    model.train()
    began = time.perf_counter()
    progress = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        disable=not show_progress or not accelerator.is_main_process,
    )
    with progress:
        bar = progress.add_task(name, total=cfg.steps, completed=start, loss="-")
        for step in range(start, cfg.steps):
            with accelerator.accumulate(model):
                loss = compute_loss(model, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and accelerator.sync_gradients:
                    ema.step(params)
            value = float(accelerator.gather(loss.detach()).mean())
            losses.append(value)
            accelerator.log({f"{name}/loss": value, f"{name}/lr": lr_scheduler.get_last_lr()[0]}, step=step + 1)
            progress.update(bar, advance=1, loss=f"{value:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _save_checkpoint(accelerator, ckpt_dir, step + 1, losses, cfg.keep_checkpoints, ema)
    seconds = time.perf_counter() - began
    done = cfg.steps - start
    result = TrainResult(
        steps=cfg.steps,
        final_loss=losses[-1] if losses else math.nan,
        losses=losses,
        seconds=seconds,
        resumed_from=start,
        samples_per_second=(done * cfg.batch_size / seconds) if seconds > 0 and done else 0.0,
    )
    # Summary metrics go back in the result; the caller logs them once (per-step ones went via trackers).
    accelerator.end_training()
    return result


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Per-step RNG, so noise and timesteps are the same whether or not a run was resumed."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def config_mismatches(component_dir: Path, fresh_config: dict, section: str, ignore: Iterable[str] = ()) -> list[str]:
    """Why the model saved in ``component_dir`` cannot warm-start a model built with ``fresh_config``.

    Keys the saved ``config.json`` lacks, private keys and ``ignore`` (execution-only keys) are skipped.
    """
    component_dir = Path(component_dir)
    file = component_dir / "config.json"
    if not file.exists():
        return [f"{file} is missing"]
    saved = json.loads(file.read_text())
    ignored = set(ignore)
    problems = []
    for key, want in fresh_config.items():
        if key.startswith("_") or key not in saved or key in ignored:
            continue
        if json.loads(json.dumps(want)) != saved[key]:
            problems.append(
                f"{section}: {component_dir.name}.{key} is {saved[key]!r} in {component_dir.parent.name}, "
                f"settings give {want!r}"
            )
    return problems
