"""Bounded serving, as a hostile client sees it: ``easyanimate serve`` (a real server process on a loopback
port, serving a tiny pipeline saved as the pyfunc model) refuses requests over the per-request budget, stops a
generation whose client disconnected or whose deadline passed (and then serves the next request), answers
/health during a generation, bounds its queue and drains on SIGTERM; plus the pyfunc's own deadline inside
``mlflow models serve`` (MLflow's request timeout), checked in-process.

No fixed sleeps: every wait polls the server's /health for the state it waits for, under a bound."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_pipeline

pytestmark = pytest.mark.slow
SERVER_START_S = 180  # cold imports of torch/transformers/mlflow on a busy 2-core machine
TIMEOUT_S = 8.0  # serve.request_timeout_s: small requests take well under a second here
GRACE_S = 2.0  # serve.shutdown_grace_s
BUDGET = 5_000_000_000  # generate.max_request_budget
MAX_RECORDS = 3
SMALL = {"prompt": "a cat", "num_frames": 8, "height": 16, "width": 16, "steps": 2, "seed": 1}
# About a minute of work even on an idle machine (~55 ms a step), within the budget (64 x 256 x 256 x 1000 =
# 4,194,304,000): only a stop ends it. Steps stay within the scheduler's 1000 training timesteps.
LONG = {**SMALL, "num_frames": 64, "height": 256, "width": 256, "steps": 1000}
OVER_BUDGET = {**SMALL, "num_frames": 64, "height": 512, "width": 512, "steps": 1000}  # 16,777,216,000


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import mlflow

    from easyanimate.config import GenerateConfig
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc

    root = tmp_path_factory.mktemp("bounds")
    tiny_pipeline(root / "pipeline", root / "lora")
    # Logged limits (what `mlflow models serve` enforces); `easyanimate serve` applies its params file's instead.
    generate = GenerateConfig(
        height=16,
        width=16,
        num_inference_steps=2,
        max_inference_steps=100_000,
        max_request_budget=BUDGET,
        max_records_per_request=MAX_RECORDS,
    )
    mlflow.pyfunc.save_model(
        str(root / "model"),
        python_model=EasyAnimatePyfunc(generate=generate),
        artifacts={"pipeline": str(root / "pipeline")},
        pip_requirements=["easyanimate"],
    )
    params = {
        "preset": "tiny",
        "generate": {
            "height": 16,
            "width": 16,
            "num_inference_steps": 2,
            "max_inference_steps": 100_000,
            "max_request_budget": BUDGET,
            "max_records_per_request": MAX_RECORDS,
        },
        "serve": {"request_timeout_s": TIMEOUT_S, "max_queue": 1, "shutdown_grace_s": GRACE_S, "poll_s": 0.05},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingClient:
    """HTTP client of ``easyanimate serve`` on loopback (also used by ``benchmarks/serving_load.py``)."""

    def __init__(self, port: int):
        self.port = port

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def health(self) -> dict:
        conn = self.connection(timeout=5)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 200
            return json.loads(response.read())
        finally:
            conn.close()

    def send(self, records: list[dict], timeout: float = 120) -> http.client.HTTPConnection:
        """Start a request and leave it open: read it with ``answer``, or close it to disconnect."""
        conn = self.connection(timeout)
        conn.request(
            "POST",
            "/invocations",
            body=json.dumps({"dataframe_records": records}),
            headers={"Content-Type": "application/json"},
        )
        return conn

    @staticmethod
    def answer(conn: http.client.HTTPConnection) -> tuple[int, dict]:
        try:
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def post(self, records: list[dict], timeout: float = 120) -> tuple[int, dict]:
        return self.answer(self.send(records, timeout))


class Server(ServingClient):
    def __init__(self, root: Path, name: str):
        super().__init__(_free_port())
        self.log_path = root / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "easyanimate.serving.cli",
                str(root / "model"),
                "--port",
                str(self.port),
                "--params",
                str(root / "params.yaml"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            cwd=Path(__file__).resolve().parents[1],
        )
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.health()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {SERVER_START_S} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_for(self, check, what: str, bound_s: float = 60) -> dict:
        """Poll /health until ``check(state)``; fail naming ``what`` after ``bound_s``."""
        deadline = time.monotonic() + bound_s
        while True:
            state = self.health()
            if check(state):
                return state
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {bound_s} s; /health: {state}\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_generating(self) -> dict:
        return self.wait_for(lambda s: s["running"] is not None and s["running"]["step"] >= 1, "generating")

    def wait_idle(self, bound_s: float = 30) -> dict:
        return self.wait_for(lambda s: s["running"] is None and s["queued"] == 0, "idle", bound_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "server")
    try:
        yield srv
    finally:
        srv.stop()


def _served_promptly(server: Server) -> None:
    started = time.monotonic()
    status, body = server.post([SMALL])
    assert status == 200, body
    assert body["predictions"][0]["num_frames"] == 8 and body["predictions"][0]["video_mp4_base64"]
    assert time.monotonic() - started < TIMEOUT_S


# ------------------------------------------------------------------------------------------ budget
def test_over_budget_request_gets_400_naming_the_setting(server):
    status, body = server.post([OVER_BUDGET])
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "generate.max_request_budget" in body["message"] and f"{BUDGET:,}" in body["message"]
    assert "16,777,216,000" in body["message"]
    # The budget sums over a request's records: records each within it, together over it.
    part = {**LONG, "steps": 450}  # 1,887,436,800; three of them 5,662,310,400
    status, body = server.post([part] * MAX_RECORDS)
    assert status == 400 and "generate.max_request_budget" in body["message"], body
    _served_promptly(server)


def test_too_many_records_get_400_naming_the_setting(server):
    status, body = server.post([SMALL] * 31)
    assert status == 400, body
    assert "31 records" in body["message"] and "generate.max_records_per_request" in body["message"]
    assert f"at most {MAX_RECORDS}" in body["message"]


def test_bad_bodies_get_a_clear_error(server):
    conn = server.connection()
    conn.request("POST", "/invocations", body=b"{not json", headers={"Content-Type": "application/json"})
    status, body = Server.answer(conn)
    assert status == 400 and "not valid JSON" in body["message"]
    conn = server.connection()
    conn.request("POST", "/invocations", body=b'{"records": []}', headers={"Content-Type": "application/json"})
    status, body = Server.answer(conn)
    assert status == 400 and "dataframe_records" in body["message"]
    conn = server.connection()
    conn.request("POST", "/invocations", body=b"x" * 1_100_000, headers={"Content-Type": "application/json"})
    status, body = Server.answer(conn)
    assert status == 413 and "serve.max_body_bytes" in body["message"]


# ------------------------------------------------------------------------------------------ cancellation
def test_health_is_answered_during_a_generation(server):
    conn = server.send([LONG])
    try:
        server.wait_generating()
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            state = server.health()
            latencies.append(time.monotonic() - started)
            assert state["status"] == "ok" and state["running"] is not None
        assert max(latencies) < 2.0, latencies
    finally:
        conn.close()
    server.wait_idle()


def test_client_disconnect_stops_the_generation(server):
    before = server.health()["stopped_disconnected"]
    conn = server.send([LONG])
    running = server.wait_generating()["running"]
    conn.close()  # the client gives up
    state = server.wait_idle(bound_s=10)  # stopped within a step or so, not after its 5000 steps
    assert state["stopped_disconnected"] == before + 1
    assert f"request {running['request']} stopped (disconnected)" in server.log()
    _served_promptly(server)


def test_deadline_stops_the_generation(server):
    before = server.health()["stopped_timeout"]
    started = time.monotonic()
    status, body = server.post([LONG])
    elapsed = time.monotonic() - started
    assert status == 504, body
    assert body["error_code"] == "DEADLINE_EXCEEDED" and "serve.request_timeout_s" in body["message"]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5
    state = server.wait_idle(bound_s=10)
    assert state["stopped_timeout"] == before + 1
    _served_promptly(server)


def test_queue_is_bounded(server):
    running = server.send([LONG])
    server.wait_generating()
    queued = server.send([LONG])  # serve.max_queue = 1
    server.wait_for(lambda s: s["queued"] == 1, "queued")
    status, body = server.post([SMALL])
    assert status == 503 and "serve.max_queue=1" in body["message"], body
    queued.close()
    running.close()
    server.wait_idle(bound_s=10)
    _served_promptly(server)


def test_sigterm_drains_and_exits_zero(model_dir):
    srv = Server(model_dir, "sigterm")
    try:
        conn = srv.send([LONG])
        srv.wait_generating()
        answered = {}
        reader = threading.Thread(target=lambda: answered.update(result=Server.answer(conn)), daemon=True)
        reader.start()
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(timeout=GRACE_S + 20)
        took = time.monotonic() - sent
        reader.join(timeout=10)
        log = srv.log()
        assert rc == 0, log[-3000:]
        assert took < GRACE_S + 10, took
        # The in-flight request had its grace period, then stopped with an answer (not a dropped connection).
        status, body = answered["result"]
        assert status == 503 and "shutting down" in body["message"], body
        assert "stopped (shutdown)" in log
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ inside `mlflow models serve`
def test_pyfunc_budget_and_mlflow_request_timeout(model_dir, monkeypatch):
    """What `mlflow models serve` gets from the pyfunc: the logged budget, and a generation that stops at the
    scoring server's request timeout and releases the model for the next request."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(model_dir / "model"))
    with pytest.raises(MlflowException, match="generate.max_request_budget"):
        model.predict(pd.DataFrame([OVER_BUDGET]))
    with pytest.raises(MlflowException, match="generate.max_records_per_request"):
        model.predict(pd.DataFrame([SMALL] * (MAX_RECORDS + 1)))

    # The variables `mlflow models serve` sets in its scoring server's environment.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "2")
    outcome = {}

    def long_request():
        try:
            model.predict(pd.DataFrame([LONG]))
            outcome["result"] = "finished"
        except MlflowException as exc:
            outcome["result"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=long_request, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the generation did not stop at the request timeout"
    exc = outcome["result"]
    assert isinstance(exc, MlflowException) and exc.get_http_status_code() == 504, exc
    assert "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in exc.message
    assert time.monotonic() - started < 10
    video = model.predict(pd.DataFrame([SMALL]))  # the model's lock is free again
    assert video["num_frames"][0] == 8
