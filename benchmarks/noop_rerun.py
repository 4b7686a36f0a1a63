"""Cost of a rerun with nothing changed, against the cold run: ``python benchmarks/noop_rerun.py [--fast]``.

Copies the project (code, bundled videos, params.yaml) into a temporary git + DVC workspace, then times, in
this one run:
- ``easyanimate pipeline`` cold (every stage trains),
- ``easyanimate pipeline`` again with nothing changed (every stage a cache hit; no training step, no new
  registry version: both are checked and reported),
- ``easyanimate run dit_stage1`` and ``dvc repro`` with nothing changed.
Prints each rerun's seconds and its ratio to the cold pipeline. ``--fast`` cuts the training steps (as the
end-to-end test does) for a quick look; the figure to quote is without it (the demo's own settings).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The end-to-end test's project copy and step cuts (needs the test extra: pip install -e '.[test]').
from tests.test_e2e import BIN, FAST, _merge, make_project  # noqa: E402


def workspace(root: Path, fast: bool) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return make_project(
        root / "project", _merge(params, FAST) if fast else params, ["bigbuckbunny.mp4", "trailer_bbb.mp4"]
    )


def timed(args: list[str], project: Path) -> tuple[float, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env["EASYANIMATE_STATE_DIR"] = str(project / ".easyanimate")
    env.pop("MLFLOW_TRACKING_URI", None)
    began = time.perf_counter()
    proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return seconds, proc.stdout + proc.stderr


def registry_counts(project: Path) -> tuple[int, int]:
    """(model versions, training runs) in the workspace's MLflow database."""
    with sqlite3.connect(project / "mlflow.db") as db:
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
        trainings = db.execute(
            "select count(*) from runs where name in ('vae_stage1','vae_stage2','dit_stage1','dit_stage2',"
            "'dit_stage3','lora')"
        ).fetchone()[0]
    return versions, trainings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="few training steps (a quick look, not the figure)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noop-bench-") as tmp:
        project = workspace(Path(tmp), args.fast)
        cold, _ = timed([str(BIN / "easyanimate"), "pipeline"], project)
        before = registry_counts(project)
        rows = [("easyanimate pipeline (cold)", cold, "")]
        for label, cmd in (
            ("easyanimate pipeline (no change)", [str(BIN / "easyanimate"), "pipeline"]),
            ("easyanimate run dit_stage1 (no change)", [str(BIN / "easyanimate"), "run", "dit_stage1"]),
            ("dvc repro (no change)", [str(BIN / "dvc"), "repro"]),
        ):
            seconds, out = timed(cmd, project)
            note = "ran a stage!" if "Running stage" in out else ""
            rows.append((label, seconds, note))
        after = registry_counts(project)
    print(f"settings: {'--fast (cut steps)' if args.fast else 'the demo params.yaml'}")
    for label, seconds, note in rows:
        print(f"{label:42s} {seconds:8.1f} s   {seconds / cold:6.1%} of cold  {note}")
    print(
        f"registry versions {before[0]} -> {after[0]}; training runs {before[1]} -> {after[1]} (equal: nothing redone)"
    )


if __name__ == "__main__":
    main()
