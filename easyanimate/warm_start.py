"""Can a registered pipeline's weights continue training under the current settings?

Used by scheduled retraining before it hands a champion to the pipeline (``retrain.init_pipeline``);
each warm-started stage also checks its own component when it starts.
"""

from __future__ import annotations

from pathlib import Path

from easyanimate.config import Settings
from easyanimate.stages import STAGES


def warm_start_mismatches(settings: Settings, pipeline_dir: Path) -> list[str]:
    """Why ``pipeline_dir``'s VAE/transformer cannot continue under ``settings`` (empty when they can)."""
    from easyanimate.training import dit, vae

    checks = {"vae": vae.warm_start_problems, "transformer": dit.warm_start_problems}
    problems: list[str] = []
    for spec in STAGES:
        if spec.warm_start:
            problems += checks[spec.warm_start](settings, Path(pipeline_dir) / spec.warm_start)
    return problems
