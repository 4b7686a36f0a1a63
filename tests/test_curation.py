"""Data curation on real footage (Big Buck Bunny samples), degraded in-test to hit every filter."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from easyanimate.config import PRESETS_DIR, SceneConfig, load_settings
from easyanimate.data import curate as curate_mod
from easyanimate.data.captioners.sidecar import SidecarCaptioner
from easyanimate.data.curate import build_manifest, curate_dataset, curate_video
from easyanimate.data.manifest import read_manifest, write_manifest
from easyanimate.data.quality import run_quality_gate
from easyanimate.data.scenes import ClipPlan, detect_scenes, plan_clips
from easyanimate.data.video_io import VideoError, cut_clip, decode_frames, ffmpeg_exe, probe, write_video

# The tiny preset on its own (no project params.yaml): the defaults these tests are written against.
PRESET_ONLY = PRESETS_DIR / "tiny.yaml"

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
    return load_settings(path=PRESET_ONLY, overrides=overrides)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def clean_clip(tmp_path_factory) -> Path:
    """A real 4 s one-shot clip at 640x360 (downscaled so every test stays fast)."""
    out = tmp_path_factory.mktemp("src") / "clean.mp4"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-ss",
            "0.5",
            "-i",
            str(BUNNY),
            "-t",
            "4",
            "-an",
            "-vf",
            "scale=640:360",
            "-c:v",
            "libx264",
            "-crf",
            "20",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            str(out),
        ],
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
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=1",
            "-c:a",
            "aac",
            str(d / "audio_only.mp4"),
        ],
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
    dst = cut_clip(clean_clip, tmp_path / "c.mp4", 1.0, 3.0, load_settings(PRESET_ONLY).curate.encode)
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


def test_no_caption_kept_as_uncaptioned(clean_clip, tmp_path):
    settings = _settings()
    recs = curate_video(clean_clip, settings, tmp_path, captioner=SidecarCaptioner([]))
    # A missing caption is not a filter verdict: the clip is kept (and cut), marked uncaptioned.
    assert [(r["status"], r["reject_reason"], r["caption_status"]) for r in recs] == [("accepted", None, "uncaptioned")]
    assert recs[0]["caption"] is None and (tmp_path / recs[0]["clip_path"]).exists()
    assert recs[0]["aesthetic"] is not None and recs[0]["text_area"] is not None  # every computed score kept


def test_sidecar_largest_overlap(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump(
            [
                {"file": "a.mp4", "start": 0, "end": 4, "caption": "first"},
                {"file": "a.mp4", "start": 4, "end": 20, "caption": "second"},
                {"file": "b.mp4", "caption": "whole"},
            ]
        )
    )
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
    # Distinct clips: no shared perceptual hash (near-duplicate removal is tested in test_curation_part2).
    fake = [
        dict(r, clip_id=f"{r['clip_id']}-{i}", status="accepted", phash=None)
        for i, r in enumerate([acc.iloc[0].to_dict()] * 5)
    ]
    m1, m2 = build_manifest(fake, settings), build_manifest(list(reversed(fake)), settings)
    assert (m1["split"] == "val").sum() >= 1
    assert dict(zip(m1["clip_id"], m1["split"])) == dict(zip(m2["clip_id"], m2["split"]))
    # Duplicate clip ids (same source bytes twice) collapse to one row.
    assert len(build_manifest(fake + fake, settings)) == 5


def test_split_keeps_scenes_together(curated):
    """Pieces of one long scene are near-copies: they must all land on the same side of the split."""
    df, _, settings = curated
    row = dict(df[df["status"] == "accepted"].iloc[0].to_dict(), phash=None)  # distinct clips, no shared hash
    fake = [
        dict(row, clip_id=f"c{scene}-{piece}", scene_id=f"s{scene}", status="accepted")
        for scene in range(12)
        for piece in range(3)
    ]
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
    bad = pd.concat(
        [
            df,
            pd.DataFrame(
                [
                    good.to_dict(),  # duplicate id
                    dict(good.to_dict(), clip_id="neg", duration_s=-1.0),
                    dict(good.to_dict(), clip_id="long", duration_s=60.0),
                    dict(good.to_dict(), clip_id="gone", clip_path="clips/gone.mp4"),
                ]
            ).astype(df.dtypes.to_dict()),
        ],
        ignore_index=True,
    )
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


# ------------------------------------------------------------------------------------ filters and captioners as stage objects
from easyanimate.data.filters import FILTERS, build_filters  # noqa: E402
from easyanimate.data.filters.base import ClipFilter, Column  # noqa: E402
from easyanimate.stage_api import StageContext  # noqa: E402
from easyanimate.utils import hash_path  # noqa: E402

SETUPS: list[str] = []  # devices BrightnessFilter.setup was called with, across instances
SCORED: list[int] = []


class BrightnessFilter(ClipFilter):
    """A filter that lives only in this test: registering it must be all it takes."""

    name = "brightness"
    columns = (Column("brightness", digits=3),)

    @property
    def decode_side(self) -> int:
        return 64  # smaller than the others': must not change the shared decode size

    def sample_times(self, plan, info):
        return [(plan.start_s + plan.end_s) / 2]

    def setup(self, device: str) -> None:
        SETUPS.append(device)

    def score(self, frames):
        SCORED.append(len(frames))
        return {"brightness": float(frames.mean()) / 255.0}

    def accept(self, scores):
        return None if scores["brightness"] >= 0.05 else "too_dark"

    def expectations(self):
        import great_expectations as gx

        return [gx.expectations.ExpectColumnValuesToBeBetween(column="brightness", min_value=0.05, max_value=1.0)]


@pytest.fixture
def brightness(monkeypatch):
    monkeypatch.setitem(FILTERS, "brightness", BrightnessFilter)
    SETUPS.clear()
    SCORED.clear()
    yield


@pytest.fixture(scope="session")
def two_videos(tmp_path_factory, clean_clip) -> Path:
    """Two distinct 4 s videos (the clean clip and its mirror image) with captions."""
    raw = tmp_path_factory.mktemp("two")
    shutil.copy(clean_clip, raw / "a.mp4")
    write_video(decode_frames(clean_clip)[:, :, ::-1].copy(), raw / "b.mp4", probe(clean_clip).fps)
    (raw / "captions.yaml").write_text(yaml.safe_dump([{"file": f, "caption": "a rabbit"} for f in ("a.mp4", "b.mp4")]))
    return raw


def _stage_settings(raw: Path, out: Path, **curate):
    # 1-1.5 s pieces: each 4 s video yields two scored clips; no OCR, it is not what these tests are about.
    return load_settings(
        PRESET_ONLY,
        overrides={
            "paths": {"raw_videos": str(raw), "captions": str(raw / "captions.yaml"), "curated": str(out)},
            "curate": {"scenes": {"min_duration_s": 1.0, "max_duration_s": 1.5}, "text": {"enabled": False}, **curate},
        },
    )


def test_registered_filter_flows_into_manifest_gate_and_summaries(brightness, two_videos, tmp_path):
    from easyanimate.data.curate import Curator
    from easyanimate.data.quality import _expectations
    from easyanimate.data.summary import manifest_table, score_histograms, summarise

    settings = _stage_settings(two_videos, tmp_path, filters=["aesthetic", "motion", "text", "brightness"])
    assert Curator(settings).analysis_size(probe(two_videos / "a.mp4")) is None  # 640 px wide: decoded as is
    df = curate_dataset(two_videos, tmp_path, settings, progress=False)
    # Manifest: its column sits after the built-in scores (registry order), filled for every scored clip.
    assert list(df.columns)[9:13] == ["aesthetic", "text_area", "motion", "brightness"]
    assert str(df["brightness"].dtype) == "float64"
    acc = df[df["status"] == "accepted"]
    assert len(acc) == 4 and acc["brightness"].between(0.05, 1).all()
    # Gate: its expectation is part of the suite and catches a bad value.
    filters = build_filters(settings)
    assert "brightness" in {e.column for e in _expectations(settings, filters) if hasattr(e, "column")}
    bad = df.copy()
    bad.loc[acc.index[0], "brightness"] = 2.0
    result = run_quality_gate(bad, settings, tmp_path / "poisoned", clips_dir=tmp_path)
    assert not result.success and any("(brightness" in f and acc.iloc[0]["clip_id"] in f for f in result.failures)
    # Summaries: histogram rows, an accepted mean and a column in the clip table.
    assert {r["score"] for r in score_histograms(df, filters)} == {"aesthetic", "motion", "brightness"}
    assert summarise(df, filters)["curate/accepted_mean_brightness"] == pytest.approx(acc["brightness"].mean())
    assert "brightness" in manifest_table(df, filters)[0]


def test_filter_setup_once_per_worker_not_per_clip(brightness, two_videos, tmp_path):
    settings = _stage_settings(two_videos, tmp_path, filters=["brightness", "aesthetic", "motion"], device="cpu")
    df = curate_dataset(two_videos, tmp_path, settings, progress=False)
    assert SETUPS == ["cpu"] and len(SCORED) == 4 == (df["status"] == "accepted").sum()
    SETUPS.clear()
    curate_dataset(two_videos, tmp_path, settings, progress=False)
    assert SETUPS == []  # every video served from its records: no model loads at all


def test_filters_run_in_configured_order(brightness, clean_clip, tmp_path):
    # A too-dark clip rejected by the first filter never gets the later scores; listed last, it gets them all.
    dark = tmp_path / "dark.mp4"
    write_video((decode_frames(clean_clip) * 0.02).astype(np.uint8), dark, probe(clean_clip).fps)
    first = _stage_settings(tmp_path, tmp_path / "o1", filters=["brightness", "aesthetic", "motion"])
    last = _stage_settings(
        tmp_path,
        tmp_path / "o2",
        filters=["aesthetic", "motion", "brightness"],
        aesthetic={"threshold": 0.0},
        motion={"low": 0.0},
    )
    (rec1, *_), (rec2, *_) = curate_video(dark, first, tmp_path / "o1"), curate_video(dark, last, tmp_path / "o2")
    assert rec1["reject_reason"] == rec2["reject_reason"] == "too_dark"
    assert rec1["aesthetic"] is None and rec1["motion"] is None and rec1["brightness"] < 0.05
    assert rec2["aesthetic"] is not None and rec2["motion"] is not None


def test_unknown_filter_is_named():
    settings = load_settings(PRESET_ONLY, overrides={"curate": {"filters": ["aesthetic", "sparkle"]}})
    with pytest.raises(ValueError, match="curate.filters: unknown filter 'sparkle'"):
        build_filters(settings)
    with pytest.raises(Exception, match="twice"):
        load_settings(PRESET_ONLY, overrides={"curate": {"filters": ["motion", "motion"]}})


def test_reordering_filters_keys_new_records_but_not_device():
    from easyanimate.data.curate import settings_hash

    settings = _settings()

    def with_curate(**kw):
        return settings.model_copy(update={"curate": settings.curate.model_copy(update=kw)})

    assert (
        settings_hash(with_curate(device="cpu")) == settings_hash(with_curate(device="cuda")) == settings_hash(settings)
    )
    assert settings_hash(with_curate(filters=("motion", "aesthetic", "text"))) != settings_hash(settings)


def test_device_reaches_ocr(monkeypatch):
    import sys
    import types

    from easyanimate.data.curate import resolve_device
    from easyanimate.data.filters.text import TextFilter

    made = []
    monkeypatch.setitem(sys.modules, "easyocr", types.SimpleNamespace(Reader=lambda *a, **k: made.append(k) or "r"))
    text = TextFilter(load_settings(PRESET_ONLY))
    text.setup("cuda")
    text.setup("cuda")  # idempotent: one reader per instance
    assert [k["gpu"] for k in made] == [True] and text.reader == "r"
    TextFilter(load_settings(PRESET_ONLY)).setup("cpu")
    assert made[-1]["gpu"] is False and made[-1]["download_enabled"] is False
    assert resolve_device("cpu") == "cpu"
    import torch

    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="curate.device"):
            resolve_device("cuda")


def _thread_map(fn, items, **shared):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda item: fn(item, **shared), items))


def test_run_stage_outputs_reports_and_stable_hash(brightness, two_videos, tmp_path):
    from easyanimate.data.curate import run_stage

    out, reports = tmp_path / "curated", tmp_path / "reports" / "curate"
    settings = _stage_settings(two_videos, out, filters=["aesthetic", "motion", "brightness"], device="cpu")
    logged = []

    class Tracker:
        def log(self, values, step=None):
            logged.append((values, step))

    ctx = StageContext(report_dir=reports, checkpoint_dir=tmp_path / "ck", map=_thread_map, trackers=[Tracker()])
    result = run_stage(settings, ctx)
    assert result.failure is None and result.info["accepted"] == 4
    assert SETUPS == ["cpu"]  # the thread runner's threads share one worker's filters
    assert result.outputs == {"curated": out} and result.info["manifest"] == str(out / "manifest.parquet")
    assert set(result.artifacts) == {
        out / "manifest.parquet",
        out / "gate.json",
        reports / "gate_report",
        out / "summary",
    }
    # The timestamped Data Docs live with the reports; the curated data holds only deterministic files.
    assert (reports / "gate_report" / "index.html").exists() and not (out / "gate_report").exists()
    assert (reports / "metrics.json").exists() and result.metrics["curate/gate_passed"] == 1.0
    assert result.metrics["curate/accepted"] == 4 and "curate/accepted_mean_brightness" in result.metrics
    assert set(result.tables) == {"curate-reject-reasons", "curate-manifest", "curate-score-histograms"}
    assert "brightness" in result.tables["curate-score-histograms"][0]
    assert result.links["curate-gate-report"][0].startswith("file://")
    assert "passed" in result.markdown["curate-gate-report-summary"][1]
    series = [(v, s) for v, s in logged if "curate.hist.brightness" in v]
    assert [s for _, s in series] == list(range(10)) and sum(v["curate.hist.brightness"] for v, _ in series) == 4
    assert (out / "summary" / "reject_reasons.csv").exists()

    before = hash_path(out)
    again = run_stage(settings, ctx)  # an unchanged rerun must not change the data DVC versions
    assert hash_path(out) == before and again.metrics == result.metrics


def test_run_stage_gate_failure(two_videos, tmp_path):
    from easyanimate.data.curate import run_stage

    # No clip is bright enough: nothing is accepted.
    settings = _stage_settings(two_videos, tmp_path / "curated", aesthetic={"threshold": 10.0})
    ctx = StageContext(report_dir=tmp_path / "reports", checkpoint_dir=tmp_path / "ck", write_reports=False)
    result = run_stage(settings, ctx)
    assert result.failure.startswith("curated data failed the quality gate:\n- no accepted clips")
    assert "low_aesthetic 4" in result.failure  # the failure says why nothing was accepted
    assert "Quality gate FAILED" in result.markdown["curate-gate"][1]
    assert result.metrics["curate/gate_passed"] == 0.0 and result.metrics["curate/reject.low_aesthetic"] == 4
    assert not (tmp_path / "reports" / "metrics.json").exists()  # write_reports=False leaves the reports alone
    assert json.loads((tmp_path / "curated" / "gate.json").read_text())["success"] is False
    # A configured filter that cannot run is named in the run summary, with the reason.
    skipped = pd.read_csv(tmp_path / "curated" / "summary" / "skipped_filters.csv")
    assert "weights.aesthetic_clip" in skipped.set_index("filter").loc["alignment", "reason"]
    assert result.metrics["curate/skipped.alignment"] == 1.0


def test_captioner_registry_and_lazy_setup(tmp_path):
    from easyanimate.data.captioners import CAPTIONERS, build_captioner

    assert set(CAPTIONERS) == {"sidecar", "vlm"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump([{"file": "a.mp4", "caption": "a rabbit"}]))
    cap = build_captioner(_settings(tmp_path / "c.yaml"))
    assert isinstance(cap, SidecarCaptioner) and cap.frames_per_clip == 0 and not cap.uses_device
    cap.setup("cpu")
    assert cap("a.mp4", 0.0, 3.0) == "a rabbit"
