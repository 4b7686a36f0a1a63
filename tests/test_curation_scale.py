"""Curation at scale: the single decode pass, cross-clip VLM batches, a Dask cluster, kill-and-rerun."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from easyanimate.config import PRESETS_DIR, load_settings
from easyanimate.data.curate import Curator, analyse_video, curate_dataset
from easyanimate.data.manifest import read_manifest
from easyanimate.data.scenes import plan_clips, scan_video
from easyanimate.data.video_io import decode_frames, ffmpeg_exe, probe

# The tiny preset on its own (no project params.yaml): the defaults these tests are written against.
PRESET_ONLY = PRESETS_DIR / "tiny.yaml"

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
TRAILER = SAMPLES / "trailer_bbb.mp4"
BUNNY = SAMPLES / "bigbuckbunny.mp4"


def _cut(src: Path, dst: Path, start: float, duration: float, scale: str | None = None) -> Path:
    vf = ["-vf", f"scale={scale}"] if scale else []
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-ss",
            str(start),
            "-i",
            str(src),
            "-t",
            str(duration),
            "-an",
            *vf,
            "-c:v",
            "libx264",
            "-crf",
            "20",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(dst),
        ],
        check=True,
    )
    return dst


@pytest.fixture(scope="module")
def trailer_head(tmp_path_factory) -> Path:
    """The trailer's first 16 s at full 1280x720: cuts at 10.0 and 14.08 s."""
    out = tmp_path_factory.mktemp("head") / "trailer_head.mp4"
    # Stream copy from the first keyframe: no re-encode of 720p footage in a test.
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-i", str(TRAILER), "-t", "16", "-an", "-c:v", "copy", str(out)], check=True
    )
    return out


# Short pieces so a 10 s shot yields several clips, some released before the shot's cut is seen.
SHORT_PIECES = {"min_duration_s": 2.0, "max_duration_s": 4.0}


def _settings(**curate):
    return load_settings(PRESET_ONLY, overrides={"curate": {"scenes": SHORT_PIECES, **curate}})


# ------------------------------------------------------------------------------------ one decode pass
def test_single_pass_frames_equal_per_clip_decode(trailer_head):
    """Frames handed out by the scan are exactly what a separate decode of each clip returns."""
    settings = _settings()
    info = probe(trailer_head)
    curator = Curator(settings)
    size = curator.analysis_size(info)
    assert size == (640, 360)  # the resize path is exercised
    got: dict = {}
    samples = lambda plan: curator.samples(plan, info)  # noqa: E731
    scenes, handed = scan_video(
        trailer_head,
        info,
        settings.curate.scenes,
        size,
        times_for=lambda plan: samples(plan).times(),
        on_clip=lambda plan, frames: got.setdefault((plan.start_s, plan.end_s), frames),
    )
    assert [round(b, 2) for _, b in scenes[:-1]] == [10.0, 14.08]
    plans = [p for p in plan_clips(scenes, settings.curate.scenes) if p.ok]
    assert set(got) == {(p.start_s, p.end_s) for p in plans} and len(plans) >= 3
    for plan in plans:
        expected = decode_frames(trailer_head, times=samples(plan).times(), size=size, analysis=True)
        np.testing.assert_array_equal(got[(plan.start_s, plan.end_s)], expected)


def test_single_pass_decodes_once(trailer_head, monkeypatch):
    """analyse_video opens the file for probe + one scan; no per-clip decode."""
    import av

    from easyanimate.data import curate as curate_mod
    from easyanimate.data.captioners.sidecar import SidecarCaptioner

    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(curate_mod, "decode_frames", lambda *a, **k: pytest.fail("per-clip decode"))
    # The trailer's shots fade in from black: let the transition filter pass them (not what this test is about).
    settings = _settings(text={"enabled": False}, transition={"min_similarity": -1.0, "min_luma_ratio": 0.0})
    recs = analyse_video(trailer_head, "h", settings, SidecarCaptioner([]))
    assert len(opened) == 2  # probe (two frames) + the scan
    assert sum(r["aesthetic"] is not None for r in recs) >= 3


# ------------------------------------------------------------------------------------ VLM batched over clips
def test_vlm_captions_batched_across_clips(trailer_head, tiny_blip):
    from easyanimate.data.captioners.vlm import VLMCaptioner

    settings = load_settings(
        PRESET_ONLY,
        overrides={
            "weights": {"captioner": str(tiny_blip)},
            "curate": {
                "scenes": SHORT_PIECES,
                "text": {"enabled": False},
                "aesthetic": {"threshold": 0.0},
                "motion": {"low": 0.0, "high": 1.0},
                "transition": {"min_similarity": -1.0, "min_luma_ratio": 0.0},
                "caption": {"captioner": "vlm", "num_frames": 2, "batch_size": 4, "max_new_tokens": 4},
            },
        },
    )
    captioner = VLMCaptioner.from_settings(settings)
    captioner.setup("cpu")  # the curator's own setup() then finds the model loaded and keeps it
    batches = []
    real = captioner.model.generate

    def spy(**inputs):
        batches.append(int(inputs["pixel_values"].shape[0]))
        return real(**inputs)

    captioner.model.generate = spy
    try:
        recs = analyse_video(trailer_head, "h", settings, captioner)
    finally:
        captioner.model.generate = real
    captioned = [r for r in recs if r["caption"] is not None]
    assert len(captioned) >= 3 and all(r["status"] == "accepted" and r["caption"] for r in captioned)
    # Two frames per clip, four per generate call: every full batch mixes two clips.
    assert sum(batches) == 2 * len(captioned)
    assert all(b == 4 for b in batches[:-1]) and 0 < batches[-1] <= 4 and len(batches) < len(captioned)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from test_curation_weights import build_tiny_blip  # tests/ is on sys.path (rootdir conftest)

    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


