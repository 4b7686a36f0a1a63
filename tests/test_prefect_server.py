"""The workspace Prefect server (``prefect.server: workspace``, the default): the first command starts it, later
commands reuse it, and it stops by itself once unused (never while a command holds the workspace lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from easyanimate.runtime import PREFECT_SERVER_HEARTBEAT_FILE, PREFECT_SERVER_PID_FILE, PREFECT_SERVER_URL_FILE

pytestmark = pytest.mark.slow

# A command as the CLI runs one: workspace lock, the server, then a real Prefect flow against it.
COMMAND = textwrap.dedent(
    """
    import json, os, sys
    from easyanimate.runtime import configure_environment
    configure_environment()
    from easyanimate.prefect_server import ensure_workspace_server
    from easyanimate.workspace import workspace_lock
    with workspace_lock("test command"):
        url = ensure_workspace_server("workspace", float(sys.argv[1]))
        from prefect import flow

        @flow
        def add(a: int, b: int) -> int:
            return a + b

        print(json.dumps({"url": url, "api": os.environ.get("PREFECT_API_URL"), "result": add(2, 3)}))
    """
)


def _command(state: Path, idle_s: float) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "EASYANIMATE_PREFECT_SERVER")}
    env["EASYANIMATE_STATE_DIR"] = str(state)
    env.pop("PREFECT_HOME", None)  # the workspace's own, as a user has it
    proc = subprocess.run(
        [sys.executable, "-c", COMMAND, str(idle_s)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_first_command_starts_the_server_later_ones_reuse_it_and_it_stops_when_unused(tmp_path, monkeypatch):
    state = tmp_path / ".easyanimate"
    idle_s = 15.0  # room for a loaded machine's gap between two commands (each adoption counts as a use)
    first, log = _command(state, idle_s)
    assert first["result"] == 5 and first["url"] == first["api"] and first["url"].startswith("http://127.0.0.1:")
    assert "started this workspace's Prefect server" in log
    pid = int((state / PREFECT_SERVER_PID_FILE).read_text())
    assert (state / PREFECT_SERVER_URL_FILE).read_text() == first["url"] and _alive(pid)

    second, log = _command(state, idle_s)
    assert second["url"] == first["url"] and "started" not in log  # adopted, not started again

    # A command that holds the workspace lock keeps the server up past the idle limit...
    monkeypatch.setenv("EASYANIMATE_STATE_DIR", str(state))
    from easyanimate.workspace import workspace_lock

    with workspace_lock("a long training run"):
        time.sleep(idle_s + 6)
        assert _alive(pid) and (state / PREFECT_SERVER_URL_FILE).exists()
    # ...and once nothing uses it, it stops and leaves no pid or URL behind for the next command to adopt.
    (state / PREFECT_SERVER_HEARTBEAT_FILE).touch()
    deadline = time.monotonic() + idle_s + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid), "the unused server stopped"
    assert not (state / PREFECT_SERVER_URL_FILE).exists() and not (state / PREFECT_SERVER_PID_FILE).exists()

    third, log = _command(state, idle_s)  # the next command starts a new one
    assert third["result"] == 5 and "started this workspace's Prefect server" in log
    new_pid = int((state / PREFECT_SERVER_PID_FILE).read_text())
    os.killpg(new_pid, 15)  # make prefect-down


def test_temporary_mode_and_an_operator_url_start_nothing(tmp_path, monkeypatch):
    from easyanimate.prefect_server import ensure_workspace_server

    monkeypatch.setenv("EASYANIMATE_STATE_DIR", str(tmp_path / ".easyanimate"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("EASYANIMATE_PREFECT_SERVER", "temporary")
    assert ensure_workspace_server("workspace", 60) is None
    monkeypatch.delenv("EASYANIMATE_PREFECT_SERVER")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert ensure_workspace_server("workspace", 60) == "http://127.0.0.1:9/api"
    assert not (tmp_path / ".easyanimate" / PREFECT_SERVER_PID_FILE).exists()
    monkeypatch.setenv("EASYANIMATE_PREFECT_SERVER", "sometimes")
    monkeypatch.delenv("PREFECT_API_URL")
    with pytest.raises(ValueError, match="EASYANIMATE_PREFECT_SERVER"):
        ensure_workspace_server("workspace", 60)
