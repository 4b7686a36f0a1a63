"""What a stage entry sees and returns: ``run(settings, ctx: StageContext) -> StageResult``.

Kept apart from ``easyanimate.stages`` (the DAG) on purpose: stage code imports this small module
only, so editing the DAG never changes a stage's derived code version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from easyanimate.utils import atomic_write_json, atomic_write_text


def sequential_map(fn: Callable[..., Any], items: Sequence[Any], **shared: Any) -> list[Any]:
    return [fn(item, **shared) for item in items]


@dataclass
class StageContext:
    """Per-run facts the runner (CLI, Prefect flow, test) hands a stage entry."""

    report_dir: Path
    checkpoint_dir: Path  # keyed by the stage's inputs and settings: a changed config never resumes stale state
    warm_start: Path | None = None  # component folder to start from instead of a fresh model (retraining)
    run_id: str | None = None  # the stage's open MLflow run, when tracked
    parent_run_id: str | None = None
    upstream_run_id: str | None = None
    params_path: str | None = None
    trackers: Sequence[Any] = ()  # accelerate trackers writing into the run
    show_progress: bool = True
    write_reports: bool = True
    # How to fan out independent work items: ``map(fn, items, **shared) -> [fn(item, **shared)...]``.
    # ``fn`` must be a module-level function (a Dask runner pickles it). Prefect supplies its task runner.
    map: Callable[..., list[Any]] = sequential_map


@dataclass
class StageResult:
    name: str
    metrics: dict
    outputs: dict[str, Path] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # files/folders logged to the stage's MLflow run
    info: dict = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # set on the stage's MLflow run
    tables: dict[str, tuple[str, list[dict]]] = field(default_factory=dict)  # key -> (description, rows)
    markdown: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (description, markdown)
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (uri, text)
    failure: str | None = None  # set when the stage ran but its gate failed: the runner raises after logging
    run_id: str | None = None

    def summary(self) -> dict:
        """JSON-able return value of a stage task (what Prefect persists and the pipeline passes on)."""
        return {
            "stage": self.name,
            "run_id": self.run_id,
            "metrics": self.metrics,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            **{k: v for k, v in self.info.items() if _jsonable(v)},
        }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


class StageFailed(RuntimeError):
    """A stage ran to the end but its own gate refused the result (e.g. the curation quality gate)."""


def write_reports(report_dir: Path, metrics: dict, losses: Sequence[float] | None = None) -> Path:
    """``reports/<stage>/metrics.json`` (DVC metrics) and ``loss.csv`` (DVC plots)."""
    if losses is not None:
        rows = ["step,loss"] + [f"{i + 1},{loss:.6f}" for i, loss in enumerate(losses)]
        atomic_write_text(report_dir / "loss.csv", "\n".join(rows) + "\n")
    atomic_write_json(report_dir / "metrics.json", metrics)
    return report_dir / "metrics.json"


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
