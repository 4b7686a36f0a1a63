"""Issue #13's findings, each as a test: one writer per workspace, strict inputs, fast and named failures,
killed runs closed, outputs readable by the team (umask)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from easyanimate.config import ConfigError, load_settings
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def cli(args: list[str], cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(EASYANIMATE_STATE_DIR=str(cwd / ".easyanimate"), **env)
    return subprocess.run(
        [str(BIN / "easyanimate"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ umask
def test_atomic_outputs_honour_the_umask(tmp_path):
    from easyanimate.utils import atomic_directory, atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
        with atomic_directory(tmp_path / "weights") as folder:
            (folder / "w.bin").write_bytes(b"0")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "weights").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


# ------------------------------------------------------------------------------------------ lock
HOLD = textwrap.dedent(
    """
    import sys, time
    from easyanimate.workspace import workspace_lock
    with workspace_lock("holder test"):
        print("held", flush=True)
        time.sleep(float(sys.argv[1]))
    """
)


def _hold_lock(cwd: Path, seconds: float) -> subprocess.Popen:
    env = dict(os.environ, EASYANIMATE_STATE_DIR=str(cwd / ".easyanimate"))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(seconds)], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = _hold_lock(tmp_path, 60)
    try:
        began = time.perf_counter()
        proc = cli(["run", "curate"], tmp_path)
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr.strip()
        assert "is busy" in message and f"pid {holder.pid}" in message and "holder test" in message
        assert "since" in message and "--wait" in message
        assert "Traceback" not in proc.stderr and time.perf_counter() - began < 60
        # Nothing was started: no MLflow database, no Prefect state from the refused command.
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder(tmp_path, monkeypatch):
    from easyanimate.workspace import WorkspaceBusy, holder, workspace_lock

    monkeypatch.setenv("EASYANIMATE_STATE_DIR", str(tmp_path / ".easyanimate"))
    proc = _hold_lock(tmp_path, 3)
    try:
        with pytest.raises(WorkspaceBusy, match="holder test"):
            with workspace_lock("second"):
                pass
        began = time.perf_counter()
        with workspace_lock("second", wait=True, timeout=60):
            waited = time.perf_counter() - began
            assert holder()["pid"] == os.getpid() and holder()["command"] == "second"
            with workspace_lock("nested"):  # re-entrant in the holding process
                pass
        assert waited > 0.5
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_frees_the_lock(tmp_path, monkeypatch):
    from easyanimate.workspace import workspace_lock

    monkeypatch.setenv("EASYANIMATE_STATE_DIR", str(tmp_path / ".easyanimate"))
    proc = _hold_lock(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with workspace_lock("after kill", wait=True, timeout=10):
        pass


# ------------------------------------------------------------------------------------------ strict inputs
def test_missing_params_file_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="params file not found: .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml")
    monkeypatch.setenv("EASYANIMATE_PARAMS", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match="gone.yaml.*EASYANIMATE_PARAMS"):
        load_settings()
    proc = cli(["config", "-p", "nope.yaml"], tmp_path)
    assert proc.returncode == 2 and "params file not found: nope.yaml" in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ({"vae": {"stage1": {"num_frames": 7}}}, "vae.stage1.num_frames"),
        ({"generate": {"num_frames": 7}}, "generate.num_frames"),
        ({"dit": {"stage2": {"num_frames": 12 + 2}}}, "dit.stage2.num_frames"),
        ({"vae": {"eval": {"num_frames": 0}}}, "vae.eval.num_frames"),
        ({"generate": {"height": 2048}}, "generate.height=2048 is above generate.max_side"),
    ],
)
def test_config_frame_counts_and_sizes_are_checked(tmp_path, override, message):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(override))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(params)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--frames", "0"], "--frames"),
        (["--steps", "0"], "--steps"),
        (["--height", "-8"], "--height"),
        (["--frames", "7"], "7 frames: must be 1 (an image) or a multiple of 4"),
        (["--height", "100000", "--width", "64"], "--height 100000 is above generate.max_side=1024"),
        (["--model", "models:/nonexistent@champion"], "models:/nonexistent@champion"),
    ],
)
def test_generate_refuses_bad_values_instead_of_defaulting(tmp_path, flags, message):
    proc = cli(
        ["generate", "a rabbit", "--out", "x.mp4", *flags],
        tmp_path,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if flags[0] == "--model":  # one line, naming the URI (beside MLflow's own INFO log lines)
        assert len([line for line in proc.stderr.strip().splitlines() if " INFO " not in line]) == 1
    assert not (tmp_path / "x.mp4").exists()


# ------------------------------------------------------------------------------------------ fail fast
def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    for args in (["run", "curate"], ["promote", "--dry-run"]):
        began = time.perf_counter()
        proc = cli(args, tmp_path, MLFLOW_TRACKING_URI=uri)
        seconds = time.perf_counter() - began
        assert proc.returncode == 2, proc.stderr
        assert f"MLflow tracking server {uri} is unreachable" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and seconds < 30


def test_corrupt_checkpoint_is_named_and_not_retried(tmp_path):
    from easyanimate.stages import run_stage
    from easyanimate.utils import CorruptCheckpoint, verify_safetensors
    from flows.common import _retry_on_io
    from tests.conftest import tiny_pipeline

    tiny_pipeline(tmp_path / "pipeline", tmp_path / "lora")
    assert verify_safetensors(tmp_path / "pipeline") >= 3
    weights = tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint, match=f"corrupt or truncated checkpoint {weights}"):
        verify_safetensors(tmp_path / "pipeline")

    from easyanimate.registry import pipeline_folder

    with pytest.raises(CorruptCheckpoint, match="corrupt or truncated"):
        pipeline_folder(tmp_path / "pipeline")
    # A stage whose input holds it stops before its entry runs, with that message.
    settings = load_settings(REPO / "params.yaml")
    settings = settings.model_copy(
        update={"paths": settings.paths.model_copy(update={"vae_stage1": tmp_path / "pipeline" / "vae"})}
    )
    with pytest.raises(CorruptCheckpoint, match="corrupt or truncated checkpoint"):
        run_stage("vae_stage2", settings)

    class State:  # what Prefect's retry condition receives
        def result(self):
            raise CorruptCheckpoint("corrupt or truncated checkpoint x")

    class IOState:
        def result(self):
            raise ConnectionError("reset")

    assert _retry_on_io(None, None, State()) is False and _retry_on_io(None, None, IOState()) is True


# ------------------------------------------------------------------------------------------ killed runs
OPEN_RUN = textwrap.dedent(
    """
    import sys, time, mlflow
    from easyanimate.config import load_settings
    from easyanimate.tracking import setup_mlflow, workspace_tags
    from easyanimate.workspace import workspace_lock
    settings = load_settings(sys.argv[1])
    with workspace_lock("easyanimate run vae_stage1"):
        setup_mlflow(settings)
        run = mlflow.start_run(run_name="vae_stage1", tags=workspace_tags())
        print(run.info.run_id, flush=True)
        time.sleep(120)
    """
)


def test_runs_of_a_killed_process_are_marked_killed(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from easyanimate.tracking import close_dangling_runs, workspace_tags
    from easyanimate.workspace import previous_holder_released, workspace_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("EASYANIMATE_STATE_DIR", str(tmp_path / ".easyanimate"))
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", OPEN_RUN, str(REPO / "params.yaml")], env=env, stdout=subprocess.PIPE, text=True
    )
    killed_run = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # an earlier test may have set the global URI, which beats the variable
    try:
        settings = load_settings(REPO / "params.yaml")
        client = MlflowClient(uri)
        assert client.get_run(killed_run).info.status == "RUNNING"
        with workspace_lock("next command"):  # the killed holder never let go: its runs are closed
            assert not previous_holder_released()
            with mlflow.start_run(run_name="mine", tags=workspace_tags()) as mine:  # this process's own open run
                closed = close_dangling_runs(settings)
                assert closed == [killed_run]
                assert client.get_run(mine.info.run_id).info.status == "RUNNING"
        run = client.get_run(killed_run)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert "died" in run.data.tags["easyanimate.closed_by"]
        assert close_dangling_runs(settings) == []
        with workspace_lock("a later command"):  # the last holder let go: nothing to look for (no MLflow query)
            assert previous_holder_released()
            assert close_dangling_runs(settings) == []
    finally:
        mlflow.set_tracking_uri(previous)
