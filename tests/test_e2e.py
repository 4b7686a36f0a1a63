"""The whole DAG, as a user runs it: `easyanimate pipeline`, then `dvc repro`, on the bundled videos.

Runs in a throwaway copy of the project (git + DVC initialised) with the tiny preset cut down to a
few steps per stage, so the real Prefect, MLflow, DVC, accelerate, peft and diffusers paths all run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FAST = {
    "vae": {"stage1": {"steps": 6, "checkpoint_every": 3}, "stage2": {"steps": 3}},
    "dit": {"stage1": {"steps": 8}, "stage2": {"steps": 4}, "stage3": {"steps": 4}},
    "lora": {"train": {"steps": 3}},
    "generate": {"num_inference_steps": 4},
    # Gates are loose here: this proves the plumbing, not the quality of 4-step models.
    "evaluate": {"min_vae_psnr": 0.0, "max_val_loss": 10.0, "max_flicker": 1.0, "min_caption_retrieval": 0.0},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", EASYANIMATE_STATE_DIR=str(cwd / ".easyanimate")
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-8000:], sep="\n----\n")
    return proc


def make_project(root: Path, params: dict, videos: list[str], captions: bool = True) -> Path:
    root.mkdir(parents=True)
    for name in ("easyanimate", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    samples = root / "data" / "samples"
    samples.mkdir(parents=True)
    for video in videos:
        shutil.copy(REPO / "data" / "samples" / video, samples / video)
    if captions:
        shutil.copy(REPO / "data" / "samples" / "captions.yaml", samples / "captions.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # This project overrides more sections than the repo's params.yaml: generate its own dvc.yaml, as a user does.
    subprocess.run([str(BIN / "easyanimate"), "dvc-yaml"], cwd=root, check=True, capture_output=True)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), FAST)
    project = make_project(tmp_path_factory.mktemp("e2e") / "project", params, ["bigbuckbunny.mp4", "trailer_bbb.mp4"])
    began = time.perf_counter()
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    assert proc.returncode == 0, "easyanimate pipeline failed"
    return project, proc, time.perf_counter() - began


# What an uninterrupted run produced, hashed before any later test changes a setting and retrains.
WEIGHT_FOLDERS = ("vae/stage1", "vae/stage2", "dit/stage1", "dit/stage2", "dit/stage3", "lora")


def weight_hashes(project: Path) -> dict[str, str]:
    """Per folder, a hash of each safetensors file's tensors and metadata (the header's byte order varies
    between writes of equal content) and of its other files."""
    import hashlib

    from safetensors import safe_open

    out = {}
    for name in WEIGHT_FOLDERS:
        digest = hashlib.sha256()
        for file in sorted((project / "models" / name).rglob("*")):
            digest.update(file.name.encode())
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as weights:
                    digest.update(json.dumps(weights.metadata(), sort_keys=True).encode())
                    for key in sorted(weights.keys()):
                        digest.update(key.encode() + weights.get_tensor(key).numpy().tobytes())
            elif file.is_file():
                digest.update(file.read_bytes())
        out[name] = digest.hexdigest()
    return out


@pytest.fixture(scope="module")
def demo_weights(demo):
    return weight_hashes(demo[0])


def mlflow_client(project: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return MlflowClient()


def test_pipeline_writes_video_and_champion(demo):
    project, proc, seconds = demo
    from easyanimate.data.video_io import probe

    out = proc.stdout + proc.stderr
    assert "generated video:" in out and "registered model: models:/easyanimate/1" in out
    video = project / "reports" / "evaluate" / "samples" / "sample_0.mp4"
    info = probe(video)
    from easyanimate.config import load_settings

    g = load_settings(project / "params.yaml").generate  # params.yaml holds only overrides of the preset
    assert (info.width, info.height, info.num_frames) == (g.width, g.height, g.num_frames)
    manifest = project / "data" / "curated" / "manifest.parquet"
    assert manifest.exists() and (project / "data" / "curated" / "gate.json").exists()
    for stage in ("vae/stage1", "vae/stage2", "dit/stage1", "dit/stage2", "dit/stage3"):
        weights = project / "models" / stage / "diffusion_pytorch_model.safetensors"
        # The mode the umask gives (644 under the usual 022), not the 0600 some writers create files with.
        mask = os.umask(0o022)
        os.umask(mask)
        assert weights.exists() and weights.stat().st_mode & 0o777 == 0o666 & ~mask, stage
    assert any((project / "models" / "lora").glob("*.safetensors"))
    print(f"pipeline wall time {seconds:.1f} s")


def test_mlflow_runs_registry_and_lineage(demo):
    project, _, _ = demo
    client = mlflow_client(project)
    version = client.get_model_version_by_alias("easyanimate", "champion")
    assert str(version.version) == "1"
    tags = version.tags
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    curated_md5 = next(o["md5"] for o in lock["stages"]["curate"]["outs"] if o["path"] == "data/curated")
    assert tags["curated_data_dvc_hash"] == curated_md5
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"].startswith(head)
    assert len(tags["params_hash"]) == 16 and tags["eval_passed"] == "True"

    experiment = client.get_experiment_by_name("easyanimate")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) >= {
        "curate",
        "vae_stage1",
        "vae_stage2",
        "dit_stage1",
        "dit_stage2",
        "dit_stage3",
        "lora",
        "evaluate",
        "register",
    }
    dit1 = children["dit_stage1"]
    assert "dit_stage1.loss" in dit1.data.metrics
    history = client.get_metric_history(dit1.info.run_id, "dit_stage1.loss")
    assert len(history) == FAST["dit"]["stage1"]["steps"]
    assert children["dit_stage2"].data.tags["upstream_run_id"] == dit1.info.run_id
    assert children["dit_stage2"].data.tags["parent_checkpoint"].endswith("models/dit/stage1")


def test_served_model_generates_from_registry(demo):
    project, _, _ = demo
    out = project / "from_registry.mp4"
    proc = run(
        [
            str(BIN / "easyanimate"),
            "generate",
            "a rabbit on a hill",
            "--out",
            str(out),
            "--model",
            "models:/easyanimate@champion",
            "--steps",
            "3",
        ],
        project,
    )
    assert proc.returncode == 0
    from easyanimate.data.video_io import probe

    assert probe(out).num_frames == 8


def test_rerun_is_a_prefect_cache_hit(demo):
    project, _, _ = demo
    proc = run([str(BIN / "easyanimate"), "run", "dit_stage1"], project)
    assert proc.returncode == 0
    assert "Cached" in proc.stdout + proc.stderr


def _training_runs(project: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(
            "select name, status from runs where name in ('vae_stage1','vae_stage2','dit_stage1','dit_stage2',"
            "'dit_stage3','lora') order by start_time"
        ).fetchall()


def test_noop_pipeline_rerun_trains_nothing_and_registers_nothing(demo, demo_weights):
    project, _, cold_seconds = demo
    client = mlflow_client(project)
    versions = len(client.search_model_versions("name = 'easyanimate'"))
    trainings = _training_runs(project)
    began = time.perf_counter()
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    seconds = time.perf_counter() - began
    assert proc.returncode == 0
    assert _training_runs(project) == trainings  # no stage trained: each was a cache hit
    assert len(client.search_model_versions("name = 'easyanimate'")) == versions
    assert "registered model: models:/easyanimate/1" in proc.stdout
    assert weight_hashes(project) == demo_weights
    print(f"no-op pipeline rerun {seconds:.1f} s vs cold {cold_seconds:.1f} s ({seconds / cold_seconds:.1%})")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the pipeline ended before {what}"
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_pipeline(project: Path, until, what: str) -> None:
    """Start `easyanimate pipeline`, SIGKILL it and everything it started once ``until()`` holds."""
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", EASYANIMATE_STATE_DIR=str(project / ".easyanimate")
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "easyanimate"), "pipeline"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(until, proc, what)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _register_running(project: Path) -> bool:
    if not (project / "mlflow.db").exists():
        return False
    try:
        with sqlite3.connect(project / "mlflow.db", timeout=1) as db:
            return bool(db.execute("select 1 from runs where name = 'register' and status = 'RUNNING'").fetchall())
    except sqlite3.OperationalError:  # locked by the writer, or tables not made yet
        return False


def test_pipeline_killed_anywhere_resumes_to_the_same_weights(tmp_path, demo_weights):
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), FAST)
    project = make_project(tmp_path / "killed", params, ["bigbuckbunny.mp4", "trailer_bbb.mp4"])
    checkpoints = project / ".easyanimate" / "checkpoints"
    # 1. during curation, after the first video's record
    _kill_pipeline(project, lambda: any((project / "data" / "curated" / "records").glob("*.json")), "curation")
    # 2. in VAE stage 1, after its first checkpoint (step 3 of 6)
    _kill_pipeline(
        project, lambda: any(checkpoints.glob("vae_stage1-*/checkpoint-0000003/trainer_state.json")), "a checkpoint"
    )
    first_attempt = {p.name for p in checkpoints.glob("vae_stage1-*")}
    # 3. while registering
    _kill_pipeline(project, lambda: _register_running(project), "register")
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    assert proc.returncode == 0

    assert {p.name for p in checkpoints.glob("vae_stage1-*")} == first_attempt  # same folder: resumed, not redone
    metrics = json.loads((project / "reports" / "vae_stage1" / "metrics.json").read_text())
    assert metrics["vae_stage1/resumed_from_step"] == 3.0
    assert weight_hashes(project) == demo_weights  # as if never interrupted
    with sqlite3.connect(project / "mlflow.db") as db:
        statuses = dict(db.execute("select status, count(*) from runs group by status").fetchall())
    assert "RUNNING" not in statuses and statuses.get("KILLED", 0) >= 3, statuses
    # Completed stages were cache hits: each trained once, plus the killed VAE attempt.
    trained = [name for name, status in _training_runs(project) if status == "FINISHED"]
    assert sorted(trained) == sorted(set(trained)), trained
    client = mlflow_client(project)
    versions = client.search_model_versions("name = 'easyanimate'")
    assert all(v.tags.get("easyanimate.registered") == "true" for v in versions)
    assert client.get_model_version_by_alias("easyanimate", "champion").version in {v.version for v in versions}


def test_dvc_repro_after_demo_is_a_noop_and_dit_change_reruns_only_downstream(demo):
    project, _, _ = demo
    began = time.perf_counter()
    proc = run([str(BIN / "dvc"), "repro"], project)
    noop_seconds = time.perf_counter() - began
    assert proc.returncode == 0
    assert "Running stage" not in proc.stdout, proc.stdout
    print(f"dvc repro no-op took {noop_seconds:.1f} s")
    assert (project / ".easyanimate" / "dvc-remote").is_dir()  # the demo pushed to the local remote

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dit"]["stage2"]["steps"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "dvc"), "repro"], project)
    assert proc.returncode == 0
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    ran.discard("dvc_yaml_check")  # the guard reruns on any params.yaml change (a few seconds)
    assert ran == {"dit_stage2", "dit_stage3", "lora", "evaluate", "register"}, proc.stdout
    metrics = json.loads((project / "reports" / "dit_stage2" / "metrics.json").read_text())
    assert metrics["dit_stage2/steps"] == 5.0
    client = mlflow_client(project)
    assert client.get_model_version("easyanimate", "2").tags["eval_passed"] == "True"


def test_uncaptioned_footage_stops_before_training_saying_how_to_caption(tmp_path):
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), FAST)
    project = make_project(tmp_path / "gate", params, ["bigbuckbunny.mp4"], captions=False)
    proc = run([str(BIN / "easyanimate"), "pipeline", "--no-version-data"], project)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    # Curation keeps the clip that passes every filter (uncaptioned); training refuses it with the same
    # message the curation summary gave, naming the ways to caption.
    # The command's own error is one whole line (Prefect's log around it is its own).
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("cannot train on uncaptioned clips:")]
    assert len(refusals) == 1 and ".txt" in refusals[0] and "weights.captioner" in refusals[0]
    assert out.count("have no caption") >= 2
    assert not (project / "models").exists()
    import pandas as pd

    manifest = pd.read_parquet(project / "data" / "curated" / "manifest.parquet")
    accepted = manifest[manifest["status"] == "accepted"]
    assert len(accepted) >= 1 and set(accepted["caption_status"]) == {"uncaptioned"}
    assert accepted["caption"].isna().all()


def test_cli_curate_writes_manifest_and_clips(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(REPO / "data" / "samples" / "bigbuckbunny.mp4", raw / "bigbuckbunny.mp4")
    (raw / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "data" / "samples").mkdir(parents=True)  # paths.captions is relative to the working folder
    shutil.copy(REPO / "data" / "samples" / "captions.yaml", tmp_path / "data" / "samples" / "captions.yaml")
    out = tmp_path / "out"
    proc = run(
        [str(BIN / "easyanimate"), "curate", str(raw), str(out), "--params", str(REPO / "params.yaml")], tmp_path
    )
    assert proc.returncode == 0
    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert set(manifest["source"]) == {"bigbuckbunny.mp4", "broken.mp4"}
    broken = manifest[manifest["source"] == "broken.mp4"]
    assert broken["status"].tolist() == ["quarantined"] and broken["reject_reason"].item() == "not_a_video"
    accepted = manifest[manifest["status"] == "accepted"]
    assert len(accepted) == 1 and (out / accepted["clip_path"].item()).exists()
