"""Test-wide environment: offline, and all tool state (Prefect, caches) in a throwaway folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="easyanimate-test-state-"))
os.environ.setdefault("EASYANIMATE_STATE_DIR", str(_STATE))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from easyanimate.runtime import configure_environment  # noqa: E402

configure_environment()

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and are then immune to other busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
