"""Near-duplicate removal across the whole curated dataset: the persistent hash index and the decision pass.

Per clip, the ``dedup`` filter stores the 64-bit perceptual hashes (pHash, ``imagehash``) of its sampled frames
in the manifest column ``phash`` (hex, comma separated), and with ``weights.frame_embedding`` a clip embedding in
its record. Whether a clip duplicates another is a dataset-level question, so it is decided here, after every
video's records are in, in one deterministic pass (``deduplicate``), against every clip already kept in the
dataset: ``dedup_index.parquet`` beside the manifest holds the kept clips' hashes (and embeddings) in keep order,
with no timestamps, so an unchanged rerun rewrites it byte for byte. A run queries only the clips the index does
not hold yet (no old clip is decoded or queried again) and appends the ones it keeps.

Two clips are duplicates when at least ``min_matching_frames`` frames of each are within ``max_distance`` bits of
a frame of the other (frames of any position match, so clips cut at different offsets still pair up), or, with
embeddings, when their cosine similarity is at least ``min_cosine``. Clips of one scene are never compared
(pieces of one long shot look alike and already share a train/val split) unless their hashes are identical.
Which clip of a pair is kept: ``keep: first`` keeps the one already in the index, else the earlier in manifest
order (source name, then time); ``keep: best_aesthetic`` the higher ``aesthetic`` score (ties: as ``first``),
which may move an indexed clip out of the dataset. A rejected clip gets ``reject_reason = duplicate`` and
``duplicate_of = <kept clip id>``; its cut file stays in ``clips/`` (the video's records still list it) but
leaves the manifest's accepted set.

Scale: ``HashIndex`` finds all pairs within ``max_distance`` by multi-index hashing (Norouzi et al. 2012): the
64 bits are cut into 3 bands of 21-22 bits; two hashes within d bits agree within r = ceil((d+1)/3) - 1 bits on
some band, so each query probes, per band, the buckets of its band value XOR every mask of at most r bits, in
a direct-address table (bucket offsets, CSR). Cost: build O(n), query O(probes + candidates) per hash, with
candidates about n * probes / 2^21: near-linear up to about 10^6 hashes (``benchmarks/dedup_index.py``).
Embedding pairs come from ``EmbeddingIndex``: random-hyperplane LSH buckets propose candidates, an exact dot product
confirms them (no false pair; a true pair at exactly ``min_cosine`` is missed with probability <= 1e-4), at about
O(n^1.15 log n) instead of the O(n^2) of comparing every pair.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from easyanimate.utils import atomic_file

INDEX_FILE = "dedup_index.parquet"
INDEX_VERSION = 1
HASH_BITS = 64
_BANDS = 3
# Embedding LSH (EmbeddingIndex): per-pair miss probability at exactly min_cosine, table sizes, block sizes.
EMBEDDING_MISS = 1e-4
_MIN_TABLE_BITS, _MAX_TABLE_BITS, _MAX_TABLES = 8, 24, 512
_HAMMING_SIGMAS = 6.0
_HASH_BLOCK, _VERIFY_BLOCK = 8192, 1 << 18


# ------------------------------------------------------------------------------------ hashes
def format_hashes(hashes) -> str:
    return ",".join(f"{int(h):016x}" for h in hashes)


def parse_hashes(text: str) -> list[int]:
    return [int(h, 16) for h in str(text).split(",") if h]


def _masks(width: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), r)]
    return np.asarray(masks, dtype=np.int64)


class HashIndex:
    """All (query, entry) pairs of 64-bit hashes within ``max_distance`` bits (multi-index hashing, see above)."""

    def __init__(self, hashes: np.ndarray, max_distance: int, bands: int = _BANDS):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.max_distance = int(max_distance)
        widths = [HASH_BITS // bands + (1 if i < HASH_BITS % bands else 0) for i in range(bands)]
        self.radius = -(-(self.max_distance + 1) // bands) - 1
        self._tables = []
        shift = 0
        for width in widths:
            values = self._band(self.hashes, shift, width)
            order = np.argsort(values, kind="stable").astype(np.int64)
            starts = np.zeros((1 << width) + 1, np.int32 if len(values) < 2**31 else np.int64)
            np.cumsum(np.bincount(values, minlength=1 << width), out=starts[1:])
            # The hashes in bucket order: a bucket's candidates are read contiguously, not gathered.
            self._tables.append((shift, width, order, self.hashes[order], starts, _masks(width, self.radius)))
            shift += width

    @staticmethod
    def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
        return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def pairs(self, queries: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, entry positions) of every pair within ``max_distance`` bits, sorted, no repeats."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        found_q, found_e = [], []
        n = max(1, len(self.hashes))
        for lo in range(0, len(queries), chunk):
            q = queries[lo : lo + chunk]
            for shift, width, order, sorted_hashes, starts, masks in self._tables:
                keys = (self._band(q, shift, width)[:, None] ^ masks[None, :]).ravel()
                first, last = starts[keys], starts[keys + 1]
                hit = np.flatnonzero(last != first)
                if not len(hit):
                    continue
                counts, first = (last[hit] - first[hit]).astype(np.int64), first[hit].astype(np.int64)
                offsets = np.cumsum(counts) - counts
                pos = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(first - offsets, counts)
                owner = np.repeat(hit // len(masks), counts)
                close = np.bitwise_count(q[owner] ^ sorted_hashes[pos]) <= self.max_distance
                found_q.append(owner[close] + lo)
                found_e.append(order[pos[close]])
        if not found_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        # A pair close on several bands was found once per band.
        pairs = np.unique(np.concatenate(found_q) * n + np.concatenate(found_e))
        return pairs // n, pairs % n


# ------------------------------------------------------------------------------------ the persisted index
def _meta(num_frames: int) -> dict:
    return {"version": INDEX_VERSION, "hash": "imagehash.phash-64", "frames": num_frames}


def read_index(path: Path | None, num_frames: int) -> pd.DataFrame:
    """The kept clips in keep order (empty when missing, or written for another hash layout)."""
    empty = pd.DataFrame({"clip_id": [], "scene_id": [], "aesthetic": [], "phash": [], "embedding": []})
    if path is None or not Path(path).exists():
        return empty
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"easyanimate.dedup", b"{}"))
    if meta != _meta(num_frames):
        return empty  # another hash layout: start over from the manifest's own hash column
    df = table.to_pandas()
    if "embedding" not in df:
        df["embedding"] = None
    return df


def write_index(index: pd.DataFrame, path: Path, num_frames: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    has_emb = index["embedding"].notna().any() if len(index) else False
    columns = {
        "clip_id": pa.array(index["clip_id"].astype(str).tolist(), pa.string()),
        "scene_id": pa.array([None if pd.isna(s) else str(s) for s in index["scene_id"]], pa.string()),
        "aesthetic": pa.array([None if pd.isna(a) else float(a) for a in index["aesthetic"]], pa.float64()),
        "phash": pa.array(index["phash"].astype(str).tolist(), pa.string()),
    }
    if has_emb:
        columns["embedding"] = pa.array(
            [None if e is None else [float(x) for x in e] for e in index["embedding"]], pa.list_(pa.float32())
        )
    table = pa.table(columns).replace_schema_metadata({"easyanimate.dedup": json.dumps(_meta(num_frames))})
    path = Path(path)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


# ------------------------------------------------------------------------------------ the decision pass
def _hash_pairs(H: np.ndarray, scenes: list, n_old: int, cfg) -> set[tuple[int, int]]:
    """Unordered unit pairs (u < v, at least one new) whose frames match (see module doc)."""
    n, k = H.shape
    if n == 0 or n_old == n:
        return set()
    index = HashIndex(H.reshape(-1), cfg.max_distance)
    qi, ei = index.pairs(H[n_old:].reshape(-1))
    qu, eu = n_old + qi // k, ei // k
    qf, ef = qi % k, ei % k
    sel = qu != eu
    qu, eu, qf, ef = qu[sel], eu[sel], qf[sel], ef[sel]
    if not cfg.compare_same_scene and len(qu):
        same = np.array([scenes[a] is not None and scenes[a] == scenes[b] for a, b in zip(qu, eu)], bool)
        exact = (H[qu] == H[eu]).all(axis=1)
        sel = ~same | exact
        qu, eu, qf, ef = qu[sel], eu[sel], qf[sel], ef[sel]
    u, v = np.minimum(qu, eu), np.maximum(qu, eu)
    fu, fv = np.where(qu == u, qf, ef), np.where(qu == u, ef, qf)
    need = min(cfg.min_matching_frames, k)
    pair = u * n + v
    counts_u = pd.Series(fu).groupby(pair).nunique() if len(pair) else pd.Series(dtype=int)
    counts_v = pd.Series(fv).groupby(pair).nunique() if len(pair) else pd.Series(dtype=int)
    ok = counts_u.index[(counts_u >= need).to_numpy() & (counts_v >= need).to_numpy()]
    return {(int(p // n), int(p % n)) for p in ok}


# ------------------------------------------------------------------------------------ embeddings
def lsh_layout(n: int, min_cosine: float, miss: float = EMBEDDING_MISS) -> tuple[int, int]:
    """(bits per table, tables) of the random-hyperplane LSH for ``n`` clips (see ``EmbeddingIndex``)."""
    bits = int(min(_MAX_TABLE_BITS, max(_MIN_TABLE_BITS, math.ceil(math.log2(max(n, 2))))))
    p = 1.0 - math.acos(max(-1.0, min(1.0, min_cosine))) / math.pi  # one hyperplane keeps the pair together
    hit = p**bits
    if hit >= 1.0:
        return bits, 1
    tables = math.ceil(math.log(miss) / math.log1p(-hit)) if hit > 0 else _MAX_TABLES
    return bits, int(min(_MAX_TABLES, max(1, tables)))


class EmbeddingIndex:
    """Every pair of L2-normalised clip embeddings with cosine >= ``min_cosine``, without the n x n product.

    Random-hyperplane LSH (Charikar 2002): a hyperplane through the origin separates two vectors at angle theta
    with probability theta / pi, so ``bits`` sign bits put a pair at the threshold angle into the same bucket of
    one table with probability p^bits (p = 1 - acos(min_cosine) / pi). ``bits`` ~ log2(n) keeps about one
    unrelated clip per bucket; ``tables`` is the fewest with (1 - p^bits)^tables <= ``miss``, so a pair exactly
    at the threshold is missed with probability at most ``miss`` (1e-4), a closer pair far less often (cosine
    0.99: about 1e-12 or less). Candidates (a bucket shared in any table) are pre-screened by the Hamming distance of all
    their sign bits (a bound ``_HAMMING_SIGMAS`` binomial standard deviations above the threshold angle's
    expectation, so it drops no true pair in practice), then checked exactly (dot product): a reported pair
    always has cosine >= ``min_cosine``. Cost: hashing O(n * bits * tables * dim), candidates about
    n * tables; tables grow as n^rho with rho = log2(1 / p) (0.15 at 0.95), i.e. O(n^(1+rho) log n) overall
    (``benchmarks/dedup_index.py`` prints the measured growth). The planes come from a fixed seed: reruns agree.
    """

    def __init__(self, embeddings: np.ndarray, min_cosine: float, miss: float = EMBEDDING_MISS, seed: int = 0):
        self.E = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.min_cosine = float(min_cosine)
        n, dim = self.E.shape if self.E.ndim == 2 else (len(self.E), 0)
        self.bits, self.tables = lsh_layout(n, self.min_cosine, miss)
        total = self.bits * self.tables
        planes = np.random.default_rng(seed).standard_normal((dim, total)).astype(np.float32)
        weights = (1 << np.arange(self.bits, dtype=np.int64))[::-1]
        self.keys = np.empty((self.tables, n), np.int32)  # bits <= 24
        self.codes = np.empty((n, -(-total // 8)), np.uint8)
        for lo in range(0, n, _HASH_BLOCK):
            signs = (self.E[lo : lo + _HASH_BLOCK] @ planes) > 0
            self.keys[:, lo : lo + _HASH_BLOCK] = (signs.reshape(len(signs), self.tables, self.bits) @ weights).T
            self.codes[lo : lo + _HASH_BLOCK] = np.packbits(signs, axis=1)
        # Sign-bit disagreements of a pair at the threshold angle ~ Binomial(total, theta / pi).
        q = math.acos(max(-1.0, min(1.0, self.min_cosine))) / math.pi
        self.max_hamming = total * q + _HAMMING_SIGMAS * math.sqrt(total * q * (1 - q)) + 1

    def __len__(self) -> int:
        return len(self.E)

    def pairs(self, first_new: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) with a < b, b >= ``first_new`` (pairs of older clips were settled before), cosine >= the
        threshold; sorted, no repeats."""
        n = len(self.E)
        found = []
        for keys in self.keys:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            # Every pair inside a bucket: sorted position i with i + step while the key stays the same.
            live = np.arange(n - 1)
            step = 1
            while len(live):
                live = live[sk[live] == sk[live + step]]
                if len(live):
                    a, b = order[live], order[live + step]
                    a, b = np.minimum(a, b), np.maximum(a, b)
                    new = b >= first_new
                    found.append(a[new] * n + b[new])
                live = live[live + step + 1 < n]
                step += 1
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cand = np.sort(np.concatenate(found))  # a pair sharing buckets in several tables comes once
        cand = cand[np.r_[True, cand[1:] != cand[:-1]]]
        a, b = cand // n, cand % n
        out_a, out_b = [], []
        for lo in range(0, len(a), _VERIFY_BLOCK):
            ca, cb = a[lo : lo + _VERIFY_BLOCK], b[lo : lo + _VERIFY_BLOCK]
            near = np.bitwise_count(self.codes[ca] ^ self.codes[cb]).sum(axis=1) <= self.max_hamming
            ca, cb = ca[near], cb[near]
            cos = np.einsum("ij,ij->i", self.E[ca], self.E[cb])
            ok = cos >= self.min_cosine
            out_a.append(ca[ok])
            out_b.append(cb[ok])
        return np.concatenate(out_a), np.concatenate(out_b)


