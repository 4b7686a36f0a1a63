"""The curated-dataset manifest: one row per clip, rejected and quarantined clips included.

Keeping rejects in the manifest makes every filter decision auditable (why was this scene dropped,
with which score) and lets thresholds be re-tuned from the stored scores without re-decoding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from easyanimate.utils import atomic_file

# Columns every manifest has; the filters' score columns sit between HEAD and TAIL (``columns``).
HEAD_COLUMNS: dict[str, str] = {
    "clip_id": "string",
    "source": "string",
    "scene_id": "string",  # clips cut from one scene share it, and so share their split
    "start_s": "float64",
    "end_s": "float64",
    "duration_s": "float64",
    "width": "Int64",
    "height": "Int64",
    "fps": "float64",
}
TAIL_COLUMNS: dict[str, str] = {
    "caption": "string",
    # captioned | uncaptioned (no caption source had one: the clip passed every filter and is kept, but training
    # refuses it until it is captioned) | <NA> (rejected before captioning). Filter verdicts never depend on it.
    "caption_status": "string",
    "status": "string",  # accepted | rejected | quarantined
    "reject_reason": "string",  # <NA> for accepted
    "duplicate_file_of": "string",  # reject_reason duplicate_file: the input file with the same bytes
    "clip_path": "string",  # relative to the curated output dir; accepted rows only
    "split": "string",  # train | val; accepted rows only
}
STATUSES = ("accepted", "rejected", "quarantined")
CAPTIONED, UNCAPTIONED = "captioned", "uncaptioned"
CAPTION_SIDECAR_SUFFIX = ".txt"


def how_to_caption() -> str:
    """What to do about uncaptioned clips: the one text the curate summary and the training refusal share."""
    return (
        "caption them, then rerun `easyanimate curate` (videos whose captions did not change are not redone): "
        f"write each video's caption in a text file next to it with the same name and a {CAPTION_SIDECAR_SUFFIX} "
        f"suffix (my_video.mp4 -> my_video{CAPTION_SIDECAR_SUFFIX}, one caption for every clip of that video), "
        "or list time-ranged captions in the YAML sidecar that paths.captions names "
        "(- {file: my_video.mp4, start: 0, end: 10, caption: ...}), "
        "or caption with a local vision-language model: set curate.caption.captioner: vlm and weights.captioner "
        "to a transformers BLIP-style model folder"
    )


def uncaptioned_message(uncaptioned: int, accepted: int) -> str:
    return f"{uncaptioned} of {accepted} accepted clips have no caption: {how_to_caption()}"


class UncaptionedClips(ValueError):
    """Training was asked to use accepted clips that have no caption."""


def uncaptioned_mask(df: pd.DataFrame) -> pd.Series:
    """Accepted rows without a usable caption (whatever ``caption_status`` says, an empty caption counts)."""
    accepted = df["status"] == "accepted"
    caption = df["caption"].astype("string").str.strip()
    return accepted & (caption.isna() | (caption == "")).fillna(True)


def require_captions(df: pd.DataFrame) -> None:
    """Raise ``UncaptionedClips`` (naming how many, and how to caption them) if any accepted clip lacks one."""
    missing = int(uncaptioned_mask(df).sum())
    if missing:
        accepted = int((df["status"] == "accepted").sum())
        raise UncaptionedClips("cannot train on uncaptioned clips: " + uncaptioned_message(missing, accepted))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_clip_id(source_hash: str, start_s: float, end_s: float) -> str:
    """Content address: same source bytes and same span give the same id, whatever the file name."""
    return hashlib.sha256(f"{source_hash}:{start_s:.3f}:{end_s:.3f}".encode()).hexdigest()[:20]


def _unit_hash(clip_id: str) -> float:
    return int(hashlib.sha256(f"split:{clip_id}".encode()).hexdigest()[:12], 16) / float(16**12)


def assign_splits(df: pd.DataFrame, val_fraction: float) -> pd.Series:
    """Deterministic train/val by scene hash; at least one val (and one train) when >= 2 accepted.

    Hashing the scene (not the clip) keeps the pieces of one long scene on one side, so val never holds a
    near-copy of a training clip; a clip's split does not change when other videos are added.
    """
    split = pd.Series(pd.NA, index=df.index, dtype="string")
    acc = df.index[df["status"] == "accepted"]
    if len(acc) == 0:
        return split
    # Records written before scene ids existed fall back to their clip id; so does a data set that is one scene
    # (no split could then keep its pieces apart, and some val data beats none).
    keys = df.loc[acc, "clip_id"]
    if "scene_id" in df:
        scenes = df.loc[acc, "scene_id"].fillna(keys)
        if scenes.nunique() > 1:
            keys = scenes
    u = keys.map(_unit_hash)
    split.loc[acc] = ["val" if x < val_fraction else "train" for x in u]
    if len(acc) >= 2:
        # Whole scenes move: the one closest to the val side of the hash line (or the train side).
        if not (split.loc[acc] == "val").any():
            split.loc[u.index[u == u.min()]] = "val"
        if not (split.loc[acc] == "train").any():
            split.loc[u.index[u == u.max()]] = "train"
    return split


def columns(score_columns: dict[str, str]) -> dict[str, str]:
    """The full schema around the filters' ``score_columns`` (name -> dtype, in manifest order)."""
    return {**HEAD_COLUMNS, **score_columns, **TAIL_COLUMNS}


def to_frame(records: list[dict], score_columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Records -> typed manifest. The curator passes its filters' columns; without them, every record key
    outside the fixed columns is a float score. (No import of the filters here: training code reads
    manifests, and a filter edit must not change its code version.)"""
    if score_columns is None:
        fixed = {**HEAD_COLUMNS, **TAIL_COLUMNS}
        score_columns = {k: "float64" for k in dict.fromkeys(k for r in records for k in r if k not in fixed)}
    schema = columns(score_columns)
    df = pd.DataFrame.from_records(records, columns=list(schema))
    for col, dtype in schema.items():
        df[col] = df[col].astype(dtype)
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path, suffix=".tmp") as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest with its fixed columns typed; score columns keep the dtypes they were written with."""
    df = pd.read_parquet(path)
    fixed = {**HEAD_COLUMNS, **TAIL_COLUMNS}
    if "caption_status" not in df.columns and "caption" in df.columns:
        captioned = df["caption"].notna() & (df["status"] == "accepted")
        df["caption_status"] = pd.Series(pd.NA, index=df.index, dtype="string").mask(captioned, CAPTIONED)
    if "duplicate_file_of" not in df.columns:
        df["duplicate_file_of"] = pd.NA
    missing = [c for c in fixed if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a curation manifest: missing columns {missing}")
    for col, dtype in fixed.items():
        df[col] = df[col].astype(dtype)
    return df
