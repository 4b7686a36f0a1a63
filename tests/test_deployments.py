"""Deployments and scheduled retraining: prefect.yaml, infra/, warm start from the champion, incremental curation.

The slow test runs what an operator runs: a real Prefect server on a free loopback port
(``infra/prefect_local.sh up``), the deployments from ``prefect.yaml``, ``prefect deployment run
retrain/weekly`` and a process worker ``--run-once``, in a throwaway copy of the project.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent
POOL = "easyanimate-process"
# test_e2e's FAST cut further: these tests prove the wiring, not the models.
STEPS = {
    "vae": {"stage1": {"steps": 2, "checkpoint_every": 100}, "stage2": {"steps": 1}},
    "dit": {"stage1": {"steps": 2}, "stage2": {"steps": 1}, "stage3": {"steps": 1}},
    "lora": {"train": {"steps": 1}},
    "generate": {"num_inference_steps": 2},
}
# A short real video cut from the trailer, arriving after the first curation; captioned in the sidecar.
NEW_VIDEO = {
    "name": "new_rabbit.mp4",
    "source": "trailer_bbb.mp4",
    "start": 25.0,
    "duration": 4.2,
    "caption": "a big grey rabbit stretches in front of his burrow on a sunny hill",
}


def deploy_params() -> dict:
    from tests.test_e2e import FAST, _merge

    return _merge(_merge(yaml.safe_load((REPO / "params.yaml").read_text()), FAST), STEPS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def kill_group(proc: subprocess.Popen | None) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_bounded(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` that, on timeout, also stops grandchildren (Prefect's ephemeral server) holding the pipes."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@functools.cache
def curated_seed() -> Path:
    """``bigbuckbunny.mp4`` curated once per session (records + clips), as ``dvc pull data/curated`` would restore it."""
    from easyanimate.config import load_settings
    from easyanimate.data.curate import curate_dataset

    root = Path(tempfile.mkdtemp(prefix="easyanimate-seed-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "raw").mkdir()
    shutil.copy(REPO / "data" / "samples" / "bigbuckbunny.mp4", root / "raw")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(deploy_params()))
    settings = load_settings(
        params, overrides={"paths": {"captions": str(REPO / "data" / "samples" / "captions.yaml")}}
    )
    curate_dataset(root / "raw", root / "curated", settings, progress=False)
    return root / "curated"


def make_deploy_project(root: Path, new_video: bool) -> Path:
    """test_e2e's throwaway project plus prefect.yaml and infra/, with bigbuckbunny.mp4 already curated."""
    from tests.test_e2e import make_project

    project = make_project(root, deploy_params(), ["bigbuckbunny.mp4"])
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    shutil.copytree(REPO / "infra", project / "infra")
    shutil.copytree(curated_seed(), project / "data" / "curated", ignore=shutil.ignore_patterns("manifest.parquet"))
    if new_video:
        from imageio_ffmpeg import get_ffmpeg_exe

        samples = project / "data" / "samples"
        subprocess.run(
            [
                get_ffmpeg_exe(),
                "-v",
                "error",
                "-ss",
                str(NEW_VIDEO["start"]),
                "-i",
                str(REPO / "data" / "samples" / NEW_VIDEO["source"]),
                "-t",
                str(NEW_VIDEO["duration"]),
                "-an",
                "-c:v",
                "libx264",
                "-crf",
                "20",
                str(samples / NEW_VIDEO["name"]),
            ],
            check=True,
            timeout=120,
        )
        captions = yaml.safe_load((samples / "captions.yaml").read_text())
        captions.append(
            {"file": NEW_VIDEO["name"], "start": 0.0, "end": NEW_VIDEO["duration"], "caption": NEW_VIDEO["caption"]}
        )
        (samples / "captions.yaml").write_text(yaml.safe_dump(captions, sort_keys=False))
    return project


def project_env(project: Path, **extra: str) -> dict:
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        EASYANIMATE_STATE_DIR=str(project / ".easyanimate"),
        PREFECT_HOME=str(project / ".easyanimate" / "prefect"),
        **extra,
    )
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "EASYANIMATE_PARAMS"):
        if key not in extra:
            env.pop(key, None)
    return env