# ------------------------------------------------------------------------------------ kill and rerun
_RUNNER = """
import sys
from easyanimate.config import PRESETS_DIR, load_settings
from easyanimate.data.curate import curate_dataset
s = load_settings(PRESETS_DIR / "tiny.yaml", overrides={"paths": {"captions": sys.argv[3]}, "curate": {"text": {"enabled": False}}})
curate_dataset(sys.argv[1], sys.argv[2], s, progress=False)
"""


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    _cut(BUNNY, raw / "a_bunny.mp4", 0, 5, "640:360")
    _cut(TRAILER, raw / "b_trailer.mp4", 0, 16, "640:360")
    _cut(TRAILER, raw / "c_trailer.mp4", 30, 10, "640:360")
    (raw / "d_broken.mp4").write_text("not a video")
    caps = [{"file": p.name, "caption": f"footage from {p.stem}"} for p in raw.glob("*.mp4")]
    (raw / "captions.yaml").write_text(yaml.safe_dump(caps))
    return raw


def _run(raw: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(raw), str(out), str(raw / "captions.yaml")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_kill_and_rerun_matches_uninterrupted(small_raw, tmp_path):
    killed = tmp_path / "killed"
    proc = _run(small_raw, killed)
    deadline = time.time() + 120
    while not list((killed / "records").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "curation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.parquet").exists()
    done_before = {p.name for p in (killed / "records").glob("*.json")}
    assert 1 <= len(done_before) < 4

    settings = load_settings(
        PRESET_ONLY,
        overrides={"paths": {"captions": str(small_raw / "captions.yaml")}, "curate": {"text": {"enabled": False}}},
    )
    resumed = curate_dataset(small_raw, killed, settings, progress=False)
    fresh = curate_dataset(small_raw, tmp_path / "fresh", settings, progress=False)
    assert resumed["clip_id"].is_unique and len(resumed) > 4
    pd.testing.assert_frame_equal(resumed, fresh)
    pd.testing.assert_frame_equal(read_manifest(killed / "manifest.parquet"), fresh)
    # Records written before the kill were reused, not redone.
    assert done_before <= {p.name for p in (killed / "records").glob("*.json")}
    assert set(resumed.loc[resumed["status"] == "accepted", "clip_path"]) == {
        f"clips/{p.name}" for p in (killed / "clips").glob("*.mp4")
    }
    assert (resumed["status"] == "quarantined").sum() == 1


# ------------------------------------------------------------------------------------ Dask
@pytest.mark.slow
def test_curate_flow_on_local_dask_cluster(small_raw, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a_bunny.mp4", "d_broken.mp4", "captions.yaml"):
        (raw / name).write_bytes((small_raw / name).read_bytes())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from prefect.server.api.server import SubprocessASGIServer

    # Start the flow's Prefect server first and hand its URL to the workers: otherwise every worker
    # process boots a temporary server of its own.
    server = SubprocessASGIServer()
    server.start()
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        params = tmp_path / "params.yaml"
        params.write_text(
            yaml.safe_dump(
                {
                    "preset": "tiny",
                    "paths": {"captions": str(raw / "captions.yaml")},
                    "curate": {
                        "task_runner": "dask",
                        "dask_address": cluster.scheduler_address,
                        "text": {"enabled": False},
                    },
                }
            )
        )
        settings = load_settings(params)
        assert pickle.loads(pickle.dumps(settings)) == settings  # crosses to the worker processes
        from flows.curate import curate_flow

        result = curate_flow(str(params), str(raw), str(tmp_path / "out"))
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    df = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert result["accepted"] == (df["status"] == "accepted").sum() >= 1
    assert set(df["source"]) == {"a_bunny.mp4", "d_broken.mp4"}
    assert df.loc[df["source"] == "d_broken.mp4", "reject_reason"].tolist() == ["not_a_video"]
    assert (tmp_path / "out" / "summary" / "reject_reasons.csv").exists()
    pd.testing.assert_frame_equal(
        pd.DataFrame(pickle.loads(pickle.dumps(df.to_dict("records")))), pd.DataFrame(df.to_dict("records"))
    )


# ------------------------------------------------------------------------------------ analysis-frame conversion
def test_analysis_frames_have_the_colours_of_a_plain_rgb_decode():
    """The scan's cheap path (shrink the decoder's YUV planes, convert only kept frames) gives the colours of the
    plain path (full-size RGB, then INTER_AREA) to within chroma-subsampling noise, with the source's colour
    matrix (BT.601 when untagged, BT.709 when tagged so); other pixel formats take the plain path itself."""
    import av

    from easyanimate.data.video_io import analysis_frame, analysis_rgb, resize_rgb

    with av.open(str(TRAILER)) as container:
        frame = next(f for i, f in enumerate(container.decode(video=0)) if i == 600)  # a colourful shot at 25 s
    size = (640, 360)
    plain = {}
    for colorspace in (2, 1):  # unspecified (FFmpeg: BT.601), BT.709
        frame.colorspace = colorspace
        plain[colorspace] = resize_rgb(frame.to_ndarray(format="rgb24"), size).astype(np.int16)
        fast = analysis_rgb(analysis_frame(frame, size)).astype(np.int16)
        diff = np.abs(fast - plain[colorspace])
        assert fast.shape == (360, 640, 3) and diff.mean() < 2.0 and np.percentile(diff, 99) < 16, colorspace
    # The BT.709 frame really was converted with BT.709, not the BT.601 matrix.
    assert np.abs(fast - plain[1]).mean() < 0.6 * np.abs(fast - plain[2]).mean()
    compact, colour = analysis_frame(frame.reformat(format="yuv444p"), size)
    assert colour is None and compact.shape == (360, 640, 3)
