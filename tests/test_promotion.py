"""Gated promotion: the pure rule, then the real registry with good, degraded and better tiny models."""

from __future__ import annotations

import json
import math

import pytest

from easyanimate.config import PromotionConfig
from easyanimate.promotion import Candidate, decide

POLICY = PromotionConfig()
BASE = {"eval/val_loss": 1.0, "eval/vae_psnr": 20.0, "eval/vae_ssim": 0.6, "eval/flicker": 0.1}


def cand(version: str, data_gate=True, eval_gate=True, data="d1", protocol="p1", latent="z1", **metrics) -> Candidate:
    return Candidate(
        version,
        {**BASE, **{f"eval/{k}": v for k, v in metrics.items()}},
        data_gate,
        eval_gate,
        "" if eval_gate else "eval/val_loss 9 > evaluate.max_val_loss 1.5",
        data,
        protocol,
        latent,
    )


# ------------------------------------------------------------------------------------------ the rule
def test_first_version_is_promoted_only_when_its_gates_pass():
    assert decide(cand("1"), None, POLICY).promote
    failed = decide(cand("1", eval_gate=False), None, POLICY)
    assert not failed.promote and "evaluation gate failed" in failed.reason and "max_val_loss" in failed.reason
    assert "data quality gate failed" in decide(cand("1", data_gate=False), None, POLICY).reason
    assert "not recorded" in decide(cand("1", data_gate=None), None, POLICY).reason


def test_challenger_must_improve_a_primary_metric_by_its_margin():
    champion = cand("1")
    same = decide(cand("2"), champion, POLICY)
    assert not same.promote and same.reason.startswith("not better than champion v1")
    better = decide(cand("2", val_loss=0.9), champion, POLICY)
    assert better.promote and "eval/val_loss better by 0.1" in better.reason
    assert decide(cand("2", vae_psnr=21.0), champion, POLICY).promote  # a better VAE alone counts
    strict = PromotionConfig(min_val_loss_decrease=0.2)
    assert not decide(cand("2", val_loss=0.9), champion, strict).promote
    assert decide(cand("2", val_loss=0.7), champion, strict).promote


def test_regression_beyond_tolerance_blocks_even_with_improvement():
    champion = cand("1")
    worse_psnr = decide(cand("2", val_loss=0.5, vae_psnr=19.0), champion, POLICY)
    assert not worse_psnr.promote
    assert "eval/vae_psnr worse by 1 > registry.promotion.max_psnr_drop 0.5" in worse_psnr.reason
    within = decide(cand("2", val_loss=0.5, vae_psnr=19.8, flicker=0.14), champion, POLICY)
    assert within.promote
    flicker = decide(cand("2", val_loss=0.5, flicker=0.2), champion, POLICY)
    assert not flicker.promote and "max_flicker_increase" in flicker.reason
    rows = {r.metric: r for r in flicker.comparisons}
    assert rows["eval/flicker"].gain == pytest.approx(-0.1) and not rows["eval/flicker"].within_tolerance


def test_metrics_from_different_data_or_protocol_are_never_compared():
    result = decide(cand("2", val_loss=0.1, data="d2"), cand("1"), POLICY)
    assert not result.promote and "not comparable" in result.reason
    assert not decide(cand("2", val_loss=0.1, protocol="p2"), cand("1"), POLICY).promote


def test_val_loss_is_compared_only_between_versions_sharing_a_vae_latent_space():
    """A DiT val loss lives in its own VAE's latent space: across different VAEs a lower loss proves nothing."""
    champion = cand("1")
    other_vae = decide(cand("2", latent="z2", val_loss=0.5), champion, POLICY)
    assert (
        not other_vae.promote
        and "eval/val_loss not compared: the versions' VAEs encode differently" in other_vae.reason
    )
    assert "min_psnr_gain" in other_vae.reason and "min_val_loss_decrease" not in other_vae.reason
    row = {r.metric: r for r in other_vae.comparisons}["eval/val_loss"]
    assert not row.comparable and row.gain is None and row.within_tolerance
    # Nor does a worse val loss block a new VAE that is better in pixel space.
    better_vae = decide(cand("2", latent="z2", val_loss=3.0, vae_psnr=21.0), champion, POLICY)
    assert better_vae.promote and "eval/vae_psnr better by 1" in better_vae.reason
    assert "not compared" in better_vae.reason
    # Unrecorded latent space (versions registered before it was tagged): never assumed equal.
    assert not decide(cand("2", latent="", val_loss=0.5), cand("1", latent=""), POLICY).promote
    assert decide(cand("2", val_loss=0.5), champion, POLICY).promote


def test_promotion_report_marks_latent_metrics_not_compared():
    from easyanimate.evaluation.report import promotion_markdown

    challenger, champion = cand("2", latent="z2", vae_psnr=21.0), cand("1")
    md = promotion_markdown(decide(challenger, champion, POLICY), challenger, champion, "stored metrics")
    assert "| eval/val_loss | 1 | 1 | | | not compared: different VAE latent spaces |" in md


