"""Curating one's own footage (issue #13 item 8): no captions anywhere, and a file copied twice.

The footage is the bundled Big Buck Bunny shot under a name no caption source knows (the embedded default's
YAML sidecar lists only the sample names), plus a byte-identical copy of it. Curation must keep the clips that
pass every filter as uncaptioned, pass its gate and say how to caption them; training must refuse them with the
same words; a ``.txt`` beside the video captions it; the copy gets a ``duplicate_file`` row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from easyanimate.config import PRESETS_DIR, load_settings
from easyanimate.data import manifest as mf
from easyanimate.data.curate import run_stage
from easyanimate.data.datasets import load_clip_frames
from easyanimate.stage_api import StageContext

BUNNY = Path(__file__).resolve().parents[1] / "data" / "samples" / "bigbuckbunny.mp4"


def _settings(raw: Path, out: Path):
    # The embedded default (tiny preset, its sidecar path included); OCR off: not what these tests are about.
    return load_settings(
        PRESETS_DIR / "tiny.yaml",
        overrides={"paths": {"raw_videos": str(raw), "curated": str(out)}, "curate": {"text": {"enabled": False}}},
    )


def _curate(raw: Path, out: Path):
    ctx = StageContext(report_dir=out.parent / "reports", checkpoint_dir=out.parent / "ck", write_reports=False)
    return run_stage(_settings(raw, out), ctx)


@pytest.fixture(scope="module")
def own_footage(tmp_path_factory):
    """(raw folder, curated folder, stage result): one video without captions and a byte-identical copy."""
    root = tmp_path_factory.mktemp("own")
    raw = root / "my_footage"
    raw.mkdir()
    shutil.copy(BUNNY, raw / "holiday.mp4")
    shutil.copy(BUNNY, raw / "holiday_copy.mp4")
    out = root / "curated"
    return raw, out, _curate(raw, out)


def test_uncaptioned_clips_are_kept_and_the_run_says_what_to_do(own_footage):
    raw, out, result = own_footage
    df = mf.read_manifest(out / "manifest.parquet")
    mine = df[df["source"] == "holiday.mp4"]
    accepted = mine[mine["status"] == "accepted"]
    # The filters' verdicts stand on their own: the shot passes them and is kept, without a caption.
    assert len(accepted) == 1 and result.info["accepted"] == 1
    assert accepted["caption"].isna().all() and (accepted["caption_status"] == "uncaptioned").all()
    assert (out / accepted["clip_path"].iloc[0]).exists() and accepted["split"].notna().all()
    assert "no_caption" not in set(df["reject_reason"].dropna())
    # The run succeeds (its gate passes) and says how many clips are uncaptioned and how to caption them.
    assert result.failure is None and result.metrics["curate/gate_passed"] == 1.0
    assert result.metrics["curate/uncaptioned"] == 1.0 and result.info["uncaptioned"] == 1
    note = mf.uncaptioned_message(1, 1)
    assert result.info["next_step"] == note and note in result.markdown["curate-next-steps"][1]
    assert note.startswith("1 of 1 accepted clips have no caption")
    assert all(how in note for how in ("my_video.txt", "paths.captions", "weights.captioner"))
    assert (out / "summary" / "next_steps.txt").read_text().strip() == note
    listed = pd.read_csv(out / "summary" / "uncaptioned.csv")
    assert (
        listed["source"].tolist() == ["holiday.mp4"] and listed["clip_path"].tolist() == accepted["clip_path"].tolist()
    )
    gate = json.loads((out / "gate.json").read_text())
    assert gate["success"] is True and gate["notes"] == ["not trainable yet: " + note]


def test_training_refuses_uncaptioned_clips_with_the_same_message(own_footage):
    _, out, _ = own_footage
    with pytest.raises(mf.UncaptionedClips) as err:
        load_clip_frames(out, "train", resolution=32, sample_fps=2.0)
    assert str(err.value) == "cannot train on uncaptioned clips: " + mf.uncaptioned_message(1, 1)


def test_byte_identical_file_gets_a_duplicate_file_row(own_footage):
    _, out, result = own_footage
    df = mf.read_manifest(out / "manifest.parquet")
    copy = df[df["source"] == "holiday_copy.mp4"]
    assert len(copy) == 1
    row = copy.iloc[0]
    assert (row["status"], row["reject_reason"], row["duplicate_file_of"]) == (
        "rejected",
        "duplicate_file",
        "holiday.mp4",
    )
    assert pd.isna(row["clip_path"]) and row["clip_id"] not in set(df.loc[df["source"] == "holiday.mp4", "clip_id"])
    assert df["clip_id"].is_unique and result.metrics["curate/reject.duplicate_file"] == 1.0
    # The original keeps its rows, which name no duplicate.
    assert df.loc[df["source"] == "holiday.mp4", "duplicate_file_of"].isna().all()


def test_text_file_beside_the_video_captions_it(own_footage, tmp_path):
    raw, out, _ = own_footage
    mine = tmp_path / "raw"
    mine.mkdir()
    shutil.copy(raw / "holiday.mp4", mine / "holiday.mp4")
    (mine / "holiday.txt").write_text("a big grey rabbit\nwakes up on a sunny hill\n")
    curated = tmp_path / "curated"
    result = _curate(mine, curated)
    df = mf.read_manifest(curated / "manifest.parquet")
    accepted = df[df["status"] == "accepted"]
    assert accepted["caption"].tolist() == ["a big grey rabbit wakes up on a sunny hill"]
    assert (accepted["caption_status"] == "captioned").all() and result.metrics["curate/uncaptioned"] == 0.0
    assert "curate-next-steps" not in result.markdown and (curated / "summary" / "next_steps.txt").read_text() == ""
    assert "notes" not in json.loads((curated / "gate.json").read_text())
    clips = load_clip_frames(curated, "train", resolution=32, sample_fps=2.0) + load_clip_frames(
        curated, "val", resolution=32, sample_fps=2.0
    )
    assert [c.caption for c in clips] == ["a big grey rabbit wakes up on a sunny hill"]
