"""Serving as a user runs it: a tiny pipeline logged as the pyfunc model, registered with alias
``champion`` in a throwaway sqlite registry, served by the real ``mlflow models serve`` on a loopback
port, and asked for videos over HTTP; plus the LoRA adapter's own registered model."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from easyanimate.config import GenerateConfig, load_settings
from easyanimate.data.video_io import decode_frames, probe
from easyanimate.serving.pyfunc import EasyAnimatePyfunc
from tests.conftest import tiny_pipeline

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "tiny-easyanimate"
SERVER_START_S = 180  # cold imports of torch/transformers/mlflow on a busy 2-core machine
REQUEST_S = 120
# Small limits so "absurd" requests are cheap to construct; the real ones come from the generate settings.
GENERATE = GenerateConfig(
    height=32, width=32, num_inference_steps=2, max_side=256, max_frames=64, max_inference_steps=50
)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import mlflow
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("serving")
    tiny_pipeline(root / "pipeline", root / "lora")

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="pipeline",
                python_model=EasyAnimatePyfunc(generate=GENERATE),
                artifacts={"pipeline": str(root / "pipeline")},
                registered_model_name=NAME,
                pip_requirements=["easyanimate"],
            )
        MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
        yield {"root": root, "uri": uri, "experiment": experiment, "version": str(info.registered_model_version)}
    finally:
        mlflow.set_tracking_uri(previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _frames(b64: str, path: Path) -> np.ndarray:
    path.write_bytes(base64.b64decode(b64))
    return decode_frames(path)


@pytest.fixture(scope="module")
def server(registry):
    port = _free_port()
    log = open(registry["root"] / "server.log", "w")
    # The CLI execs `uvicorn` by name: the environment's bin folder must be on PATH, as in an activated venv.
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=registry["uri"],
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
    )
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited ({proc.returncode}):\n{(registry['root'] / 'server.log').read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not up in {SERVER_START_S} s:\n{(registry['root'] / 'server.log').read_text()[-4000:]}"
                )
            time.sleep(0.5)
        yield port
    finally:
        # The CLI starts uvicorn as a child: stop the whole session we created, by its id.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        log.close()


def test_served_champion_answers_with_videos(server, registry, tmp_path):
    status, body = _post(
        server,
        {
            "dataframe_records": [
                {"prompt": "a cat playing piano", "num_frames": 8, "seed": 3},
                {"prompt": "a dog", "num_frames": 16, "steps": 1, "height": 48},  # missing seed: the model's default
            ]
        },
    )
    assert status == 200, body
    first, second = body["predictions"]
    assert (first["num_frames"], first["height"], first["width"], first["seed"]) == (8, 32, 32, 3)
    assert second["seed"] == GENERATE.seed
    a, b = (
        _frames(first["video_mp4_base64"], tmp_path / "a.mp4"),
        _frames(second["video_mp4_base64"], tmp_path / "b.mp4"),
    )
    assert a.shape == (8, 32, 32, 3) and b.shape == (16, 48, 32, 3)
    assert probe(tmp_path / "a.mp4").num_frames == 8
    # Same request, same video: the seed travels with the request.
    status, again = _post(
        server, {"dataframe_records": [{"prompt": "a cat playing piano", "num_frames": 8, "seed": 3}]}
    )
    assert status == 200
    np.testing.assert_array_equal(_frames(again["predictions"][0]["video_mp4_base64"], tmp_path / "c.mp4"), a)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"num_frames": 8}, "prompt must be a non-empty string"),
        ({"prompt": "a cat", "height": 100000}, "height=100000 is out of range [1, 256]"),
        ({"prompt": "a cat", "width": 40}, "multiples of 16"),
        ({"prompt": "a cat", "num_frames": 5}, "SliceVAE needs num_frames"),
        ({"prompt": "a cat", "num_frames": 10000}, "num_frames=10000 is out of range"),
        ({"prompt": "a cat", "steps": "many"}, "steps must be a number"),
        ({"prompt": "a cat", "steps": 2.5}, "steps must be a whole number"),
        ({"prompt": "a cat", "lora_scale": 1.0}, "no LoRA adapter"),
        ({"prompt": "a cat", "colour": "red"}, "unknown request field(s) ['colour']"),
        # Each size within its limit, together over the work budget (4 x 8 x 32 x 32 x 2 = 65,536 here).
        (
            {"prompt": "a cat", "num_frames": 64, "height": 256, "width": 256, "steps": 50},
            "is over this server's budget of 65,536 (generate.max_request_budget)",
        ),
    ],
)
def test_bad_requests_get_a_clear_400(server, record, message):
    status, body = _post(server, {"dataframe_records": [record]})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in body["message"] and "Traceback" not in body["message"]


def test_too_many_records_get_a_clear_400(server):
    status, body = _post(server, {"dataframe_records": [{"prompt": "a cat"}] * 31})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "31 records in one request" in body["message"] and "generate.max_records_per_request" in body["message"]


def test_lora_adapter_is_its_own_registered_model_linked_to_the_base(registry, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from easyanimate.registry import register_lora_adapter

    root = registry["root"]
    settings = load_settings(
        overrides={
            "paths": {"lora": str(root / "lora"), "pipeline": str(root / "pipeline")},
            "lora": {"registered_model": "tiny-lora", "default_scale": 1.0},
            "generate": GENERATE.model_dump(mode="json"),
        }
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry["uri"])
    try:
        mlflow.set_experiment(experiment_id=registry["experiment"])
        result = register_lora_adapter(settings, NAME, registry["version"])
        client = MlflowClient()
        version = client.get_model_version_by_alias("tiny-lora", "champion")  # its base is the champion
        assert str(version.version) == result["version"]
        assert version.tags["base_model_uri"] == f"models:/{NAME}/{registry['version']}"
        assert version.tags["lora_rank"] == "4" and int(version.tags["adapter_bytes"]) < 200_000
        assert client.get_model_version(NAME, registry["version"]).tags["lora_model_uri"] == result["uri"]
        # The registered artifact is the adapter folder only (small), not another copy of the pipeline.
        files = [Path(p) for p in Path(mlflow.artifacts.download_artifacts(result["uri"])).rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) < 1_000_000
        assert not any(p.name == "model_index.json" for p in files)

        styled = mlflow.pyfunc.load_model("models:/tiny-lora@champion")  # fetches its base by the link
        plain = mlflow.pyfunc.load_model(f"models:/{NAME}/{registry['version']}")
        request = pd.DataFrame([{"prompt": "a cat", "num_frames": 8, "seed": 1}])
        base_video = _frames(plain.predict(request)["video_mp4_base64"][0], tmp_path / "base.mp4")
        lora_video = _frames(styled.predict(request)["video_mp4_base64"][0], tmp_path / "lora.mp4")
        off = request.assign(lora_scale=0.0)
        off_video = _frames(styled.predict(off)["video_mp4_base64"][0], tmp_path / "off.mp4")
    finally:
        mlflow.set_tracking_uri(previous)
    assert np.abs(lora_video.astype(int) - base_video).mean() > 1  # the adapter changes the video ...
    np.testing.assert_array_equal(off_video, base_video)  # ... and scale 0 is the base model exactly