def test_missing_or_non_finite_champion_metrics_are_not_compared():
    champion = Candidate("1", {"eval/val_loss": 1.0}, True, True, "", "d1", "p1", "z1")
    result = decide(cand("2", val_loss=0.9), champion, POLICY)
    assert result.promote
    assert {r.metric: r.gain for r in result.comparisons}["eval/vae_psnr"] is None
    nan_champion = Candidate("1", {**BASE, "eval/val_loss": math.nan}, True, True, "", "d1", "p1", "z1")
    assert not decide(cand("2"), nan_champion, POLICY).promote  # nothing comparable improved


def test_promotion_report_has_comparison_table():
    from easyanimate.evaluation.report import promotion_markdown

    challenger, champion = cand("2", val_loss=0.9, flicker=0.12), cand("1")
    md = promotion_markdown(
        decide(challenger, champion, POLICY),
        challenger,
        champion,
        "stored metrics",
        ["/x/sample_0.gif", "/x/sample_0.mp4"],
    )
    assert "PROMOTED" in md and "| metric | challenger v2 | champion v1 | gain | tolerance | ok |" in md
    assert "| **eval/val_loss** | 0.9 | 1 | 0.1 | 0.01 (registry.promotion.max_val_loss_increase) | improved |" in md
    assert "![sample_0](/x/sample_0.gif)" in md and "sample_0.mp4" not in md


