"""Retraining against a real ``mlflow server`` on loopback: nothing may assume a local file store.

The server keeps runs in sqlite and artifacts in its own folder (``--artifacts-destination``, served
through the server like the MinIO store of infra/docker-compose.yml). A champion is registered there
first; the retrain flow then resolves ``@champion`` and downloads it over HTTP, warm-starts VAE and
DiT stage 1 from it, and registers the next version on the server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_deployments import free_port, kill_group, make_deploy_project, project_env, run_bounded, wait_healthy

pytestmark = pytest.mark.slow
CHAMPION_SEED = 12345  # anything but the training seed, so a warm start is told apart from a fresh model


def register_champion(settings, work: Path, tracking_uri: str) -> str:
    """An untrained pipeline of the configured architecture, registered as ``@champion`` on the server."""
    import mlflow

    from easyanimate.config import resolve_weight_path
    from easyanimate.evaluation.evaluate import assemble_pipeline
    from easyanimate.models.text_encoder import load_text_encoder
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc
    from easyanimate.training.dit import build_transformer
    from easyanimate.training.vae import build_vae

    _, encoder = load_text_encoder(resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder"))
    torch.manual_seed(CHAMPION_SEED)
    build_vae(settings).save_pretrained(work / "vae")
    build_transformer(settings, settings.vae.model.latent_channels, encoder.config.hidden_size).save_pretrained(
        work / "dit"
    )
    pipeline = assemble_pipeline(settings, work / "vae", work / "dit", work / "pipeline")

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(settings.registry.experiment)
    name = settings.registry.model_name
    with mlflow.start_run(run_name="seed-champion"):
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=EasyAnimatePyfunc(),
            artifacts={"pipeline": str(pipeline)},
            registered_model_name=name,
            pip_requirements=["easyanimate"],
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(name, settings.registry.champion_alias, version)
    return version


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_retrain_against_a_real_mlflow_server_continues_from_the_champion(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from easyanimate.config import load_settings
    from easyanimate.training.vae import build_vae

    project = make_deploy_project(tmp_path / "project", new_video=False)
    settings = load_settings(project / "params.yaml")
    server_dir = tmp_path / "mlflow-server"
    artifacts = server_dir / "artifacts"
    server_dir.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(server_dir / "server.log", "w")  # a file, not a pipe nobody reads: a full pipe stalls the server
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{server_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(artifacts),
        ],
        cwd=server_dir,
        env=project_env(project),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    previous_uri = mlflow.get_tracking_uri()
    try:
        wait_healthy(f"{uri}/health", server, timeout=120)
        champion = register_champion(settings, tmp_path / "champion", uri)
        assert champion == "1"

        proc = run_bounded(
            [sys.executable, "-c", "from flows.retrain import retrain_flow; retrain_flow(version_data=False)"],
            cwd=project,
            env=project_env(project, MLFLOW_TRACKING_URI=uri),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

        client = MlflowClient(tracking_uri=uri)
        name = settings.registry.model_name
        new = client.get_model_version(name, "2")
        assert new.tags["warm_start"] == f"models:/{name}/1"
        register_run = client.get_run(new.run_id)
        parent = client.get_run(register_run.data.tags["mlflow.parentRunId"])
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must go through the server"
        assert parent.data.tags["retrain.new_videos"] == "none"  # bigbuckbunny.mp4 was curated before
        children = {
            r.info.run_name: r
            for r in client.search_runs(
                [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
            )
        }
        champion_dir = project / ".easyanimate" / "champions" / f"{name}-v1"
        for stage, component in (("vae_stage1", "vae"), ("dit_stage1", "transformer")):
            assert children[stage].data.tags["parent_checkpoint"].endswith(f"/{component}"), stage
            assert children[stage].data.tags["parent_checkpoint"].startswith(str(champion_dir)), stage
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/2", dst_path=str(tmp_path / "v2"), tracking_uri=uri
            )
        )
        assert list(downloaded.rglob("model_index.json")), "the new version's pipeline is on the server"
    finally:
        mlflow.set_tracking_uri(previous_uri)
        kill_group(server)
        log.close()

    # Nothing went to a local store: no sqlite file, no mlruns/ or mlartifacts/ in the project.
    for local in ("mlflow.db", "mlruns", "mlartifacts"):
        assert not (project / local).exists(), local
    assert sum(1 for _ in artifacts.rglob("model_index.json")) >= 2  # champion + new version, on the server's side

    # Warm start: a few small steps away from the champion; a fresh model is nowhere near it.
    champion_pipeline = next(champion_dir.rglob("model_index.json")).parent
    champion_vae = load_weights(champion_pipeline / "vae")
    assert max_difference(load_weights(project / "models" / "vae" / "stage1"), champion_vae) < 0.02
    assert (
        max_difference(
            load_weights(project / "models" / "dit" / "stage1"), load_weights(champion_pipeline / "transformer")
        )
        < 0.02
    )
    torch.manual_seed(settings.vae.stage1.seed)  # what VAE stage 1 builds when it starts from scratch
    assert max_difference(build_vae(settings).state_dict(), champion_vae) > 0.1
