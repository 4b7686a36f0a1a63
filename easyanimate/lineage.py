"""Lineage facts attached to every registered model: git commit, DVC data hash, params hash."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from easyanimate.config import Settings


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_hash(path: str | Path) -> str:
    """The md5 DVC gives ``path`` (``<md5>.dir`` for a folder), the same value ``dvc.lock`` records."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5")
    return obj.hash_info.value


def params_hash(settings: Settings) -> str:
    return settings.section_hash()
