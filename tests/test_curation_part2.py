"""Curation, part 2 (issue #16): scene-transition filter, near-duplicate removal with a persistent index,
caption-video alignment and caption rewrite.

Real footage (data/samples, CC-BY) degraded inside the tests: a cross-dissolve and a fade to black between two
real shots, the same shot re-encoded + rescaled + lightly cropped, and two different shots of the same film.
Model-backed paths use tiny randomly initialised models built here (nothing from a hub).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from easyanimate.config import PRESETS_DIR, SceneConfig, load_settings
from easyanimate.data.curate import curate_dataset
from easyanimate.data.dedup_index import (
    INDEX_FILE,
    EmbeddingIndex,
    HashIndex,
    deduplicate,
    format_hashes,
    read_index,
)
from easyanimate.data.scenes import detect_scenes
from easyanimate.data.video_io import decode_frames, ffmpeg_exe, write_video

# The tiny preset on its own (no project params.yaml): the defaults these tests are written against.
PRESET_ONLY = PRESETS_DIR / "tiny.yaml"

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
BUNNY = SAMPLES / "bigbuckbunny.mp4"
TRAILER = SAMPLES / "trailer_bbb.mp4"
SIZE = (640, 360)
FPS = 25.0


def _settings(captions: Path | None = None, weights: dict | None = None, **curate) -> object:
    overrides = {
        "paths": {"captions": str(captions)} if captions else {},
        "weights": weights or {},
        # One clip per test video; no OCR (not what these tests are about, and slow on 2 cores).
        "curate": {"scenes": {"min_duration_s": 2.0, "max_duration_s": 10.0}, "text": {"enabled": False}, **curate},
    }
    return load_settings(path=PRESET_ONLY, overrides=overrides)


@pytest.fixture(scope="module")
def shots() -> dict[str, np.ndarray]:
    """Two different shots of the film at 640x360: the bunny leaving his burrow, and the bunny at a tree."""
    a = decode_frames(BUNNY, start_s=0.4, end_s=4.4, size=SIZE)
    b = decode_frames(TRAILER, start_s=37.6, end_s=41.1, size=SIZE)
    return {"a": a, "b": b}


def _blend(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    w = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None, None, None]
    return (x[:n].astype(np.float32) * (1 - w) + y[:n].astype(np.float32) * w).astype(np.uint8)


def _dip_to_black(x: np.ndarray, y: np.ndarray, n: int, overlap: int) -> np.ndarray:
    """``x`` fades to black over ``n`` frames while ``y`` fades in from black over ``n`` frames, starting ``overlap``
    frames before ``x`` is black (an editor's dip to black; darkest frame about 8% of the shots' brightness)."""
    total = 2 * n - overlap
    t = np.arange(total, dtype=np.float32)
    wx = np.clip(1 - t / (n - 1), 0, 1)[:, None, None, None]
    wy = np.clip((t - (n - overlap)) / (n - 1), 0, 1)[:, None, None, None]
    xs = x[np.minimum(np.arange(total), len(x) - 1)].astype(np.float32)
    ys = y[np.clip(np.arange(total) - (n - overlap), 0, len(y) - 1)].astype(np.float32)
    return np.clip(xs * wx + ys * wy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, shots) -> Path:
    """a/b: the two shots alone; c: a 1.6 s cross-dissolve from a to b; d: a dips to black and b comes up from it;
    e: shot a again, re-encoded at a lower quality, rescaled to 480x270 and cropped by 2% on every side."""
    d = tmp_path_factory.mktemp("raw16")
    a, b = shots["a"], shots["b"]
    write_video(a, d / "a_shot.mp4", FPS)
    write_video(b, d / "b_shot.mp4", FPS)
    n = 40
    write_video(np.concatenate([a[:50], _blend(a[50:], b, n), b[n : n + 40]]), d / "c_dissolve.mp4", FPS)
    fade = np.concatenate([a[:45], _dip_to_black(a[45:], b, 40, 8), b[32:62]])
    write_video(fade, d / "d_fade.mp4", FPS)
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-i",
            str(d / "a_shot.mp4"),
            "-vf",
            "crop=iw*0.96:ih*0.96,scale=480:270",
            "-c:v",
            "libx264",
            "-crf",
            "30",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            str(d / "e_copy.mp4"),
        ],
        check=True,
    )
    captions = [
        {"file": f"{name}.mp4", "caption": f"{name.replace('_', ' ')} of a big rabbit"}
        for name in ("a_shot", "b_shot", "c_dissolve", "d_fade", "e_copy")
    ]
    (d / "captions.yaml").write_text(yaml.safe_dump(captions))
    return d


@pytest.fixture(scope="module")
def curated(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated16")
    settings = _settings(raw_dir / "captions.yaml")
    return curate_dataset(raw_dir, out, settings, progress=False), out, settings


def _row(df: pd.DataFrame, source: str) -> pd.Series:
    rows = df[df["source"] == source]
    assert len(rows) == 1, rows[["source", "start_s", "end_s", "status", "reject_reason"]]
    return rows.iloc[0]


# ------------------------------------------------------------------------------------ scene transitions
def test_content_detector_misses_the_gradual_transitions(raw_dir):
    for name in ("c_dissolve.mp4", "d_fade.mp4"):
        assert len(detect_scenes(raw_dir / name, SceneConfig())) == 1, name


def test_transitions_rejected_each_shot_kept(curated):
    df, _, settings = curated
    cfg = settings.curate.transition
    for name in ("a_shot.mp4", "b_shot.mp4"):
        row = _row(df, name)
        assert row["status"] == "accepted", row
        assert row["scene_similarity"] >= cfg.min_similarity and row["luma_ratio"] >= cfg.min_luma_ratio
    dissolve, fade = _row(df, "c_dissolve.mp4"), _row(df, "d_fade.mp4")
    assert (dissolve["status"], dissolve["reject_reason"]) == ("rejected", "scene_transition")
    assert (fade["status"], fade["reject_reason"]) == ("rejected", "scene_transition")
    assert dissolve["scene_similarity"] < cfg.min_similarity  # two colour distributions
    assert fade["luma_ratio"] < cfg.min_luma_ratio  # a dip to black
    # The transition filter runs first: later scores of a rejected clip are not computed.
    assert pd.isna(dissolve["aesthetic"]) and pd.isna(dissolve["phash"])


# ------------------------------------------------------------------------------------ duplicates
def test_copy_is_a_duplicate_within_one_run(curated):
    df, out, _ = curated
    original, copy = _row(df, "a_shot.mp4"), _row(df, "e_copy.mp4")
    assert (copy["status"], copy["reject_reason"]) == ("rejected", "duplicate")
    assert copy["duplicate_of"] == original["clip_id"] and pd.isna(copy["clip_path"]) and pd.isna(copy["split"])
    # Two different shots of the same film are not duplicates.
    assert _row(df, "b_shot.mp4")["status"] == "accepted"
    acc = df[df["status"] == "accepted"]
    assert acc["duplicate_of"].isna().all() and acc["phash"].is_unique
    index = read_index(out / INDEX_FILE, 4)
    assert list(index["clip_id"]) == list(acc["clip_id"])  # kept clips, in manifest order


def test_incremental_run_finds_the_copy_without_rescanning(raw_dir, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    for name in ("a_shot.mp4", "b_shot.mp4", "captions.yaml"):
        shutil.copy(raw_dir / name, first / name)
    out = tmp_path / "curated"
    settings = _settings(first / "captions.yaml")
    df1 = curate_dataset(first, out, settings, progress=False)
    assert (df1["status"] == "accepted").sum() == 2
    index_before = read_index(out / INDEX_FILE, 4)
    records = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}

    shutil.copy(raw_dir / "e_copy.mp4", first / "e_copy.mp4")
    df2 = curate_dataset(first, out, settings, progress=False)
    copy = _row(df2, "e_copy.mp4")
    assert (copy["reject_reason"], copy["duplicate_of"]) == ("duplicate", _row(df1, "a_shot.mp4")["clip_id"])
    assert {p: p.stat().st_mtime_ns for p in records} == records  # old videos served from their records
    index_after = read_index(out / INDEX_FILE, 4)
    pd.testing.assert_frame_equal(index_after, index_before)  # nothing new kept

    # An unchanged rerun rewrites the index and manifest byte for byte.
    blob = (out / INDEX_FILE).read_bytes(), (out / "manifest.parquet").read_bytes()
    curate_dataset(first, out, settings, progress=False)
    assert ((out / INDEX_FILE).read_bytes(), (out / "manifest.parquet").read_bytes()) == blob


def _fake(ids, hashes, scenes=None, aesthetic=None):
    n = len(ids)
    return pd.DataFrame(
        {
            "clip_id": pd.array(ids, dtype="string"),
            "scene_id": pd.array(scenes or [f"s{i}" for i in range(n)], dtype="string"),
            "aesthetic": aesthetic or [5.0] * n,
            "phash": pd.array([format_hashes(h) for h in hashes], dtype="string"),
            "duplicate_of": pd.array([None] * n, dtype="string"),
            "status": pd.array(["accepted"] * n, dtype="string"),
            "reject_reason": pd.array([None] * n, dtype="string"),
            "clip_path": pd.array([f"clips/{i}.mp4" for i in ids], dtype="string"),
        }
    )


def test_dedup_keep_rules_and_index(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=(3, 4), dtype=np.uint64)
    near = base[0] ^ np.uint64(0b1011)  # 3 bits off on every frame
    hashes = [base[0], base[1], near, base[2]]
    df = _fake(["a", "b", "c", "d"], hashes, aesthetic=[5.0, 6.0, 7.0, 4.0])
    first = deduplicate(df, _settings())
    assert first.set_index("clip_id").loc["c", "duplicate_of"] == "a"
    assert list(first["status"]) == ["accepted", "accepted", "rejected", "accepted"]
    best = deduplicate(df, _settings(dedup={"keep": "best_aesthetic"}))
    assert best.set_index("clip_id").loc["a", "duplicate_of"] == "c"
    # Same scene: pieces of one shot are never duplicates unless identical.
    same = _fake(["a", "c", "z"], [base[0], near, base[0]], scenes=["s", "s", "s"])
    res = deduplicate(same, _settings()).set_index("clip_id")
    assert res.loc["c", "status"] == "accepted" and res.loc["z", "duplicate_of"] == "a"
    # Incremental: the index keeps what was kept; a later run's new clip is checked against it.
    path = tmp_path / INDEX_FILE
    deduplicate(df.iloc[[1, 2, 3]], _settings(), path)
    assert list(read_index(path, 4)["clip_id"]) == ["b", "c", "d"]
    later = deduplicate(_fake(["a"], [base[0]]), _settings(), path)
    assert later.loc[0, "duplicate_of"] == "c"  # the indexed clip came first
    assert list(read_index(path, 4)["clip_id"]) == ["b", "c", "d"]
    # With embeddings, clips whose hashes differ but whose embeddings nearly agree are duplicates too.
    emb = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8], "d": [0.999, 0.0447]}
    by_emb = deduplicate(df.iloc[[0, 1, 3]], _settings(), embeddings=emb).set_index("clip_id")
    assert by_emb.loc["d", "duplicate_of"] == "a" and by_emb.loc["b", "status"] == "accepted"


def test_hash_index_finds_all_pairs_within_distance():
    rng = np.random.default_rng(1)
    entries = rng.integers(0, 2**63, size=3000, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, 3000, dtype=np.uint64
    )
    flips = [sum(1 << int(b) for b in rng.choice(64, size=k, replace=False)) for k in range(0, 12)]
    queries = np.array([entries[i] ^ np.uint64(f) for i, f in enumerate(flips)], dtype=np.uint64)
    index = HashIndex(entries, max_distance=8)
    qi, ei = index.pairs(queries)
    brute = {
        (q, e)
        for q in range(len(queries))
        for e in range(len(entries))
        if bin(int(queries[q] ^ entries[e])).count("1") <= 8
    }
    assert set(zip(qi.tolist(), ei.tolist())) == brute
    assert {(q, q) for q in range(9)} <= brute and (9, 9) not in brute


def test_embedding_index_finds_exactly_the_pairs_above_min_cosine():
    """The LSH index reports the same pairs as the full n x n product, including pairs just above the threshold,
    and only pairs at or above it; ``first_new`` keeps pairs with a new clip."""
    rng = np.random.default_rng(2)
    n, dim = 3000, 64
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # 60 copies at cosines across [0.94, 0.999] of an earlier clip: some just below 0.95, most at or above.
    for k, cos in enumerate(np.linspace(0.94, 0.999, 60)):
        src, dst = k, n - 1 - k
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= (noise @ emb[src]) * emb[src]
        emb[dst] = cos * emb[src] + np.sqrt(1 - cos * cos) * noise / np.linalg.norm(noise)
    sims = emb @ emb.T
    brute = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(sims >= 0.95, k=1)))}
    assert 40 <= len(brute) <= 60  # the planted pairs at or above the threshold (random pairs are far below)
    index = EmbeddingIndex(emb, 0.95)
    a, b = index.pairs()
    assert set(zip(a.tolist(), b.tolist())) == brute
    a, b = index.pairs(first_new=n - 10)
    assert set(zip(a.tolist(), b.tolist())) == {(x, y) for x, y in brute if y >= n - 10}


def test_gate_rejects_two_accepted_clips_with_one_hash(curated):
    from easyanimate.data.quality import run_quality_gate

    df, out, settings = curated
    acc = df.index[df["status"] == "accepted"]
    bad = df.copy()
    bad.loc[acc[1], "phash"] = bad.loc[acc[0], "phash"]
    result = run_quality_gate(bad, settings, out / "poisoned", clips_dir=out)
    assert not result.success and any("(phash" in f for f in result.failures)


# ------------------------------------------------------------------------------------ alignment, skipped without weights
def test_alignment_skipped_without_clip_weights(curated):
    from easyanimate.data.filters import build_filters
    from easyanimate.data.summary import skipped_filters

    df, _, settings = curated
    assert df["alignment"].isna().all()
    skipped = {row["filter"]: row["reason"] for row in skipped_filters(build_filters(settings))}
    assert "weights.aesthetic_clip" in skipped["alignment"]


# ------------------------------------------------------------------------------------ tiny models (built here)
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "big", "rabbit", "in", "the", "meadow", "shot", "of", "green"]
WORDS += ["b", "c", "d", "e", "dissolve", "fade", "copy", "describe", "video", "caption", ":", "rewritten"]


def _tokenizer(d: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(d)
    return fast


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel with a tokenizer and an image processor (what alignment and the embedder load)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("clip16")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(small, vocab_size=len(WORDS), bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=24,
    )
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    _tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("dino16")
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(d)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("lm16")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(WORDS),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(d)
    _tokenizer(d)
    return d


@pytest.fixture(scope="module")
def two_shots(tmp_path_factory, raw_dir) -> Path:
    d = tmp_path_factory.mktemp("two16")
    for name in ("a_shot.mp4", "b_shot.mp4", "captions.yaml"):
        shutil.copy(raw_dir / name, d / name)
    return d


def test_model_backed_alignment_embedding_and_rewrite(two_shots, tmp_path, tiny_clip, tiny_dino, tiny_lm):
    from easyanimate.data.filters import build_filters
    from easyanimate.data.quality import run_quality_gate
    from easyanimate.data.summary import skipped_filters

    settings = _settings(
        two_shots / "captions.yaml",
        weights={"aesthetic_clip": str(tiny_clip), "frame_embedding": str(tiny_dino), "caption_rewriter": str(tiny_lm)},
        alignment={"min_score": -1.0},
        transition={"min_embedding_similarity": -1.0},
        dedup={"min_cosine": 1.0},  # a random tiny model embeds every frame alike
        caption={"rewrite": {"enabled": True, "batch_size": 2, "max_new_tokens": 4}},
        device="cpu",
    )
    filters = build_filters(settings)
    assert [row["filter"] for row in skipped_filters(filters)] == ["text"]  # text is off in these tests
    assert {f.name: getattr(f, "scorer", None) for f in filters}["transition"] == "embedding"
    out = tmp_path / "out"
    df = curate_dataset(two_shots, out, settings, progress=False)
    acc = df[df["status"] == "accepted"]
    assert len(acc) == 2
    assert acc["alignment"].between(-1, 1).all() and acc["scene_similarity"].between(-1, 1.0001).all()
    # Both captions kept: the sidecar's as caption_raw, the rewrite as the training caption.
    assert list(df.columns).index("caption_raw") == list(df.columns).index("caption") - 1
    assert acc["caption_raw"].str.endswith("of a big rabbit").all() and acc["caption"].str.len().gt(0).all()
    # Embeddings travel with the index (cosine dedup), not with the manifest.
    index = read_index(out / INDEX_FILE, 4)
    assert index["embedding"].map(len).eq(32).all() and "_dedup_embedding" not in df
    # The gate re-checks alignment when it was computed.
    strict = _settings(
        two_shots / "captions.yaml", weights={"aesthetic_clip": str(tiny_clip)}, alignment={"min_score": 1.0}
    )
    gate = run_quality_gate(df, strict, tmp_path / "gate", clips_dir=out)
    assert not gate.success and any("(alignment" in f for f in gate.failures)


def test_rewriter_batches_and_falls_back(tiny_lm):
    from easyanimate.config import CaptionRewriteConfig
    from easyanimate.data.captioners.rewrite import CaptionRewriter

    rw = CaptionRewriter(tiny_lm, CaptionRewriteConfig(enabled=True, batch_size=2, max_new_tokens=3))
    with pytest.raises(RuntimeError, match="setup"):
        rw.rewrite(["a rabbit"])
    rw.setup("cpu")
    out = rw.rewrite(["a big rabbit", "", "a green meadow"])
    assert len(out) == 3 and out[1] == "" and out[0] and out[2]
    missing = load_settings(PRESET_ONLY, overrides={"curate": {"caption": {"rewrite": {"enabled": True}}}})
    with pytest.raises(FileNotFoundError, match="weights.caption_rewriter"):
        CaptionRewriter.from_settings(missing)
