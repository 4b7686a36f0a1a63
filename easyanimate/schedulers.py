"""Noise schedulers, built in one place for training, evaluation and inference.

Training uses DDPM (epsilon prediction) with ``dit.num_train_timesteps`` / ``dit.beta_schedule``; every
inference scheduler is built from that same training config, so the pipeline a stage saves, the samples
a DiT stage renders and the CLI all denoise alike.
"""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from easyanimate.config import Settings

SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PRK warm-up steps are pointless at few steps
}


def make_scheduler(name: str, config: dict | None = None):
    """Build an inference scheduler from a DDPM-style training config (num_train_timesteps, beta_schedule, ...)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    cfg = {"prediction_type": "epsilon", **dict(config or {}), **extra}
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


def train_scheduler_config(settings: Settings) -> dict:
    return {
        "num_train_timesteps": settings.dit.num_train_timesteps,
        "beta_schedule": settings.dit.beta_schedule,
        "prediction_type": "epsilon",
    }


def make_train_scheduler(settings: Settings) -> DDPMScheduler:
    return DDPMScheduler(**train_scheduler_config(settings))


def make_inference_scheduler(settings: Settings):
    """``generate.scheduler`` on the training noise schedule."""
    return make_scheduler(settings.generate.scheduler, train_scheduler_config(settings))
