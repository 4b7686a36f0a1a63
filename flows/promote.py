"""Gated promotion in the MLflow registry: the registry side of ``easyanimate.promotion.decide``.

The challenger and the champion are scored on the same held-out set before they are compared:
stored metrics are used when they were computed on the current curated data (DVC hash) with the
current evaluation protocol; otherwise that side's pipeline is downloaded and re-evaluated.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from easyanimate.config import Settings
from easyanimate.promotion import Candidate, Decision, decide

REEVAL_TAG = "reevaluated.{data}.{protocol}"  # on a version: its metrics on another data/protocol, as JSON
TAG_VALUE_LIMIT = 5000  # MLflow's limit on a model-version tag value


def _bool(value: str | None) -> bool | None:
    return {"True": True, "False": False}.get(value or "")  # anything else: not recorded


def _eval_metrics(run_metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("eval.", "eval/", 1): float(v) for k, v in run_metrics.items() if k.startswith("eval.")}


def candidate_from_version(client: MlflowClient, name: str, version: str) -> Candidate:
    """The metrics logged on the version's run and the gate results and hashes tagged on the version."""
    mv = client.get_model_version(name, version)
    tags = mv.tags
    metrics = _eval_metrics(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    return Candidate(str(version), metrics, _bool(tags.get("data_gate_passed")), _bool(tags.get("eval_passed")),
                     tags.get("eval_reasons", "") if tags.get("eval_passed") != "True" else "",
                     tags.get("eval_data_dvc_hash", ""), tags.get("eval_protocol_hash", ""),
                     tags.get("eval_latent_space", ""))


def current_yardstick(settings: Settings) -> tuple[str, str]:
    """(DVC hash of the curated data, evaluation protocol hash) that every comparison uses now."""
    from easyanimate.evaluation.evaluate import evaluation_protocol_hash
    from easyanimate.lineage import dvc_hash

    manifest = settings.paths.curated / "manifest.parquet"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing: run `dvc pull` (or the curate stage) so challenger and "
                                f"champion are scored on the same held-out set (paths.curated)")
    return dvc_hash(settings.paths.curated), evaluation_protocol_hash(settings)


def on_yardstick(client: MlflowClient, settings: Settings, candidate: Candidate, yardstick: tuple[str, str],
                 workdir: Path, as_challenger: bool, dry_run: bool) -> tuple[Candidate, str]:
    """The candidate's metrics on the current held-out set: stored, cached from an earlier re-evaluation,
    or re-evaluated now from its registered pipeline."""
    from easyanimate.evaluation.evaluate import evaluate_pipeline

    data, protocol = yardstick
    if (candidate.data_hash, candidate.protocol_hash) == yardstick:
        return candidate, "stored metrics of its evaluation run"
    name = settings.registry.model_name
    cache_key = REEVAL_TAG.format(data=data, protocol=protocol)
    cached = client.get_model_version(name, candidate.version).tags.get(cache_key)
    if cached:
        entry = json.loads(cached)
        source = f"cached re-evaluation on data {data}"
    else:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{candidate.version}",
                                                         dst_path=str(workdir / f"v{candidate.version}")))
        pipeline_dir = next(local.rglob("model_index.json")).parent
        report = evaluate_pipeline(settings, pipeline_dir, settings.paths.curated, workdir / f"eval_v{candidate.version}")
        entry = {"metrics": report.metrics, "passed": report.passed, "reasons": report.reasons,
                 "latent_space": report.context.get("latent_space", "")}
        if not dry_run:
            client.set_model_version_tag(name, candidate.version, cache_key, json.dumps(entry)[:TAG_VALUE_LIMIT])
        source = f"re-evaluated on data {data} (stored metrics were on {candidate.data_hash or 'unknown data'})"
    updated = replace(candidate, metrics=entry["metrics"], data_hash=data, protocol_hash=protocol,
                      latent_space=entry.get("latent_space") or candidate.latent_space)
    if as_challenger:  # its evaluation gate is the one on the current held-out set
        updated = replace(updated, eval_gate_passed=entry["passed"], eval_reasons="; ".join(entry["reasons"]))
    return updated, source


