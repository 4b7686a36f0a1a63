"""One writer per workspace: a file lock around every command that changes the project's state.

The lock (``filelock``) lives in the state folder (``.easyanimate/``, or ``$EASYANIMATE_STATE_DIR``) and is
taken before anything touches the MLflow or Prefect databases, so two commands started together never race
on a schema migration or train the same thing twice. Beside it, ``workspace.lock.json`` says who holds it,
so a refused command can name the holder. Re-entrant within a process: a flow that a locked CLI command
runs may take it again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from easyanimate.runtime import state_dir
from easyanimate.utils import atomic_write_json

LOCK_NAME = "workspace.lock"
HOLDER_NAME = "workspace.lock.json"
_guard = threading.Lock()
_locks: dict[Path, FileLock] = {}
_previous_released: dict[Path, bool] = {}  # per state folder, set when this process takes the lock


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace lock; the message names it and since when."""


def _lock_for(folder: Path) -> FileLock:
    with _guard:
        if folder not in _locks:
            folder.mkdir(parents=True, exist_ok=True)
            # thread_local=False: one lock per process, whichever thread (Prefect runs flows in workers) holds it.
            _locks[folder] = FileLock(str(folder / LOCK_NAME), thread_local=False)
        return _locks[folder]


def holder(folder: Path | None = None) -> dict | None:
    """Who holds (or last held) the lock: ``{"pid", "host", "command", "since"}``, or None."""
    path = (folder or state_dir()) / HOLDER_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (no holder record)"
    since = info.get("since", "?")
    try:
        age = int(time.time() - dt.datetime.fromisoformat(since).timestamp())
        since = f"{since} ({age // 60} min {age % 60} s ago)"
    except (TypeError, ValueError):
        pass
    return f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}) since {since}"


@contextlib.contextmanager
def workspace_lock(command: str | None = None, wait: bool = False, timeout: float | None = None) -> Iterator[Path]:
    """Hold the workspace lock; raise ``WorkspaceBusy`` at once when another process holds it, or wait for it
    (``wait=True``, up to ``timeout`` seconds; forever when None)."""
    folder = state_dir()
    lock = _lock_for(folder)
    outermost = not lock.is_locked
    try:
        lock.acquire(timeout=(-1 if timeout is None else timeout) if wait else 0)
    except Timeout:
        raise WorkspaceBusy(
            f"workspace {folder.parent} is busy: {describe_holder(holder(folder))} holds {folder / LOCK_NAME}; "
            + ("still busy after waiting" if wait else "rerun with --wait to queue behind it")
        ) from None
    record = None
    try:
        if outermost:
            previous = holder(folder)
            _previous_released[folder] = previous is None or bool(previous.get("released"))
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_json(folder / HOLDER_NAME, record)
        yield folder
    finally:
        if record is not None:  # a holder that was killed never gets here: the next one cleans up after it
            record["released"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            with contextlib.suppress(OSError):
                atomic_write_json(folder / HOLDER_NAME, record)
        lock.release()


def previous_holder_released(folder: Path | None = None) -> bool:
    """Whether the process that held the lock before the current hold let go of it (or nobody held it before),
    i.e. no killed command can have left anything half-done. False unless this process holds the lock now."""
    return _previous_released.get(folder or state_dir(), False)
