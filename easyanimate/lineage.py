"""Lineage facts attached to every registered model: git commit, DVC data hash, params hash."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from easyanimate.config import Settings


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_hash(path: str | Path) -> str:
    """The md5 DVC gives ``path`` (``<md5>.dir`` for a folder), the same value ``dvc.lock`` records."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5")
    return obj.hash_info.value


def params_hash(settings: Settings) -> str:
    return settings.section_hash()


# --------------------------------------------------------------------------- registry lineage
# Model-version tag names. ``register`` writes them, ``model_lineage`` reads them back.
CHECKPOINT_TAG = "checkpoint.{stage}.{field}"  # field: path | dvc_hash | parent
RUN_TAG = "run.{stage}"
# What `easyanimate lineage` and the studio show first, in this order.
LINEAGE_FACTS = (
    "curated_data_dvc_hash",
    "git_commit",
    "params_hash",
    "params_artifact",
    "warm_start",
    "pipeline_run_id",
    "register_run_id",
)
PARAMS_ARTIFACT = "config/params.yaml"


def checkpoint_tags(stage_paths: dict[str, Path], parents: dict[str, str]) -> dict[str, str]:
    """Path, DVC hash and parent checkpoint of every model folder the registered pipeline came from."""
    tags = {}
    for stage, path in stage_paths.items():
        if not Path(path).exists():
            continue
        tags[CHECKPOINT_TAG.format(stage=stage, field="path")] = str(path)
        tags[CHECKPOINT_TAG.format(stage=stage, field="dvc_hash")] = dvc_hash(path)
        if parents.get(stage):
            tags[CHECKPOINT_TAG.format(stage=stage, field="parent")] = parents[stage]
    return tags


def resolve_stage_runs(
    client,
    experiment_id: str,
    stage_versions: dict[str, str],
    evaluate_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, tuple[str, str]]:
    """Stage name -> (run id, how it was found) for the runs (of the stages in ``stage_versions``) that
    produced what is being registered.

    Most exact first: the ``upstream_run_id`` chain from the evaluate run (Prefect cache hits keep the
    original run's id), then the parent pipeline run's nested runs, then — for stages run one by one
    by ``dvc repro`` — the latest finished run with the same stage version (same code and settings).
    """
    found: dict[str, tuple[str, str]] = {}
    run_id, seen = evaluate_run_id, set()
    while run_id and run_id not in seen:
        seen.add(run_id)
        run = client.get_run(run_id)
        stage = run.data.tags.get("stage")
        if stage in stage_versions and stage not in found:
            found[stage] = (run_id, "upstream_run_id chain")
        run_id = run.data.tags.get("upstream_run_id") or None
    if parent_run_id:
        for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
            stage = run.data.tags.get("stage")
            if stage in stage_versions and stage not in found:
                found[stage] = (run.info.run_id, f"nested run of pipeline {parent_run_id}")
    for stage, version in stage_versions.items():
        if stage in found:
            continue
        runs = client.search_runs(
            [experiment_id],
            f"tags.stage = '{stage}' and tags.stage_version = '{version}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            found[stage] = (runs[0].info.run_id, f"latest finished run of stage version {version}")
    return found


def model_lineage(client, name: str, version: str) -> dict:
    """Everything a registered version records about where it came from."""
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    checkpoints: dict[str, dict[str, str]] = {}
    runs: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith("checkpoint."):
            _, stage, field = key.split(".", 2)
            checkpoints.setdefault(stage, {})[field] = value
        elif key.startswith("run."):
            stage = key.split(".", 1)[1]
            entry = {"run_id": value}
            try:
                run = client.get_run(value)
                entry.update(status=run.info.status, parent_checkpoint=run.data.tags.get("parent_checkpoint", ""))
            except Exception as exc:  # a deleted run must not hide the rest of the lineage
                entry["status"] = f"unavailable ({type(exc).__name__})"
            runs[stage] = entry
    params_artifact = f"runs:/{mv.run_id}/{PARAMS_ARTIFACT}" if mv.run_id else None
    if mv.run_id and not any(a.path == PARAMS_ARTIFACT for a in client.list_artifacts(mv.run_id, "config")):
        params_artifact = None
    return {
        "model": f"models:/{name}/{version}",
        "aliases": sorted(mv.aliases),
        "register_run_id": mv.run_id,
        "pipeline_run_id": tags.get("pipeline_run_id") or None,
        "curated_data_dvc_hash": tags.get("curated_data_dvc_hash", "unknown"),
        "git_commit": tags.get("git_commit", "unknown"),
        "params_hash": tags.get("params_hash", "unknown"),
        "params_artifact": params_artifact,
        "warm_start": tags.get("warm_start") or None,  # set by flows/retrain.py when training continued a champion
        "checkpoints": dict(sorted(checkpoints.items())),
        "runs": runs,
        "evaluation": {k: v for k, v in sorted(tags.items()) if k.startswith("eval")},
        "promotion": {k: v for k, v in sorted(tags.items()) if k.startswith("promotion")},
    }