def champion_version(client: MlflowClient, settings: Settings) -> str | None:
    try:
        return str(client.get_model_version_by_alias(settings.registry.model_name, settings.registry.champion_alias).version)
    except MlflowException:
        return None


def latest_version(client: MlflowClient, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(f"no registered versions of model {name!r} (registry.model_name)")
    return str(max(int(v.version) for v in versions))


def decision_tags(decision: Decision, challenger: Candidate, champion: Candidate | None, champion_source: str,
                  champion_before: str | None, settings: Settings) -> dict[str, str]:
    def dump(data) -> str:
        return json.dumps(data, sort_keys=True)[:TAG_VALUE_LIMIT]

    return {
        "promotion": (settings.registry.champion_alias if decision.promote
                      else f"rejected: {decision.reason}"[:TAG_VALUE_LIMIT]),
        "promotion.decision": decision.label,
        "promotion.reason": decision.reason[:TAG_VALUE_LIMIT],
        "promotion.champion_version": champion_before or "none",
        "promotion.challenger_metrics": dump(challenger.metrics),
        "promotion.champion_metrics": dump(champion.metrics if champion else {}),
        "promotion.champion_metrics_source": champion_source,
        "promotion.comparison": decision.comparison_json()[:TAG_VALUE_LIMIT],
        "promotion.margins": dump(settings.registry.promotion.model_dump()),
        "promotion.data_dvc_hash": challenger.data_hash,
        "promotion.protocol_hash": challenger.protocol_hash,
        "promotion.latent_space": challenger.latent_space,
        "promotion.champion_latent_space": champion.latent_space if champion else "",
    }


def promote_version(settings: Settings, version: str | None = None, dry_run: bool = False,
                    client: MlflowClient | None = None, samples: list[str] | None = None) -> dict:
    """Decide whether ``version`` (default: the latest) becomes champion; unless ``dry_run``, record it.

    The version gets the challenger alias; on promotion the champion alias moves to it and the old
    champion is tagged with its successor. The decision, both metric sets and the reason are tags.
    """
    from easyanimate.evaluation.report import promotion_markdown

    if client is None:
        from flows.common import setup_mlflow

        client = setup_mlflow(settings)
    reg = settings.registry
    name = reg.model_name
    version = str(version or latest_version(client, name))
    yardstick = current_yardstick(settings)
    with tempfile.TemporaryDirectory(prefix="easyanimate-promote-") as tmp:
        challenger, challenger_source = on_yardstick(client, settings, candidate_from_version(client, name, version),
                                                     yardstick, Path(tmp), as_challenger=True, dry_run=dry_run)
        current = champion_version(client, settings)
        champion, champion_source = None, "no champion"
        gates_passed = challenger.data_gate_passed is True and challenger.eval_gate_passed is True
        if current is not None and not gates_passed:
            champion_source = "not compared: the challenger failed a gate"
        elif current is not None and current != version:
            champion, champion_source = on_yardstick(client, settings, candidate_from_version(client, name, current),
                                                     yardstick, Path(tmp), as_challenger=False, dry_run=dry_run)
        elif current == version:
            champion, champion_source = challenger, challenger_source
    decision = decide(challenger, champion, reg.promotion)
    tags = decision_tags(decision, challenger, champion, champion_source, current, settings)
    tags["promotion.challenger_metrics_source"] = challenger_source
    if not dry_run:
        client.set_registered_model_alias(name, reg.challenger_alias, version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if decision.promote and current != version:
            client.set_registered_model_alias(name, reg.champion_alias, version)
            if current is not None:
                client.set_model_version_tag(name, current, "promotion.replaced_by", version)
    markdown = promotion_markdown(decision, challenger, champion, champion_source, samples or [], dry_run=dry_run)
    return {
        "model": name, "version": version, "promoted": decision.promote, "decision": decision.label,
        "reason": decision.reason, "champion_before": current,
        "champion_after": version if decision.promote else current, "dry_run": dry_run,
        "challenger_metrics": challenger.metrics, "champion_metrics": champion.metrics if champion else {},
        "champion_metrics_source": champion_source, "challenger_metrics_source": challenger_source,
        "markdown": markdown,
    }
