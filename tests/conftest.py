"""Test-wide environment: offline, and all tool state (Prefect, caches) in a throwaway folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="easyanimate-test-state-"))
os.environ.setdefault("EASYANIMATE_STATE_DIR", str(_STATE))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from easyanimate.runtime import configure_environment  # noqa: E402

configure_environment()

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
