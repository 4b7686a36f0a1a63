"""Near-duplicate index cost at scale, on synthetic hashes and embeddings: ``python benchmarks/dedup_index.py``.

For each size n (clips), builds n x ``--frames`` random 64-bit frame hashes with 1% planted near-duplicate clips
(every frame 1-``--max-distance`` bits off an earlier clip's), then times, in this process:
- build: the multi-index-hashing table over all hashes (``HashIndex``);
- query: all pairs within ``--max-distance`` bits for every hash (the cost of a first run that dedups n clips;
  an incremental run pays this only for its new clips);
and checks every planted pair was found. Each size is timed ``--repeats`` times after a warm-up and the fastest
run counts (damps noise from other processes). Prints each size's seconds and, against the smallest size, the
cost ratio next to the n and n log n ratios (growth no worse than n log n means cost ratio <= n log n ratio) and
the growth exponent log(cost ratio) / log(n ratio) (1 = linear; n log n from 10k to 100k is 1.10).

The same for the embedding path (``--dim``-dimensional unit vectors, 1% planted copies at cosine uniform in
[``--min-cosine``, 0.999] of an earlier clip): ``EmbeddingIndex`` build (the LSH tables) + query (all pairs at
or above ``--min-cosine``), with how many planted pairs were found; and, up to ``--brute-max`` clips, the exact
n x n product it replaces (blocked, as the code did before) for comparison.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from easyanimate.data.dedup_index import EmbeddingIndex, HashIndex, lsh_layout


def synthetic(n: int, frames: int, max_distance: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, size=(n, frames), dtype=np.uint64, endpoint=True)
    # Originals from the first half, copies in the second: no copy of a copy.
    dups = rng.choice(np.arange(n // 2, n), size=max(1, n // 100), replace=False)
    originals = rng.integers(0, n // 2, size=len(dups))
    for d, o in zip(dups, originals):
        for f in range(frames):
            bits = rng.choice(64, size=int(rng.integers(1, max_distance + 1)), replace=False)
            hashes[d, f] = hashes[o, f] ^ np.uint64(sum(1 << int(b) for b in bits))
    return hashes, np.stack([dups, originals], 1)


def run(n: int, frames: int, max_distance: int, repeats: int = 1) -> tuple[float, float, bool, int]:
    hashes, planted = synthetic(n, frames, max_distance)
    flat = hashes.reshape(-1)
    build = query = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        index = HashIndex(flat, max_distance)
        build = min(build, time.perf_counter() - t0)
        t0 = time.perf_counter()
        qi, ei = index.pairs(flat)
        query = min(query, time.perf_counter() - t0)
    pairs = set(zip((qi // frames).tolist(), (ei // frames).tolist()))
    found = all((int(d), int(o)) in pairs for d, o in planted)
    return build, query, found, int((qi // frames != ei // frames).sum())


def synthetic_embeddings(n: int, dim: int, min_cosine: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    dups = rng.choice(np.arange(n // 2, n), size=max(1, n // 100), replace=False)
    originals = rng.integers(0, n // 2, size=len(dups))
    for d, o, cos in zip(dups, originals, rng.uniform(min_cosine + 1e-3, 0.999, size=len(dups))):
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= (noise @ emb[o]) * emb[o]
        emb[d] = cos * emb[o] + np.sqrt(1 - cos * cos) * noise / np.linalg.norm(noise)
    return emb, np.stack([np.minimum(dups, originals), np.maximum(dups, originals)], 1)


def brute_pairs(emb: np.ndarray, min_cosine: float, block: int = 1024) -> int:
    count = 0
    for lo in range(0, len(emb), block):
        count += int((np.triu(emb[lo : lo + block] @ emb.T, k=lo + 1) >= min_cosine).sum())
    return count


def run_embeddings(n: int, dim: int, min_cosine: float, repeats: int, brute_max: int) -> dict:
    emb, planted = synthetic_embeddings(n, dim, min_cosine)
    build = query = brute = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        index = EmbeddingIndex(emb, min_cosine)
        build = min(build, time.perf_counter() - t0)
        t0 = time.perf_counter()
        a, b = index.pairs()
        query = min(query, time.perf_counter() - t0)
    found = set(zip(a.tolist(), b.tolist()))
    if n <= brute_max:
        t0 = time.perf_counter()
        brute_count = brute_pairs(emb, min_cosine)
        brute = time.perf_counter() - t0
        assert brute_count == len(found), (brute_count, len(found))  # the index finds exactly the true pairs
    hits = sum((int(x), int(y)) in found for x, y in planted)
    return {"build": build, "query": query, "found": hits, "planted": len(planted), "brute": brute}


def growth(label: str, rows: list[tuple[int, float]]) -> None:
    (n0, c0), (n1, c1) = rows[0], rows[-1]
    nlogn = (n1 * math.log(n1)) / (n0 * math.log(n0))
    print(
        f"{label}: {n0} -> {n1}: cost x{c1 / c0:.1f} (n x{n1 / n0:.1f}, n log n x{nlogn:.1f}); growth exponent "
        f"{math.log(c1 / c0) / math.log(n1 / n0):.2f} (n log n: {math.log(nlogn) / math.log(n1 / n0):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--frames", type=int, default=4, help="hashes per clip (curate.aesthetic.num_frames)")
    parser.add_argument("--max-distance", type=int, default=8, help="curate.dedup.max_distance")
    parser.add_argument("--dim", type=int, default=512, help="clip embedding size (CLIP ViT-B: 512)")
    parser.add_argument("--min-cosine", type=float, default=0.95, help="curate.dedup.min_cosine")
    parser.add_argument("--brute-max", type=int, default=30_000, help="largest size also timed by brute force")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=["hashes", "embeddings"], default=None)
    args = parser.parse_args()
    if args.skip != "hashes":
        run(1000, args.frames, args.max_distance)  # warm-up: first allocations and imports are not index cost
        base, costs = None, []
        print("pHash index (HashIndex)")
        print(
            f"{'clips':>8} {'hashes':>8} {'build s':>8} {'query s':>8} {'total s':>8} {'cost x':>7} {'n x':>6} "
            f"{'nlogn x':>8}  planted found"
        )
        for n in args.sizes:
            build, query, found, frame_pairs = run(n, args.frames, args.max_distance, args.repeats)
            total = build + query
            m = n * args.frames
            if base is None:
                base = (total, m)
            cost_x = total / base[0]
            n_x = m / base[1]
            nlogn_x = (m * math.log(m)) / (base[1] * math.log(base[1]))
            costs.append((m, total))
            print(
                f"{n:>8} {m:>8} {build:>8.2f} {query:>8.2f} {total:>8.2f} {cost_x:>7.2f} {n_x:>6.1f} {nlogn_x:>8.2f}  "
                f"{'all' if found else 'MISSED SOME'} ({frame_pairs} frame pairs)"
            )
        growth("pHash hashes", costs)
    if args.skip != "embeddings":
        run_embeddings(1000, args.dim, args.min_cosine, 1, 0)  # warm-up
        print(f"\nembedding index (EmbeddingIndex, dim {args.dim}, min_cosine {args.min_cosine})")
        print(
            f"{'clips':>8} {'bits':>5} {'tables':>6} {'build s':>8} {'query s':>8} {'total s':>8} {'cost x':>7} "
            f"{'n x':>6} {'nlogn x':>8} {'brute s':>8}  planted found"
        )
        costs, brute = [], []
        for n in args.sizes:
            r = run_embeddings(n, args.dim, args.min_cosine, args.repeats, args.brute_max)
            total = r["build"] + r["query"]
            costs.append((n, total))
            if r["brute"] != float("inf"):
                brute.append((n, r["brute"]))
            n0, c0 = costs[0]
            bits, tables = lsh_layout(n, args.min_cosine)
            print(
                f"{n:>8} {bits:>5} {tables:>6} {r['build']:>8.2f} {r['query']:>8.2f} {total:>8.2f} {total / c0:>7.2f} "
                f"{n / n0:>6.1f} {(n * math.log(n)) / (n0 * math.log(n0)):>8.2f} "
                f"{r['brute'] if r['brute'] != float('inf') else float('nan'):>8.2f}  {r['found']}/{r['planted']}"
            )
        growth("embeddings (LSH)", costs)
        if len(brute) > 1:
            growth("embeddings (exact n x n, before)", brute)


if __name__ == "__main__":
    main()