def _embedding_pairs(E: np.ndarray, scenes: list, n_old: int, cfg) -> set[tuple[int, int]]:
    """Unordered unit pairs (u < v, at least one new) with cosine >= ``min_cosine``, other scenes only unless
    ``compare_same_scene``."""
    if len(E) == 0 or n_old == len(E):
        return set()
    a, b = EmbeddingIndex(E, cfg.min_cosine).pairs(first_new=n_old)
    return {
        (int(u), int(v)) for u, v in zip(a, b) if cfg.compare_same_scene or scenes[u] is None or scenes[u] != scenes[v]
    }


def deduplicate(
    df: pd.DataFrame, settings, index_path: Path | None = None, embeddings: dict[str, list] | None = None
) -> pd.DataFrame:
    """Reject accepted clips that duplicate a kept one (this run's or the index's); update the index at
    ``index_path`` (None: an empty in-memory index, nothing written). Returns the updated manifest rows."""
    cfg = settings.curate.dedup
    k = settings.curate.aesthetic.num_frames
    df = df.copy()
    accepted = (df["status"] == "accepted") & df["phash"].notna()
    old = read_index(index_path, k)
    # A clip the index keeps but this run no longer accepts (its settings changed) leaves the dataset.
    gone = set(df.loc[~accepted, "clip_id"]) - set(df.loc[accepted, "clip_id"])
    old = old[~old["clip_id"].isin(gone)].reset_index(drop=True)
    new = df[accepted & ~df["clip_id"].isin(set(old["clip_id"]))]
    embeddings = embeddings or {}
    units = pd.DataFrame(
        {
            "clip_id": [*old["clip_id"], *new["clip_id"]],
            "scene_id": [*old["scene_id"], *new["scene_id"]],
            "aesthetic": [*old["aesthetic"], *(new["aesthetic"] if "aesthetic" in new else [np.nan] * len(new))],
            "phash": [*old["phash"], *new["phash"]],
            "embedding": [*old["embedding"], *(embeddings.get(c) for c in new["clip_id"])],
        }
    )
    n_old, n = len(old), len(units)
    scenes = [None if pd.isna(s) else str(s) for s in units["scene_id"]]
    parsed = [parse_hashes(h) for h in units["phash"]]
    if any(len(p) != k for p in parsed):
        raise ValueError(f"phash column: expected {k} frame hashes per clip (curate.aesthetic.num_frames)")
    H = np.asarray(parsed, dtype=np.uint64).reshape(n, k)
    pairs = _hash_pairs(H, scenes, n_old, cfg)
    if n and all(e is not None for e in units["embedding"]):
        E = np.asarray([np.asarray(e, np.float32) for e in units["embedding"]], np.float32)
        pairs |= _embedding_pairs(E, scenes, n_old, cfg)
    partners: dict[int, set[int]] = {}
    for a, b in pairs:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)

    order = list(range(n))
    if cfg.keep == "best_aesthetic":
        score = [float(a) if a is not None and not pd.isna(a) else -np.inf for a in units["aesthetic"]]
        order.sort(key=lambda u: (-score[u], u))
    rank = {u: i for i, u in enumerate(order)}
    kept: list[int] = []
    kept_set: set[int] = set()
    duplicate_of: dict[int, int] = {}
    for u in order:
        hits = [v for v in partners.get(u, ()) if v in kept_set]
        if hits:
            duplicate_of[u] = min(hits, key=rank.__getitem__)
        else:
            kept.append(u)
            kept_set.add(u)

    ids = units["clip_id"].tolist()
    dup_ids = {ids[u]: ids[v] for u, v in duplicate_of.items()}
    rows = df["clip_id"].isin(dup_ids) & accepted
    df.loc[rows, "status"] = "rejected"
    df.loc[rows, "reject_reason"] = "duplicate"
    df.loc[rows, "duplicate_of"] = df.loc[rows, "clip_id"].map(dup_ids)
    df.loc[rows, "clip_path"] = pd.NA
    if index_path is not None:
        write_index(units.iloc[kept].reset_index(drop=True), Path(index_path), k)
    return df
