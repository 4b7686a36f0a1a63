"""Fixed cost of a command around its work: ``python benchmarks/startup.py VIDEO [--code DIR]``.

Curates one video (give a ~5 s clip) three ways in fresh temporary workspaces, in this one run:
- the work itself: ``curate_dataset`` called in-process (after imports), the library's whole curation;
- ``easyanimate curate RAW OUT`` with a temporary Prefect server per command (``EASYANIMATE_PREFECT_SERVER=
  temporary``; what older checkouts always do): first in a fresh workspace (new MLflow and Prefect databases),
  then again with new output folders (warm databases; the median of ``--repeats``);
- the same with the default ``prefect.server: workspace``: the first command starts the workspace's Prefect
  server, later commands reuse it (stopped at the end, as ``make prefect-down`` does).
Prints seconds and the overhead beyond the work. ``--code DIR`` runs the commands from another checkout
(e.g. a ``git worktree`` of an older commit) to compare before and after on the same machine and load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
WORK = """
import sys, time
from pathlib import Path
from easyanimate.config import PRESETS_DIR, load_settings
from easyanimate.data.curate import curate_dataset
settings = load_settings(PRESETS_DIR / "tiny.yaml")
began = time.perf_counter()
curate_dataset(Path(sys.argv[1]), Path(sys.argv[2]), settings, progress=False)
print(time.perf_counter() - began)
"""


def env_for(workspace: Path, code: Path | None, **extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "EASYANIMATE_PREFECT_SERVER")
    }
    env.update(EASYANIMATE_STATE_DIR=str(workspace / ".easyanimate"), PATH=f"{BIN}{os.pathsep}{env['PATH']}", **extra)
    if code:
        env["PYTHONPATH"] = str(code)
    return env


def command(workspace: Path, out: str, code: Path | None, **extra: str) -> float:
    args = [sys.executable, "-m", "easyanimate.cli", "curate", "raw", out, "--preset", "tiny"]
    began = time.perf_counter()
    proc = subprocess.run(args, cwd=workspace, env=env_for(workspace, code, **extra), capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"easyanimate curate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def workspace_with(video: Path, root: Path, name: str) -> Path:
    workspace = root / name
    (workspace / "raw").mkdir(parents=True)
    shutil.copy(video, workspace / "raw" / video.name)
    # A caption for the whole video in the YAML sidecar (paths.captions; older checkouts read only that), so
    # the clip is accepted and the whole path (cut, gate) runs.
    sidecar = workspace / "data" / "samples" / "captions.yaml"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(f"- {{file: {video.name}, start: 0.0, end: 3600.0, caption: a big rabbit in a green meadow}}\n")
    return workspace


def stop_workspace_server(workspace: Path) -> None:
    """What ``make prefect-down`` does: end the workspace server's process group."""
    pid_file = workspace / ".easyanimate" / "prefect-server.pid"
    if pid_file.exists():
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        for _ in range(100):  # the supervisor removes its files once the server is down
            if not pid_file.exists():
                break
            time.sleep(0.2)


def median_of(workspace: Path, outs: list[str], code: Path | None, **extra: str) -> float:
    return statistics.median(command(workspace, out, code, **extra) for out in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("--code", type=Path, help="checkout whose easyanimate runs the commands")
    parser.add_argument("--repeats", type=int, default=3, help="warm commands per mode (their median is shown)")
    args = parser.parse_args()
    code = args.code.resolve() if args.code else None
    warm_outs = [f"warm{i}" for i in range(args.repeats)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        root = Path(tmp)
        workspace = workspace_with(args.video.resolve(), root, "work")
        proc = subprocess.run(
            [sys.executable, "-c", WORK, "raw", "out"],
            cwd=workspace,
            env=env_for(workspace, code),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(proc.stderr[-4000:])
        work = float(proc.stdout.strip().splitlines()[-1])
        # A temporary Prefect server per command (what older checkouts always do).
        temporary = {"EASYANIMATE_PREFECT_SERVER": "temporary"}
        workspace = workspace_with(args.video.resolve(), root, "temporary")
        rows.append(("temporary server: fresh workspace", command(workspace, "cold", code, **temporary)))
        rows.append(("temporary server: warm workspace (median)", median_of(workspace, warm_outs, code, **temporary)))
        if code is None:  # the default: the first command starts the workspace's server, later ones reuse it
            workspace = workspace_with(args.video.resolve(), root, "workspace")
            try:
                rows.append(("workspace server: first command (starts it)", command(workspace, "cold", code)))
                rows.append(("workspace server: later commands (median)", median_of(workspace, warm_outs, code)))
            finally:
                stop_workspace_server(workspace)
    print(f"code: {code or 'this checkout'}; video: {args.video.name}")
    print(f"the work (curate_dataset in-process)                {work:7.1f} s")
    for label, seconds in rows:
        print(f"{label:51s} {seconds:7.1f} s   overhead {seconds - work:6.1f} s")


if __name__ == "__main__":
    main()
