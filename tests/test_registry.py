"""The library registry (easyanimate.registry) against a real sqlite MLflow: lookups, downloads, clear
errors, and the register stage inside the stage runner's MLflow run. Stand-in files, no models."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from easyanimate.config import Settings, load_settings
from easyanimate.registry import (
    ModelNotFound,
    champion_version,
    download_pipeline,
    latest_version,
    lora_path,
    pipeline_folder,
)
from easyanimate.tracking import setup_mlflow
from tests.conftest import REPO

METRICS = {"eval/val_loss": 1.0, "eval/vae_psnr": 20.0, "eval/vae_ssim": 0.6, "eval/flicker": 0.1}


@pytest.fixture
def project(tmp_path, monkeypatch) -> tuple[Settings, MlflowClient]:
    previous = mlflow.get_tracking_uri()  # before chdir: a relative default would resolve into tmp_path
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in the temp dir
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = {
        "curated": "data/curated",
        "pipeline": "models/pipeline",
        "lora": "models/lora",
        "reports": "reports",
        "checkpoints": ".easyanimate/checkpoints",
        "cache": ".easyanimate/cache",
    }
    for stage in ("vae_stage1", "vae_stage2", "dit_stage1", "dit_stage2", "dit_stage3"):
        paths[stage] = f"models/{stage}"
    settings = load_settings(
        REPO / "params.yaml",
        overrides={
            "paths": {k: str(tmp_path / v) for k, v in paths.items()},
            "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
            "retrain": {"download_dir": str(tmp_path / "champions")},
            "lora": {"registered_model": "tiny-lora"},
        },
    )
    pipeline = settings.paths.pipeline
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "EasyAnimatePipeline"}')
    (pipeline / "vae" / "config.json").write_text("{}")
    yield settings, setup_mlflow(settings)
    mlflow.set_tracking_uri(previous)


def log_pipeline(settings: Settings) -> str:
    """``paths.pipeline`` as a new version of ``registry.model_name``, the way the register stage logs it."""
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc

    with mlflow.start_run(run_name="seed"):
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=EasyAnimatePyfunc(),
            artifacts={"pipeline": str(settings.paths.pipeline)},
            registered_model_name=settings.registry.model_name,
            pip_requirements=["easyanimate"],
        )
    return str(info.registered_model_version)


def test_champion_and_latest_version(project):
    settings, client = project
    name = settings.registry.model_name
    assert champion_version(client, settings) is None  # no registered model at all
    assert log_pipeline(settings) == "1" and log_pipeline(settings) == "2"
    assert champion_version(client, settings) is None  # versions, but no alias
    assert latest_version(client, name) == "2"
    client.set_registered_model_alias(name, settings.registry.champion_alias, "1")
    assert champion_version(client, settings) == "1"
    with pytest.raises(LookupError, match="no registered versions of model 'nope'"):
        latest_version(client, "nope")


def test_downloads_and_clear_errors_for_bad_uris(project, monkeypatch):
    settings, client = project
    name = settings.registry.model_name
    log_pipeline(settings)
    uri = settings.registry.tracking_uri
    folder = pipeline_folder(f"models:/{name}/1", uri)
    assert (folder / "model_index.json").read_text() == (settings.paths.pipeline / "model_index.json").read_text()
    assert (folder / "vae" / "config.json").is_file()

    cached = download_pipeline(settings, "1")  # retraining's copy: once, atomically, under retrain.download_dir
    assert cached.is_relative_to(settings.retrain.download_dir / f"{name}-v1") and (cached / "vae").is_dir()
    with monkeypatch.context() as patch:
        patch.setattr(mlflow.artifacts, "download_artifacts", lambda **_: pytest.fail("downloaded twice"))
        assert download_pipeline(settings, "1") == cached

    for bad in (f"models:/{name}/99", "models:/nope/1", f"models:/{name}@nosuchalias"):
        with pytest.raises(ModelNotFound) as caught:
            pipeline_folder(bad, uri)
        message = str(caught.value)
        assert message.startswith(f"{bad} cannot be downloaded from {uri}: ") and "\n" not in message, message
        assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, LookupError)
    with pytest.raises(ModelNotFound, match=rf"^models:/{name}/1 holds no LoRA adapter"):
        lora_path(f"models:/{name}/1", uri)
    with pytest.raises(FileNotFoundError, match="is not a pipeline folder"):
        pipeline_folder(settings.paths.pipeline / "vae")
    assert pipeline_folder(settings.paths.pipeline) == settings.paths.pipeline


def _evaluated(settings: Settings) -> None:
    """What the curate and evaluate stages leave for register: a curated folder with its gate, and the
    evaluate reports, scored on the current data and protocol (so promotion re-evaluates nothing)."""
    import torch
    from safetensors.torch import save_file

    from easyanimate.evaluation.evaluate import evaluation_protocol_hash
    from easyanimate.lineage import dvc_hash
    from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME
    from easyanimate.stages import report_dir

    curated = settings.paths.curated
    curated.mkdir(parents=True)
    (curated / "manifest.parquet").write_bytes(b"stand-in: only hashed")
    (curated / "gate.json").write_text(json.dumps({"success": True, "failures": []}))
    evaluation = report_dir(settings, "evaluate")
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text(json.dumps(METRICS))
    (evaluation / "gate.json").write_text(json.dumps({"passed": True, "reasons": [], "skipped": {}}))
    (evaluation / "eval_context.json").write_text(
        json.dumps(
            {
                "data_dvc_hash": dvc_hash(curated),
                "protocol_hash": evaluation_protocol_hash(settings),
                "latent_space": "z1",
                "val_clip_ids": ["clip01"],
            }
        )
    )
    settings.paths.lora.mkdir(parents=True)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.target_modules": ["to_q"]}
    save_file(
        {"transformer.w": torch.zeros(2)},
        str(settings.paths.lora / LORA_WEIGHT_NAME),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)},
    )


def test_register_stage_works_inside_the_stage_run(project):
    from easyanimate.stages import report_dir, run_stage

    settings, client = project
    name = settings.registry.model_name
    _evaluated(settings)
    with mlflow.start_run(run_name="pipeline") as parent:
        pid = parent.info.run_id
        result = run_stage("register", settings, track=True, parent_run_id=pid)
        assert mlflow.active_run().info.run_id == pid  # the stage's runs are closed again
    info = result.info
    assert (info["version"], info["alias"], info["promoted"]) == ("1", "champion", True)
    assert info["promotion_reason"] == "first version whose gates passed" and info["champion_version"] == "1"
    assert result.metrics == {"register/version": 1.0, "register/promoted": 1.0}
    assert result.markdown["promotion"][0] == f"models:/{name}/1: challenger vs champion"

    # One register run, the stage runner's: the version was logged in it, its metrics logged once.
    children = {
        r.info.run_name: r
        for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    }
    assert set(children) == {"register", "register_lora"}
    register = children["register"]
    assert register.info.run_id == result.run_id == info["run_id"] and register.data.tags["stage"] == "register"
    assert client.get_model_version(name, "1").run_id == register.info.run_id
    assert len(client.get_metric_history(register.info.run_id, "register.version")) == 1
    assert client.get_model_version(name, "1").tags["pipeline_run_id"] == pid
    # The adapter's run sits beside it under the pipeline run, and follows its base to @champion.
    assert info["lora_model"]["alias"] == "champion" and info["lora_model"]["version"] == "1"
    assert client.get_model_version_by_alias("tiny-lora", "champion").tags["lora_rank"] == "4"

    out = report_dir(settings, "register")
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    assert json.loads((out / "registered.json").read_text())["uri"] == f"models:/{name}/1"
    assert "PROMOTED" in (out / "promotion.md").read_text()

    # The same inputs again (a rerun after a kill, or with nothing changed): the finished version is reused.
    same = run_stage("register", settings)
    assert same.info["version"] == "1" and len(client.search_model_versions(f"name = '{name}'")) == 1

    # New inputs (a re-evaluation); untracked, with no run open: the entry opens its own register run.
    metrics_file = report_dir(settings, "evaluate") / "metrics.json"
    metrics_file.write_text(json.dumps({**METRICS, "eval/caption_retrieval": 0.5}))
    again = run_stage("register", settings)
    assert mlflow.active_run() is None
    assert (again.info["version"], again.info["promoted"]) == ("2", False)
    assert again.info["promotion_reason"].startswith("not better than champion v1")
    run = client.get_run(again.run_id)
    assert run.data.tags["stage"] == "register" and run.data.metrics["register.version"] == 2.0
    assert client.get_model_version(name, "2").run_id == again.run_id
    assert champion_version(client, settings) == "1"

    # A version whose tagging a kill cut short (no completion tag, no alias yet) is replaced, not reused.
    from easyanimate.registry import REGISTERED_TAG

    client.delete_model_version_tag(name, "2", REGISTERED_TAG)
    client.delete_registered_model_alias(name, settings.registry.challenger_alias)
    redone = run_stage("register", settings)
    assert redone.info["version"] == "3"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")) == [1, 3]