# ------------------------------------------------------------------------------- the real registry
@pytest.mark.slow
def test_registry_promotion_with_degraded_and_better_models(tmp_path, monkeypatch):
    """v1 (slightly noisy DiT) → champion; v2 (DiT swamped by noise: fails the evaluation gate) and v3
    (noisier DiT: passes the gate, worse than v1) → rejected, tags say why; v4 (clean DiT: lower val
    loss) → champion. Then the held-out data changes and re-promoting v3 re-evaluates both sides on it. Stages are the real ones; stage runs are nested in a pipeline run."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from easyanimate.cli import app
    from easyanimate.lineage import dvc_hash, model_lineage
    from easyanimate.registry import promote_version, register_pipeline
    from easyanimate.stages import run_stage
    from easyanimate.tracking import stage_run
    from tests.test_evaluation import make_curated, save_tiny_models, tiny_settings

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the temp dir
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    curated = make_curated(tmp_path / "data" / "curated", ["train", "val", "train", "val"])
    settings = tiny_settings(tmp_path, curated)
    mlflow.set_tracking_uri(settings.registry.tracking_uri)
    mlflow.set_experiment(settings.registry.experiment)
    client = MlflowClient()
    name = settings.registry.model_name

    def build_register_promote(settings, dit_noise: float, lineage_runs: bool = False) -> dict:
        save_tiny_models(settings, dit_noise=dit_noise)
        if not lineage_runs:
            run_stage("evaluate", settings, show_progress=False)
            register_pipeline(settings, client)
            return promote_version(settings, client=client)
        with mlflow.start_run(run_name="pipeline") as parent:
            pid, upstream = parent.info.run_id, ""
            for stage in ("curate", "vae_stage1", "vae_stage2", "dit_stage1", "dit_stage2", "dit_stage3"):
                with stage_run(settings, stage, pid, upstream_run_id=upstream) as run:
                    if stage == "dit_stage3":
                        mlflow.set_tag("parent_checkpoint", str(settings.paths.dit_stage2))
                upstream = run.info.run_id
            with stage_run(settings, "lora", pid, upstream_run_id=upstream):
                pass
            with stage_run(settings, "evaluate", pid, upstream_run_id=upstream) as run:
                run_stage("evaluate", settings, show_progress=False)
            evaluate_run = run.info.run_id
            registered = register_pipeline(settings, client, pid, evaluate_run)
            outcome = promote_version(settings, registered["version"], client=client)
        return {**outcome, "pipeline_run": pid, "evaluate_run": evaluate_run}

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}

    v1 = build_register_promote(settings, dit_noise=0.05, lineage_runs=True)
    assert v1["promoted"] and v1["reason"] == "first version whose gates passed"
    assert aliases() == {"champion": "1", "challenger": "1"}

    # Deliberately degraded models. v2: DiT weights swamped by unit Gaussian noise — its held-out loss
    # fails the evaluation gate, so it is never even compared.
    v2 = build_register_promote(settings, dit_noise=1.0)
    tags = client.get_model_version(name, "2").tags
    assert not v2["promoted"] and aliases() == {"champion": "1", "challenger": "2"}
    assert tags["promotion.decision"] == "rejected" and tags["promotion"].startswith("rejected: ")
    assert tags["promotion.reason"].startswith("evaluation gate failed: eval/val_loss")
    assert "evaluate.max_val_loss" in tags["promotion.reason"] and tags["eval_passed"] == "False"
    assert tags["promotion.champion_version"] == "1"
    assert json.loads(tags["promotion.challenger_metrics"])["eval/val_loss"] > settings.evaluate.max_val_loss

    # v3: noisier DiT that still passes the loose gate, but is worse than the champion beyond the margin.
    v3 = build_register_promote(settings, dit_noise=0.2)
    tags = client.get_model_version(name, "3").tags
    assert not v3["promoted"] and aliases() == {"champion": "1", "challenger": "3"}
    assert tags["eval_passed"] == "True"
    assert tags["promotion.latent_space"] == tags["promotion.champion_latent_space"] == tags["eval_latent_space"] != ""
    assert tags["promotion.reason"].startswith("regression: eval/val_loss worse by")
    assert "registry.promotion.max_val_loss_increase 0.01" in tags["promotion.reason"]
    assert json.loads(tags["promotion.champion_metrics"])["eval/val_loss"] == pytest.approx(
        v1["challenger_metrics"]["eval/val_loss"]
    )
    assert tags["promotion.champion_metrics_source"] == "stored metrics of its evaluation run"
    comparison = {row["metric"]: row for row in json.loads(tags["promotion.comparison"])}
    assert not comparison["eval/val_loss"]["within_tolerance"] and comparison["eval/vae_psnr"]["gain"] == 0

    # v4, a better model: the clean DiT (zero-initialised output) has a lower held-out loss than v1's noisy one.
    v4 = build_register_promote(settings, dit_noise=0.0)
    assert v4["promoted"], v4["reason"]
    assert v4["reason"].startswith("better than champion v1: eval/val_loss better by")
    assert aliases() == {"champion": "4", "challenger": "4"}
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "4"
    assert client.get_run(client.get_model_version(name, "4").run_id).data.metrics["eval.val_loss"] == pytest.approx(
        v4["challenger_metrics"]["eval/val_loss"]
    )

    # By hand: a dry run decides without touching aliases or tags; v3 stays rejected.
    before = client.get_model_version(name, "3").tags
    runner = CliRunner()
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(settings.model_dump(mode="json")))
    result = runner.invoke(app, ["promote", "--version", "3", "--dry-run", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "[dry run] models:/easyanimate/3 rejected" in result.output
    assert "| metric | challenger v3 | champion v4" in result.output
    assert client.get_model_version(name, "3").tags == before and aliases()["champion"] == "4"

    # Lineage of v1: data, code, params, parent checkpoints and every stage run of its pipeline run.
    info = model_lineage(client, name, "1")
    assert info["curated_data_dvc_hash"] == dvc_hash(curated) and info["pipeline_run_id"] == v1["pipeline_run"]
    assert info["params_hash"] == settings.section_hash()
    assert set(info["runs"]) == {
        "curate",
        "vae_stage1",
        "vae_stage2",
        "dit_stage1",
        "dit_stage2",
        "dit_stage3",
        "lora",
        "evaluate",
    }
    assert info["runs"]["evaluate"]["run_id"] == v1["evaluate_run"]
    assert info["checkpoints"]["dit_stage3"]["parent"] == str(settings.paths.dit_stage2)
    assert info["checkpoints"]["dit_stage3"]["dvc_hash"].endswith(".dir")
    assert info["checkpoints"]["vae_stage2"]["parent"] == str(settings.paths.vae_stage1)
    assert info["params_artifact"] is None  # no params.yaml in this project's folder
    result = runner.invoke(app, ["lineage", "models:/easyanimate/1", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert dvc_hash(curated) in result.output and v1["evaluate_run"] in result.output
    assert "dit_stage3" in result.output and "promoted: first version" in result.output
    assert runner.invoke(app, ["lineage", "models:/easyanimate", "--params", str(params)]).exit_code == 2

    # New held-out data: both sides' stored metrics are on the old set, so both are re-evaluated on the
    # new one (and the re-evaluation is cached on each version); the degraded v3 still loses.
    curated2 = make_curated(tmp_path / "data" / "curated2", ["val", "train", "val", "train"])
    settings2 = tiny_settings(tmp_path, curated2)
    again = promote_version(settings2, "3", client=client)
    new_hash = dvc_hash(curated2)
    assert again["champion_metrics_source"].startswith(f"re-evaluated on data {new_hash}")
    assert again["challenger_metrics_source"].startswith(f"re-evaluated on data {new_hash}")
    # Really rescored: other clips reconstruct differently (the clean DiT's loss is data-independent).
    assert again["champion_metrics"]["eval/vae_psnr"] != pytest.approx(v4["challenger_metrics"]["eval/vae_psnr"])
    assert not again["promoted"] and aliases()["champion"] == "4"
    tags = client.get_model_version(name, "3").tags
    assert tags["promotion.data_dvc_hash"] == new_hash and tags["eval_data_dvc_hash"] == dvc_hash(curated)
    cached = [k for k in client.get_model_version(name, "4").tags if k.startswith(f"reevaluated.{new_hash}")]
    assert len(cached) == 1
    assert promote_version(settings2, "3", client=client, dry_run=True)["champion_metrics_source"].startswith(
        "cached re-evaluation"
    )
