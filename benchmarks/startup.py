"""Fixed cost of a command around its work: ``python benchmarks/startup.py VIDEO [--code DIR]``.

Curates one video (give a ~5 s clip) three ways in fresh temporary workspaces, in this one run:
- the work itself: ``curate_dataset`` called in-process (after imports), the library's whole curation;
- ``easyanimate curate RAW OUT``, first command in a fresh workspace (new MLflow and Prefect databases) and
  then again with a new output folder (warm databases; what every later command pays);
- the same warm command with the workspace's own Prefect server running (``make prefect-up``), which every
  command adopts instead of starting a temporary one.
Prints seconds and the overhead beyond the work. ``--code DIR`` runs the commands from another checkout
(e.g. a ``git worktree`` of an older commit) to compare before and after on the same machine and load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
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


def start_prefect_server(workspace: Path) -> subprocess.Popen:
    """What ``infra/prefect_local.sh up`` leaves behind: a server, its pid and URL in the state folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = workspace / ".easyanimate"
    env = env_for(workspace, None, PREFECT_HOME=str(state / "prefect-server"))
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    state.mkdir(parents=True, exist_ok=True)
    (state / "prefect-server.pid").write_text(str(server.pid))
    (state / "prefect-server.url").write_text(url)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("--code", type=Path, help="checkout whose easyanimate runs the commands")
    args = parser.parse_args()
    code = args.code.resolve() if args.code else None
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
        workspace = workspace_with(args.video.resolve(), root, "cli")
        cold = command(workspace, "out1", code)
        warm = command(workspace, "out2", code)
        served = None
        if code is None:
            server = start_prefect_server(workspace)
            try:
                served = command(workspace, "out3", code)
            finally:
                os.killpg(server.pid, 15)
                server.wait()
    print(f"code: {code or 'this checkout'}; video: {args.video.name}")
    print(f"the work (curate_dataset in-process)          {work:7.1f} s")
    rows = [("command, fresh workspace", cold), ("command, warm workspace", warm)]
    if served is not None:
        rows.append(("command, workspace Prefect server adopted", served))
    for label, seconds in rows:
        print(f"{label:45s} {seconds:7.1f} s   overhead {seconds - work:6.1f} s")


if __name__ == "__main__":
    main()
