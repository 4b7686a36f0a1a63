"""Offline, repo-local defaults for the tools the pipeline drives.

Applied with ``setdefault`` so an operator's environment always wins. Keeps state (Prefect home,
caches) inside the project's ignored ``.easyanimate/`` folder instead of ``~`` and keeps every
library from reaching the network (hubs, telemetry).
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "EASYANIMATE_STATE_DIR"
# Written by infra/prefect_local.sh when it starts the workspace's Prefect server.
PREFECT_SERVER_PID_FILE = "prefect-server.pid"
PREFECT_SERVER_URL_FILE = "prefect-server.url"
PREFECT_SERVER_HEARTBEAT_FILE = "prefect-server.heartbeat"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, ".easyanimate")).resolve()


def configure_environment() -> None:
    state = state_dir()
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(state / "hf"),
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOCAL_STORAGE_PATH": str(state / "prefect" / "storage"),
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "TORCH_EXTENSIONS_DIR": str(state / "torch_extensions"),
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect opens its sqlite database inside PREFECT_HOME and fails if the folder is missing.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    adopt_local_prefect_server(state)


def adopt_local_prefect_server(state: Path) -> str | None:
    """Use this workspace's own Prefect server (``make prefect-up`` / ``infra/prefect_local.sh up``) when it
    runs, instead of starting a temporary one per command (the largest fixed cost of a command).

    Only a server that script started for this state folder, still alive and answering its health check
    within a second, is adopted; an operator's ``PREFECT_API_URL`` always wins.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    try:
        url = (state / PREFECT_SERVER_URL_FILE).read_text().strip()
        pid = int((state / PREFECT_SERVER_PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            if response.status != 200:
                return None
    except OSError:
        return None
    os.environ["PREFECT_API_URL"] = url
    # A use: the workspace server's supervisor (easyanimate/prefect_server.py) stops it only once unused.
    (state / PREFECT_SERVER_HEARTBEAT_FILE).touch()
    return url