# ------------------------------------------------------------------------------------ fast checks
def test_prefect_yaml_declares_networkless_deployments_of_real_flows():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"weekly", "new-raw-data", "on-demand"}
    expected_flow = {"weekly": "retrain", "new-raw-data": "curate", "on-demand": "stage"}
    assert deployments["on-demand"]["parameters"] == {"name": "evaluate"}
    for name, deployment in deployments.items():
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        assert isinstance(flow, Flow) and flow.name == expected_flow[name], name
        assert deployment["work_pool"]["name"] == POOL
    cron = deployments["weekly"]["schedules"][0]["cron"].split()
    assert len(cron) == 5 and cron[2:4] == ["*", "*"] and cron[4] != "*", "retrain must run weekly by default"
    steps = [next(iter(step)) for step in spec["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"], "no pull step may fetch code"
    assert "prefect_local.sh" in (REPO / "Makefile").read_text()


def test_compose_reads_every_setting_from_the_environment():
    compose = (REPO / "infra" / "docker-compose.yml").read_text()
    services = yaml.safe_load(compose)["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "minio-buckets"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--artifacts-destination s3://" in services["mlflow"]["command"]
    used = set(re.findall(r"\$\{(\w+)(?::?[-?][^}]*)?\}", compose))  # ${VAR}, ${VAR:?message}, ${VAR:-default}
    defined = {
        line.split("=", 1)[0]
        for line in (REPO / "infra" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= defined, f"not in infra/.env.example: {sorted(used - defined)}"
    assert not re.search(r"PASSWORD:[ \t]+[^$\s]", compose), "passwords come from the environment only"
    ports = [p for service in services.values() for p in service.get("ports", [])]
    assert ports and all(p.startswith("${INFRA_BIND}:") for p in ports), ports
    assert "INFRA_BIND=127.0.0.1" in (REPO / "infra" / ".env.example").read_text().splitlines()


def test_warm_start_checks_the_architecture(tmp_path):
    import torch

    from easyanimate.config import load_settings
    from easyanimate.stages import warm_start_dir
    from easyanimate.training.dit import build_transformer
    from easyanimate.training.vae import build_vae
    from easyanimate.warm_start import warm_start_mismatches

    settings = load_settings(REPO / "params.yaml")
    pipeline = tmp_path / "champion"
    with torch.device("meta"):
        build_vae(settings).save_config(pipeline / "vae")
        build_transformer(settings, settings.vae.model.latent_channels, 384).save_config(pipeline / "transformer")
    assert warm_start_mismatches(settings, pipeline) == []
    # A trained champion's fitted scaling factor and its tile/slice sizes are not architecture.
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    vae_config.update(scaling_factor=0.61, tile_sample_size=512, decoder_slice_latents=4)
    (pipeline / "vae" / "config.json").write_text(json.dumps(vae_config))
    assert warm_start_mismatches(settings, pipeline) == []
    wider = load_settings(REPO / "params.yaml", overrides={"dit": {"model": {"hidden_size": 96}}})
    problems = warm_start_mismatches(wider, pipeline)
    assert len(problems) == 1 and problems[0].startswith("dit.model: transformer.hidden_size is 64")
    assert warm_start_mismatches(settings, tmp_path / "nothing")[0].endswith("config.json is missing")

    assert warm_start_dir("vae_stage1", settings) is None  # the pipeline trains from scratch
    warm = load_settings(REPO / "params.yaml", overrides={"retrain": {"init_pipeline": str(pipeline)}})
    assert warm_start_dir("vae_stage1", warm) == pipeline / "vae"
    assert warm_start_dir("dit_stage1", warm) == pipeline / "transformer"
    assert warm_start_dir("vae_stage2", warm) is None and warm_start_dir("dit_stage2", warm) is None


def test_new_champion_is_a_new_input_of_the_first_stages(tmp_path, monkeypatch):
    from easyanimate.config import load_settings
    from easyanimate.stages import stage_inputs_hash

    monkeypatch.chdir(tmp_path)  # the stages' own inputs (relative paths) do not exist here

    a, b = tmp_path / "a", tmp_path / "b"
    for root, value in ((a, 1), (b, 2)):
        for component in ("vae", "transformer"):
            (root / component).mkdir(parents=True)
            (root / component / "weights.bin").write_bytes(bytes([value]))
    base = load_settings(REPO / "params.yaml")
    at = {p: load_settings(REPO / "params.yaml", overrides={"retrain": {"init_pipeline": str(p)}}) for p in (a, b)}
    for stage in ("vae_stage1", "dit_stage1"):
        hashes = {stage_inputs_hash(stage, base), stage_inputs_hash(stage, at[a]), stage_inputs_hash(stage, at[b])}
        assert len(hashes) == 3, stage
    # Later stages see the champion only through their inputs' content, never through the setting.
    assert stage_inputs_hash("vae_stage2", base) == stage_inputs_hash("vae_stage2", at[a])


# ------------------------------------------------------------------------------------ slow: real server
def _api(url: str, path: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()  # a body makes it a POST (the filter endpoints)
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_retrain_deployment_runs_on_a_local_server_and_registers_a_version(tmp_path):
    project = make_deploy_project(tmp_path / "project", new_video=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = project_env(project, PREFECT_PORT=str(port), PREFECT_API_URL=api)
    seeded = {p.name: p.stat().st_mtime_ns for p in (project / "data" / "curated" / "records").iterdir()}
    assert len(seeded) == 1
    worker = None
    try:
        up = run_bounded(["bash", "infra/prefect_local.sh", "up"], project, env, timeout=240)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # Any command in this workspace adopts the running server instead of starting a temporary one.
        adopt = "import os; from easyanimate.runtime import configure_environment as c; c(); print(os.environ['PREFECT_API_URL'])"
        own_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        adopted = run_bounded([sys.executable, "-c", adopt], project, own_env, timeout=60)
        assert adopted.stdout.strip() == api, adopted.stderr
        deployments = _api(api, "/deployments/filter", {})
        by_name = {d["name"]: d for d in deployments}
        assert set(by_name) == {"weekly", "new-raw-data", "on-demand"}
        assert by_name["weekly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
        assert by_name["weekly"]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
        ]

        run = run_bounded([str(BIN / "prefect"), "deployment", "run", "retrain/weekly"], project, env, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", run.stdout).group(1)

        worker = subprocess.Popen(
            ["bash", "infra/prefect_local.sh", "worker", "--run-once"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        out, _ = worker.communicate(timeout=420)
        state = _api(api, f"/flow_runs/{flow_run_id}")["state"]
        assert state["type"] == "COMPLETED", f"{state}\n{out[-6000:]}"
    finally:
        kill_group(worker)
        subprocess.run(
            ["bash", "infra/prefect_local.sh", "down"], cwd=project, env=env, capture_output=True, timeout=60
        )
    assert not (project / ".easyanimate" / "prefect-server.url").exists()

    # Incremental curation: the new video got a record, the already-curated one was not redone.
    records = {p.name: p.stat().st_mtime_ns for p in (project / "data" / "curated" / "records").iterdir()}
    assert len(records) == 2 and all(records[name] == mtime for name, mtime in seeded.items())
    import pandas as pd

    manifest = pd.read_parquet(project / "data" / "curated" / "manifest.parquet")
    assert set(manifest["source"]) == {"bigbuckbunny.mp4", NEW_VIDEO["name"]}

    from tests.test_e2e import mlflow_client

    client = mlflow_client(project)
    versions = client.search_model_versions("name = 'easyanimate'")
    assert len(versions) == 1, "the registry had no model before the scheduled run"
    version = versions[0]
    assert version.tags["warm_start"] == "scratch: no models:/easyanimate@champion yet"
    parent = client.get_run(client.get_run(version.run_id).data.tags.get("mlflow.parentRunId") or version.run_id)
    assert parent.data.tags["retrain.new_videos"] == NEW_VIDEO["name"]
    assert (project / ".easyanimate" / "dvc-remote").is_dir(), "the run versioned its outputs with DVC"


def test_sidecar_fingerprint_is_per_video_so_new_captions_do_not_redo_curated_videos():
    from easyanimate.data.captioners.sidecar import CaptionEntry, SidecarCaptioner

    old = [CaptionEntry("a.mp4", "a rabbit", 0.0, 4.0)]
    before = SidecarCaptioner(old)
    after = SidecarCaptioner(old + [CaptionEntry("b.mp4", "a bird")])  # a new video and its caption arrive
    edited = SidecarCaptioner([CaptionEntry("a.mp4", "a grey rabbit", 0.0, 4.0), CaptionEntry("b.mp4", "a bird")])
    assert before.fingerprint_for("a.mp4") == after.fingerprint_for("a.mp4")
    assert after.fingerprint_for("b.mp4") != before.fingerprint_for("b.mp4")
    assert edited.fingerprint_for("a.mp4") != after.fingerprint_for("a.mp4")  # its own caption changed: redo it
    renamed = SidecarCaptioner([CaptionEntry("copy.mp4", "a rabbit", 0.0, 4.0)])
    assert renamed.fingerprint_for("copy.mp4") == before.fingerprint_for("a.mp4")
