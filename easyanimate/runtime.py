"""Offline, repo-local defaults for the tools the pipeline drives.

Applied with ``setdefault`` so an operator's environment always wins. Keeps state (Prefect home,
caches) inside the project's ignored ``.easyanimate/`` folder instead of ``~`` and keeps every
library from reaching the network (hubs, telemetry).
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "EASYANIMATE_STATE_DIR"


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
