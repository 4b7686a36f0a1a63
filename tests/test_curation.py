"""Data curation on real footage (Big Buck Bunny samples), degraded in-test to hit every filter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from easyanimate.config import SceneConfig, load_settings
from easyanimate.data import curate as curate_mod
from easyanimate.data.captioners.sidecar import SidecarCaptioner
from easyanimate.data.curate import build_manifest, curate_dataset, curate_video
from easyanimate.data.manifest import read_manifest, write_manifest
from easyanimate.data.quality import run_quality_gate
from easyanimate.data.scenes import ClipPlan, detect_scenes, plan_clips
from easyanimate.data.video_io import VideoError, cut_clip, decode_frames, ffmpeg_exe, probe, write_video

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
BUNNY = SAMPLES / "bigbuckbunny.mp4"
TRAILER = SAMPLES / "trailer_bbb.mp4"
VARIANTS = ("clean", "dark", "blur", "frozen", "text", "tiny")
EXPECTED = {
    "clean": ("accepted", None),
    "dark": ("rejected", "low_aesthetic"),
    "blur": ("rejected", "low_aesthetic"),
    "frozen": ("rejected", "too_static"),
    "text": ("rejected", "too_much_text"),
    "tiny": ("rejected", "low_resolution"),
}
BAD = {  # file -> acceptable quarantine reasons (the exact one depends on where FFmpeg gives up)
    "zero.mp4": {"empty_file"},
    "truncated.mp4": {"not_a_video", "unreadable", "too_few_frames"},
    "notes.mp4": {"not_a_video"},
    "audio_only.mp4": {"no_video_stream"},
    "one_frame.mp4": {"too_few_frames"},
}


def _settings(captions: Path | None = None, **curate):
    overrides = {"paths": {"captions": str(captions)}} if captions else {}
    # The 4 s test clips stay one clip each (the tiny preset cuts 3-3.4 s pieces).
    overrides["curate"] = {"scenes": {"max_duration_s": 10.0}, **curate}
    return load_settings(path="/nonexistent/params.yaml", overrides=overrides)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def clean_clip(tmp_path_factory) -> Path:
    """A real 4 s one-shot clip at 640x360 (downscaled so every test stays fast)."""
    out = tmp_path_factory.mktemp("src") / "clean.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-ss", "0.5", "-i", str(BUNNY), "-t", "4", "-an", "-vf", "scale=640:360",
         "-c:v", "libx264", "-crf", "20", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(out)],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, clean_clip) -> Path:
    """Clean clip, five degraded twins, and five broken inputs, plus a captions sidecar."""
    d = tmp_path_factory.mktemp("raw")
    frames = decode_frames(clean_clip)
    fps = probe(clean_clip).fps
    shutil.copy(clean_clip, d / "clean.mp4")
    write_video((frames.astype(np.float32) * 0.25).astype(np.uint8), d / "dark.mp4", fps)
    write_video(np.stack([cv2.GaussianBlur(f, (0, 0), 5) for f in frames]), d / "blur.mp4", fps)
    write_video(np.repeat(frames[:1], len(frames), axis=0), d / "frozen.mp4", fps)
    texted = frames.copy()
    for f in texted:
        cv2.putText(f, "BIG SALE", (30, 140), cv2.FONT_HERSHEY_SIMPLEX, 3.0, (255, 255, 255), 10)
        cv2.putText(f, "50% OFF", (60, 260), cv2.FONT_HERSHEY_SIMPLEX, 3.0, (255, 255, 0), 10)
    write_video(texted, d / "text.mp4", fps)
    write_video(np.stack([cv2.resize(f, (96, 54), interpolation=cv2.INTER_AREA) for f in frames]), d / "tiny.mp4", fps)
    # Broken inputs.
    (d / "zero.mp4").write_bytes(b"")
    data = clean_clip.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "notes.mp4").write_text("this is not a video\n" * 50)
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac",
         str(d / "audio_only.mp4")],
        check=True,
    )
    write_video(frames[:1], d / "one_frame.mp4", fps)
    captions = [{"file": f"{v}.mp4", "caption": f"a {v} shot of a big rabbit in a meadow"} for v in VARIANTS]
    (d / "captions.yaml").write_text(yaml.safe_dump(captions))
    return d


@pytest.fixture(scope="session")
def curated(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    settings = _settings(dataset_dir / "captions.yaml")
    df = curate_dataset(dataset_dir, out, settings, progress=False)
    return df, out, settings


def _row(df: pd.DataFrame, source: str) -> pd.Series:
    rows = df[df["source"] == source]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# ------------------------------------------------------------------------------------ video io
def test_probe_and_decode_times(clean_clip):
    info = probe(clean_clip)
    assert (info.width, info.height) == (640, 360)
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(4.0, abs=0.1)
    # Requested order is preserved and each frame is the nearest one (distinct frames, right size).
    fr = decode_frames(clean_clip, times=[3.0, 0.5, 3.0, 1.5], size=(160, 90))
    assert fr.shape == (4, 90, 160, 3) and fr.dtype == np.uint8
    assert np.array_equal(fr[0], fr[2]) and not np.array_equal(fr[0], fr[1])
    span = decode_frames(clean_clip, start_s=1.0, end_s=2.0)
    assert len(span) == 25


def test_cut_clip_is_accurate(clean_clip, tmp_path):
    dst = cut_clip(clean_clip, tmp_path / "c.mp4", 1.0, 3.0, load_settings("/nonexistent.yaml").curate.encode)
    info = probe(dst)
    assert info.num_frames == 50 and info.duration_s == pytest.approx(2.0, abs=0.05)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


# ------------------------------------------------------------------------------------ scenes
def test_trailer_scene_cuts():
    scenes = detect_scenes(TRAILER, SceneConfig())
    assert 8 <= len(scenes) <= 12
    # Scenes tile the video: contiguous, from 0 to the end.
    assert scenes[0][0] == 0.0 and scenes[-1][1] == pytest.approx(55.1, abs=0.2)
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(scenes, scenes[1:]))
    # Hard cuts of the trailer (checked by eye on frames either side of each cut).
    known = [10.0, 14.08, 24.71, 32.0, 37.5, 41.17, 43.71, 51.83]
    cuts = [s for s, _ in scenes[1:]]
    hits = sum(any(abs(c - k) < 0.25 for c in cuts) for k in known)
    assert hits >= 7, cuts
    # Frames just either side of a cut differ far more than frames within a shot.
    a, b, c = decode_frames(TRAILER, times=[24.5, 24.9, 25.3], size=(160, 90)).astype(np.float32)
    assert np.abs(a - b).mean() > 3 * np.abs(b - c).mean()


def test_single_shot_is_one_scene():
    scenes = detect_scenes(BUNNY, SceneConfig())
    assert len(scenes) == 1 and scenes[0][1] == pytest.approx(5.28, abs=0.1)


def test_plan_clips_rules():
    cfg = SceneConfig(trim_tail_s=0.5, min_duration_s=3.0, max_duration_s=10.0)
    plans = plan_clips([(0.0, 2.0), (2.0, 8.0), (8.0, 31.0), (31.0, 44.0)], cfg)
    assert plans[0] == ClipPlan(0.0, 1.5, "too_short")
    assert plans[1] == ClipPlan(2.0, 7.5)
    # 22.5 s scene -> 10 + 10 + 2.5 (remainder too short)
    assert plans[2:5] == [ClipPlan(8.0, 18.0), ClipPlan(18.0, 28.0), ClipPlan(28.0, 30.5, "too_short")]
    # 12.5 s scene -> 10 + 2.5 (rejected): pieces never exceed max
    assert plans[5:] == [ClipPlan(31.0, 41.0), ClipPlan(41.0, 43.5, "too_short")]
    assert all(p.duration_s <= cfg.max_duration_s for p in plans)


# ------------------------------------------------------------------------------------ filters on real footage
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_outcome(curated, variant):
    df, out, settings = curated
    row = _row(df, f"{variant}.mp4")
    status, reason = EXPECTED[variant]
    assert (row["status"], None if pd.isna(row["reject_reason"]) else row["reject_reason"]) == (status, reason)
    if status == "accepted":
        assert (out / row["clip_path"]).exists()
        assert row["caption"].startswith("a clean shot")
        assert row["aesthetic"] >= settings.curate.aesthetic.threshold
        assert settings.curate.motion.low <= row["motion"] <= settings.curate.motion.high
        assert row["text_area"] <= settings.curate.text.max_text_area


def test_degraded_scores_are_clearly_separated(curated):
    df, _, settings = curated
    thr = settings.curate.aesthetic.threshold
    clean = _row(df, "clean.mp4")
    assert _row(df, "dark.mp4")["aesthetic"] < thr - 1.0 < clean["aesthetic"] - 2.0
    assert _row(df, "blur.mp4")["aesthetic"] < thr - 1.0
    assert _row(df, "frozen.mp4")["motion"] < settings.curate.motion.low / 10
    assert _row(df, "text.mp4")["text_area"] > 3 * settings.curate.text.max_text_area
    # Scores of filters after the failing one are not computed (cheap filters short-circuit).
    assert pd.isna(_row(df, "dark.mp4")["motion"]) and pd.isna(_row(df, "frozen.mp4")["text_area"])


def test_no_caption_rejected(clean_clip, tmp_path):
    settings = _settings()
    recs = curate_video(clean_clip, settings, tmp_path, captioner=SidecarCaptioner([]))
    assert [(r["status"], r["reject_reason"]) for r in recs] == [("rejected", "no_caption")]
    assert recs[0]["aesthetic"] is not None and recs[0]["text_area"] is not None  # every computed score kept


def test_sidecar_largest_overlap(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump([
        {"file": "a.mp4", "start": 0, "end": 4, "caption": "first"},
        {"file": "a.mp4", "start": 4, "end": 20, "caption": "second"},
        {"file": "b.mp4", "caption": "whole"},
    ]))
    cap = SidecarCaptioner.from_path(p)
    assert cap("a.mp4", 1.0, 5.0) == "first"
    assert cap("a.mp4", 3.0, 9.0) == "second"
    assert cap("b.mp4", 100.0, 105.0) == "whole"
    assert cap("c.mp4", 0.0, 5.0) == ""


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_quarantined(curated, name):
    df, _, _ = curated
    row = _row(df, name)
    assert row["status"] == "quarantined"
    assert row["reject_reason"] in BAD[name]


def test_probe_raises_videoerror(dataset_dir):
    with pytest.raises(VideoError) as exc:
        probe(dataset_dir / "notes.mp4")
    assert exc.value.reason == "not_a_video"


def test_batch_covers_every_input(curated, dataset_dir):
    df, _, _ = curated
    videos = {p.name for p in dataset_dir.glob("*.mp4")}
    assert set(df["source"]) == videos
    assert df["clip_id"].is_unique
    acc = df[df["status"] == "accepted"]
    assert acc["split"].isin(["train", "val"]).all() and df.loc[df["status"] != "accepted", "split"].isna().all()


# ------------------------------------------------------------------------------------ resume
def test_rerun_reuses_records(curated, dataset_dir, monkeypatch):
    df, out, settings = curated
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == len(list(dataset_dir.glob("*.mp4")))
    mtimes = {p: p.stat().st_mtime_ns for p in records}

    def boom(*a, **k):
        raise AssertionError("rerun must not decode or detect scenes")

    monkeypatch.setattr(curate_mod, "detect_scenes", boom)
    monkeypatch.setattr(curate_mod, "scan_video", boom)
    monkeypatch.setattr(curate_mod, "decode_frames", boom)
    monkeypatch.setattr(curate_mod, "probe", boom)
    again = curate_dataset(dataset_dir, out, settings, progress=False)
    pd.testing.assert_frame_equal(again, df)
    assert {p: p.stat().st_mtime_ns for p in records} == mtimes


def test_record_key_depends_on_settings(curated, dataset_dir):
    _, out, settings = curated
    from easyanimate.data.curate import record_path
    from easyanimate.data.manifest import file_hash

    h = file_hash(dataset_dir / "zero.mp4")
    other = _settings(dataset_dir / "captions.yaml", val_fraction=0.5)
    assert record_path(out, h, other) != record_path(out, h, settings)


# ------------------------------------------------------------------------------------ manifest + gate
def test_manifest_round_trip(curated, tmp_path):
    df, _, _ = curated
    path = write_manifest(df, tmp_path / "m.parquet")
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df)
    assert set(back["status"]) <= {"accepted", "rejected", "quarantined"}


def test_split_deterministic_with_val(curated):
    df, _, settings = curated
    acc = df[df["status"] == "accepted"]
    fake = [dict(r, clip_id=f"{r['clip_id']}-{i}", status="accepted") for i, r in
            enumerate([acc.iloc[0].to_dict()] * 5)]
    m1, m2 = build_manifest(fake, settings), build_manifest(list(reversed(fake)), settings)
    assert (m1["split"] == "val").sum() >= 1
    assert dict(zip(m1["clip_id"], m1["split"])) == dict(zip(m2["clip_id"], m2["split"]))
    # Duplicate clip ids (same source bytes twice) collapse to one row.
    assert len(build_manifest(fake + fake, settings)) == 5


def test_split_keeps_scenes_together(curated):
    """Pieces of one long scene are near-copies: they must all land on the same side of the split."""
    df, _, settings = curated
    row = df[df["status"] == "accepted"].iloc[0].to_dict()
    fake = [dict(row, clip_id=f"c{scene}-{piece}", scene_id=f"s{scene}", status="accepted")
            for scene in range(12) for piece in range(3)]
    m = build_manifest(fake, settings)
    per_scene = m.groupby("scene_id")["split"].nunique()
    assert (per_scene == 1).all()
    assert set(m["split"]) == {"train", "val"}


def test_plans_carry_their_scene():
    plans = plan_clips([(0.0, 2.0), (2.0, 31.0)], SceneConfig(trim_tail_s=0.5, min_duration_s=3.0, max_duration_s=10.0))
    assert [p.scene for p in plans] == [(0.0, 2.0)] + [(2.0, 31.0)] * 3


def test_gate_passes_on_good_manifest(curated, tmp_path):
    df, out, settings = curated
    result = run_quality_gate(df, settings, out, report_dir=tmp_path / "gate_report")
    assert result.success, result.failures
    # gate.json is what the data decides, nothing run-specific: the curated folder's hash stays put.
    assert json.loads((out / "gate.json").read_text()) == {"success": True, "failures": []}
    assert result.report_dir == tmp_path / "gate_report" and (result.report_dir / "index.html").exists()
    assert not (out / "gate_report").exists()


def test_gate_fails_on_poisoned_manifest(curated):
    df, out, settings = curated
    good = df[df["status"] == "accepted"].iloc[0]
    bad = pd.concat([df, pd.DataFrame([
        good.to_dict(),  # duplicate id
        dict(good.to_dict(), clip_id="neg", duration_s=-1.0),
        dict(good.to_dict(), clip_id="long", duration_s=60.0),
        dict(good.to_dict(), clip_id="gone", clip_path="clips/gone.mp4"),
    ]).astype(df.dtypes.to_dict())], ignore_index=True)
    result = run_quality_gate(bad, settings, out / "poisoned", clips_dir=out)
    assert not result.success
    text = "\n".join(result.failures)
    assert "expect_column_values_to_be_unique(clip_id" in text and good["clip_id"] in text
    dur = next(f for f in result.failures if "(duration_s" in f)
    assert "neg" in dur and "long" in dur
    files = next(f for f in result.failures if "(file_ok" in f)
    assert "gone" in files and good["clip_id"] not in files
    assert (out / "poisoned" / "gate.json").exists()


def test_gate_fails_without_accepted(curated, tmp_path):
    df, _, settings = curated
    result = run_quality_gate(df[df["status"] != "accepted"], settings, tmp_path)
    assert not result.success and "no accepted clips" in result.failures[0]


def test_library_never_imports_orchestrators():
    src = Path(__file__).resolve().parents[1] / "easyanimate" / "data"
    for py in src.rglob("*.py"):
        text = py.read_text()
        assert "import prefect" not in text and "import mlflow" not in text, py
        assert "from prefect" not in text and "from mlflow" not in text, py
