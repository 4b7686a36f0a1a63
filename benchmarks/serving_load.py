"""Bounded load on ``easyanimate serve``: is the server still answering while a hostile request runs?

    python benchmarks/serving_load.py [--clients 4] [--requests 10] [--timeout-s 10] [--abandon-s 3]

Builds a tiny pipeline (as ``tests/conftest.py`` does: MiniLM text encoder, 8-channel VAE, 2-block DiT), saves it
as the pyfunc model and serves it with ``easyanimate serve`` on a loopback port. Then, at once:

- ``--clients`` threads each send ``--requests`` small requests (8 frames, 32x32, 4 steps), one after another;
- a poller asks ``/health`` every 50 ms (a new connection each time, as a load balancer would);
- once half the small requests are answered, a hostile client sends a request over the budget (expects 400)
  and a long request (within the budget, minutes of work) it abandons after ``--abandon-s``: the server should
  stop it when the client disconnects.

Then, with no other load, a long request the client waits on (the server should stop it at
``serve.request_timeout_s``: 504), and SIGTERM while another long request runs (drain, 503, exit status 0).

Prints p50/p95/max latency of the small requests and of the health checks (overall, and while a long request
held the model), the server's counters, its peak RSS, and how long SIGTERM took to end it (and its exit status).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' tiny model and HTTP client (needs the test extra)
from tests.test_serving_bounds import ServingClient as Client  # noqa: E402

SMALL = {"prompt": "a cat playing piano", "num_frames": 8, "height": 32, "width": 32, "steps": 4, "seed": 1}
# Minutes of work within BUDGET; steps stay within the scheduler's 1000 training timesteps.
LONG = {**SMALL, "num_frames": 64, "height": 256, "width": 256, "steps": 1000}  # ~55 ms a step: about a minute
OVER_BUDGET = {**SMALL, "num_frames": 64, "height": 512, "width": 512, "steps": 1000}
BUDGET = 5_000_000_000


def build_model(root: Path) -> Path:
    """The tests' tiny pipeline (``tests/conftest.py``), saved as the pyfunc model."""
    import mlflow

    from easyanimate.config import GenerateConfig
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc
    from tests.conftest import tiny_pipeline

    tiny_pipeline(root / "pipeline", root / "lora")
    mlflow.pyfunc.save_model(
        str(root / "model"),
        python_model=EasyAnimatePyfunc(generate=GenerateConfig(height=32, width=32, num_inference_steps=4)),
        artifacts={"pipeline": str(root / "pipeline")},
        pip_requirements=["easyanimate"],
    )
    return root / "model"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)  # nearest rank
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values):4d}  p50 {percentile(values, 50) * 1000:8.1f} ms  p95 {percentile(values, 95) * 1000:8.1f} ms"
        f"  max {max(values) * 1000:8.1f} ms"
    )


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10, help="small requests per client")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="serve.request_timeout_s")
    parser.add_argument("--abandon-s", type=float, default=3.0, help="when the hostile client disconnects")
    parser.add_argument("--max-queue", type=int, default=8, help="serve.max_queue")
    parser.add_argument("--grace-s", type=float, default=5.0, help="serve.shutdown_grace_s")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and server log here")
    args = parser.parse_args()

    from easyanimate.runtime import configure_environment

    configure_environment()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="serving-load-"))
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model" if (root / "model" / "MLmodel").exists() else build_model(root)
    params = {
        "preset": "tiny",
        "generate": {
            "height": 32,
            "width": 32,
            "num_inference_steps": 4,
            "max_inference_steps": 100_000,
            "max_request_budget": BUDGET,
        },
        "serve": {"request_timeout_s": args.timeout_s, "max_queue": args.max_queue, "shutdown_grace_s": args.grace_s},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    cmd = [sys.executable, "-m", "easyanimate.serving.cli", str(model), "--port", str(port)]
    server = subprocess.Popen(
        [*cmd, "--params", str(root / "params.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=Path(__file__).resolve().parents[1],
    )
    client = Client(port)
    started = time.monotonic()
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited ({server.returncode}); see {root / 'server.log'}")
        try:
            client.health()
            break
        except OSError:
            time.sleep(0.2)
    print(f"server up on 127.0.0.1:{port} in {time.monotonic() - started:.1f} s (pid {server.pid}, log {root})")

    small: list[tuple[float, float, int]] = []  # (start, latency, status)
    health: list[tuple[float, float]] = []  # (start, latency)
    hostile: dict[str, tuple[float, float, int, str]] = {}  # what -> (start, end, status, message)
    long_windows: list[tuple[float, float]] = []
    lock = threading.Lock()
    done = threading.Event()
    rss = [rss_mb(server.pid)]

    def small_client() -> None:
        for _ in range(args.requests):
            t0 = time.monotonic()
            status, _ = Client.answer(client.send([SMALL]))
            with lock:
                small.append((t0, time.monotonic() - t0, status))

    def poller() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            try:
                client.health()
                latency = time.monotonic() - t0
            except (OSError, AssertionError):  # no answer, or not 200
                latency = float("inf")  # unanswered: shows as the max
            with lock:
                health.append((t0, latency))
            rss.append(rss_mb(server.pid))
            time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))

    def hostile_client() -> None:
        total = args.clients * args.requests
        while len(small) < total // 2:
            time.sleep(0.05)
        t0 = time.monotonic()
        status, body = Client.answer(client.send([OVER_BUDGET]))
        hostile["over budget"] = (t0, time.monotonic(), status, body.get("message", "")[:100])
        t0 = time.monotonic()
        conn = client.send([LONG])
        time.sleep(args.abandon_s)  # the client gives up
        conn.close()
        closed = time.monotonic()
        while (running := client.health()["running"]) and running["steps"] == LONG["steps"]:
            time.sleep(0.01)  # until the server has stopped it
        stopped = f"disconnected by the client; the server stopped it {time.monotonic() - closed:.2f} s later"
        hostile["abandoned long"] = (t0, closed, 0, stopped)
        long_windows.append((t0, time.monotonic()))

    threads = [threading.Thread(target=small_client) for _ in range(args.clients)]
    threads.append(threading.Thread(target=hostile_client))
    health_thread = threading.Thread(target=poller, daemon=True)
    health_thread.start()
    t_load = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.monotonic() - t_load
    done.set()
    health_thread.join()
    state = client.health()

    # A long request the client waits on: stopped at serve.request_timeout_s.
    t0 = time.monotonic()
    status, body = Client.answer(client.send([LONG]))
    hostile["long until timeout"] = (t0, time.monotonic(), status, body.get("message", "")[:100])

    # SIGTERM while a long request is in flight: drain (grace), stop it, exit 0.
    conn = client.send([LONG])
    while not ((s := client.health())["running"] and s["running"]["step"] >= 1):
        time.sleep(0.05)
    t0 = time.monotonic()
    server.send_signal(signal.SIGTERM)
    rc = server.wait(timeout=args.grace_s + 60)
    term_s = time.monotonic() - t0
    try:
        term_status, term_body = Client.answer(conn)
    except OSError as exc:
        term_status, term_body = 0, {"message": repr(exc)}
    log.close()

    def during_long(t: float) -> bool:  # a small request sent, or health asked, while the long request ran
        return any(a <= t <= b for a, b in long_windows)

    statuses = sorted({s for _, _, s in small})
    print(f"\nload: {args.clients} clients x {args.requests} small requests + hostile client, {load_s:.1f} s wall")
    print(f"small requests      {summary([lat for _, lat, _ in small])}  statuses {statuses}")
    print(f"  while long held   {summary([lat for t, lat, _ in small if during_long(t)])}")
    print(f"  otherwise         {summary([lat for t, lat, _ in small if not during_long(t)])}")
    print(f"health checks       {summary([lat for _, lat in health])}")
    print(f"  while long held   {summary([lat for t, lat in health if during_long(t)])}")
    for what, (a, b, status, message) in hostile.items():
        print(f"hostile: {what:20s} {b - a:6.2f} s  status {status}  {message}")
    counters = {k: v for k, v in state.items() if k not in ("status", "running", "max_queue")}
    print(f"server counters after the load: {json.dumps(counters)}")
    print(f"server RSS          start {rss[0]:.0f} MB, peak {max(r for r in rss if r == r):.0f} MB")
    print(f"SIGTERM with a long request in flight: exit status {rc} after {term_s:.2f} s; the request got "
          f"{term_status} {term_body.get('message', '')[:80]}")  # fmt: skip


if __name__ == "__main__":
    main()
