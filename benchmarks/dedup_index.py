"""Near-duplicate index cost at scale, on synthetic hashes: ``python benchmarks/dedup_index.py [--sizes ...]``.

For each size n (clips), builds n x ``--frames`` random 64-bit frame hashes with 1% planted near-duplicate clips
(every frame 1-``--max-distance`` bits off an earlier clip's), then times, in this process:
- build: the multi-index-hashing table over all hashes (``HashIndex``);
- query: all pairs within ``--max-distance`` bits for every hash (the cost of a first run that dedups n clips;
  an incremental run pays this only for its new clips);
and checks every planted pair was found. Each size is timed ``--repeats`` times after a warm-up and the fastest
run counts (damps noise from other processes). Prints each size's seconds and, against the smallest size, the
cost ratio next to the n and n log n ratios: growth no worse than n log n means cost ratio <= n log n ratio.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from easyanimate.data.dedup_index import HashIndex


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--frames", type=int, default=4, help="hashes per clip (curate.aesthetic.num_frames)")
    parser.add_argument("--max-distance", type=int, default=8, help="curate.dedup.max_distance")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(1000, args.frames, args.max_distance)  # warm-up: first allocations and imports are not index cost
    base = None
    print(
        f"{'clips':>8} {'hashes':>8} {'build s':>8} {'query s':>8} {'total s':>8} {'cost x':>7} {'n x':>6} {'nlogn x':>8}  planted found"
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
        print(
            f"{n:>8} {m:>8} {build:>8.2f} {query:>8.2f} {total:>8.2f} {cost_x:>7.2f} {n_x:>6.1f} {nlogn_x:>8.2f}  "
            f"{'all' if found else 'MISSED SOME'} ({frame_pairs} frame pairs)"
        )


if __name__ == "__main__":
    main()
