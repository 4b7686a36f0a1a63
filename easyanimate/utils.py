"""Small shared helpers: atomic writes and content hashing (the one implementation of each)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (the value is per process).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 whatever the umask; give the final file the mode a plain ``open``
    (or ``mkdir``) would, so a team sharing a machine can read the outputs."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for any writer (a library's ``save``, an encoder); on success it
    replaces ``path`` in one rename, on failure it is removed. ``suffix`` defaults to ``path``'s own, for
    writers that pick a format from the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix if suffix is None else suffix
    )
    os.close(fd)
    try:
        yield Path(tmp)
        _honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        # Some writers (safetensors) create 0600 files whatever the umask: the finished folder gets plain modes.
        for item in [tmp, *tmp.rglob("*")]:
            # A hard link (``link_or_copy``) is someone else's file too, e.g. a released checkpoint: left as it is.
            if not item.is_symlink() and (item.is_dir() or item.stat().st_nlink == 1):
                _honour_umask(item, directory=item.is_dir())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src: str, dst: str) -> str:
    """``shutil.copytree``'s ``copy_function`` that hard-links (no second copy of large weights), or copies where
    links are not possible (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def hash_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's relative names and file contents (sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


class CorruptCheckpoint(ValueError):
    """A weights file that cannot be read (truncated, bad header). A ValueError, not an OSError: retrying
    cannot fix it, and only transient I/O is retried."""


def verify_safetensors(path: str | Path) -> int:
    """Open every ``.safetensors`` file at ``path`` (a file or a folder, recursively) far enough to validate its
    header and that the header covers the file exactly; raise ``CorruptCheckpoint`` naming the first bad one.
    Reads headers only. Returns how many files were checked."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.safetensors"))
    else:  # a stage input may be any file (a captions file, a manifest): only weights are checked
        files = [path] if path.is_file() and path.suffix == ".safetensors" else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CorruptCheckpoint(f"corrupt or truncated checkpoint {file}: {exc}") from None
    return len(files)
