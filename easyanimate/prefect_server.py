"""The workspace's own Prefect server, started on first use and kept warm between commands.

Without a server, every Prefect flow starts a temporary one and stops it afterwards: several seconds of every
command. With ``prefect.server: workspace`` (the default) the first command that runs a flow starts
``prefect server start`` on a free loopback port under a small supervisor (``python -m easyanimate.prefect_server
supervise``, its own session), writes ``prefect-server.url``/``.pid`` in the state folder as
``infra/prefect_local.sh up`` does, and every later command adopts it (``runtime.adopt_local_prefect_server``). The
supervisor stops the server once no command has used it for ``prefect.server_idle_s`` seconds (a command holding the
workspace lock counts as use), so nothing lingers; ``make prefect-down`` stops it at once. An operator's
``PREFECT_API_URL`` always wins, and ``prefect.server: temporary`` (or ``EASYANIMATE_PREFECT_SERVER=temporary``)
keeps Prefect's own per-command server.

Prefect itself is not imported here (the library stays Prefect-free): the server is the ``prefect`` CLI's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from easyanimate.runtime import (
    PREFECT_SERVER_HEARTBEAT_FILE,
    PREFECT_SERVER_PID_FILE,
    PREFECT_SERVER_URL_FILE,
    adopt_local_prefect_server,
    state_dir,
)

MODE_ENV = "EASYANIMATE_PREFECT_SERVER"  # overrides prefect.server (the tests keep temporary servers)
START_LOCK_FILE = "prefect-server.start.lock"
LOG_FILE = "logs/prefect-server.log"
POLL_S = 5.0


class PrefectServerError(RuntimeError):
    """The workspace server could not be started; the message names its log."""


def server_mode(configured: str) -> str:
    mode = os.environ.get(MODE_ENV, configured)
    if mode not in ("workspace", "temporary"):
        raise ValueError(f"{MODE_ENV}={mode!r}: workspace or temporary")
    return mode


def touch_heartbeat(state: Path) -> None:
    (state / PREFECT_SERVER_HEARTBEAT_FILE).touch()


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_workspace_server(configured_mode: str, idle_s: float, timeout_s: float = 120.0) -> str | None:
    """The Prefect API URL this process now uses: the operator's, the workspace server's (started if needed), or
    None for ``temporary`` (Prefect starts its own per flow)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if server_mode(configured_mode) == "temporary":
        return None
    from filelock import FileLock

    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    url = adopt_local_prefect_server(state)  # adopting touches the heartbeat: a use
    if url:
        return url
    with FileLock(str(state / START_LOCK_FILE), timeout=timeout_s):
        url = adopt_local_prefect_server(state)  # another command started it while this one waited
        if url:
            return url
        return _start(state, idle_s, timeout_s)


def _start(state: Path, idle_s: float, timeout_s: float) -> str:
    for name in (PREFECT_SERVER_URL_FILE, PREFECT_SERVER_PID_FILE):
        (state / name).unlink(missing_ok=True)
    log = state / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [sys.executable, "-m", "easyanimate.prefect_server", "supervise", "--port", str(port)]
    command += ["--idle-s", str(idle_s), "--state", str(state)]
    with open(log, "ab") as out:
        supervisor = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(os.environ),
        )
    url_file = state / PREFECT_SERVER_URL_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if url_file.exists():
            url = adopt_local_prefect_server(state)
            if url:
                print(
                    f"started this workspace's Prefect server on {url} (it stops after {idle_s:g} s unused; "
                    "now: make prefect-down)",
                    file=sys.stderr,
                )
                return url
        if supervisor.poll() is not None:
            break
        time.sleep(0.2)
    if supervisor.poll() is None:
        os.killpg(supervisor.pid, signal.SIGTERM)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise PrefectServerError(f"the workspace Prefect server did not start within {timeout_s:g} s (log {log}):\n{tail}")


# ------------------------------------------------------------------------------------------ the supervisor
def _last_use(state: Path) -> float | None:
    """None while a command holds the workspace lock (its holder record has no release and its process lives),
    else when the server was last used: the newest of the heartbeat (commands touch it when they adopt the server)
    and the lock's last release."""
    times = []
    with contextlib.suppress(OSError):
        times.append((state / PREFECT_SERVER_HEARTBEAT_FILE).stat().st_mtime)
    try:
        record = json.loads((state / "workspace.lock.json").read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("released"):
        with contextlib.suppress(ValueError, TypeError):
            times.append(dt.datetime.fromisoformat(record["released"]).timestamp())
    elif record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
            return None
        except (OSError, ValueError, KeyError):
            pass
    return max(times) if times else 0.0


def supervise(port: int, idle_s: float, state: Path) -> int:
    """Run the server; stop it when it dies or after ``idle_s`` seconds without use. Returns the exit code."""
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        print("no `prefect` command beside this Python", file=sys.stderr)
        return 1
    home = state / "prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not _healthy(url):
            if server.poll() is not None or stopping:
                return 1
            time.sleep(0.2)
        (state / PREFECT_SERVER_PID_FILE).write_text(str(os.getpid()))
        (state / PREFECT_SERVER_URL_FILE).write_text(url)
        print(f"Prefect server on {url}; stops after {idle_s:g} s unused", flush=True)
        while not stopping and server.poll() is None:
            time.sleep(POLL_S)
            last_use = _last_use(state)
            if last_use is None:  # a command is running
                touch_heartbeat(state)
                continue
            idle = time.time() - last_use
            if idle > idle_s:
                print(f"unused for {idle:.0f} s: stopping the Prefect server", flush=True)
                break
        return 0
    finally:
        # Only this supervisor's files: a newer server may have replaced them.
        if (state / PREFECT_SERVER_PID_FILE).exists() and (state / PREFECT_SERVER_PID_FILE).read_text() == str(
            os.getpid()
        ):
            for name in (PREFECT_SERVER_URL_FILE, PREFECT_SERVER_PID_FILE):
                (state / name).unlink(missing_ok=True)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the workspace Prefect server's supervisor")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("supervise")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--idle-s", type=float, required=True)
    run.add_argument("--state", type=Path, required=True)
    args = parser.parse_args(argv)
    return supervise(args.port, args.idle_s, args.state)


if __name__ == "__main__":
    sys.exit(main())
