"""Near-duplicate filter: per-clip perceptual hashes here, the decision in a dataset-level pass.

Duplicates are a cross-video question, and each video is curated on its own (in parallel, cached per video), so
this filter only computes: the 64-bit pHash (``imagehash.phash``) of each of the aesthetic filter's sampled frames
(same times: no extra decode) into the ``phash`` column and, with ``weights.frame_embedding``, the clip's mean
image embedding into its record. ``easyanimate.data.dedup_index.deduplicate`` then decides, over all videos in
a fixed order and against the dataset's persisted index, and fills ``duplicate_of``. See that module for the
rule, the index and ``curate.dedup.keep``.
"""

from __future__ import annotations

import numpy as np

from easyanimate.config import resolve_weight_path
from easyanimate.data.dedup_index import format_hashes
from easyanimate.data.filters.base import ClipFilter, Column, uniform_times

EMBEDDING_KEY = "_dedup_embedding"  # record-only key (never a manifest column)


def frame_hashes(frames: np.ndarray) -> list[int]:
    import imagehash
    from PIL import Image

    return [int(str(imagehash.phash(Image.fromarray(np.ascontiguousarray(f)))), 16) for f in frames]


class DedupFilter(ClipFilter):
    name = "dedup"
    columns = (
        Column("phash", dtype="string", histogram=False),
        Column("duplicate_of", dtype="string", histogram=False),
    )

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.dedup
        self.num_frames = settings.curate.aesthetic.num_frames
        self._model = None
        spec = settings.weights.frame_embedding
        self._model_dir = resolve_weight_path(spec, "weights.frame_embedding") if spec and self.cfg.enabled else None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def uses_device(self) -> bool:
        return self._model_dir is not None

    @property
    def decode_side(self) -> int:
        return 256  # pHash looks at a 32x32 thumbnail

    def sample_times(self, plan, info) -> list[float]:
        return uniform_times(plan.start_s, plan.end_s, self.num_frames)

    def setup(self, device: str) -> None:
        if self._model_dir is not None and self._model is None:
            from easyanimate.data.embeddings import ImageEmbedder

            self._model = ImageEmbedder(self._model_dir, device)

    def score(self, frames: np.ndarray) -> dict:
        scores = {"phash": format_hashes(frame_hashes(frames)), "duplicate_of": None}
        if self._model is not None:
            with self.lock:
                emb = self._model.embed(frames).mean(axis=0)
            emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
            scores[EMBEDDING_KEY] = [round(float(x), 6) for x in emb]
        return scores

    def record(self, scores: dict) -> dict:
        out = super().record(scores)
        if EMBEDDING_KEY in scores:
            out[EMBEDDING_KEY] = scores[EMBEDDING_KEY]
        return out

    def accept(self, scores: dict) -> str | None:
        return None  # decided across the dataset by dedup_index.deduplicate

    def expectations(self) -> list:
        import great_expectations as gx

        E = gx.expectations
        return [
            E.ExpectColumnValuesToNotBeNull(column="phash"),
            E.ExpectColumnValuesToBeUnique(column="phash"),
            E.ExpectColumnValuesToBeNull(column="duplicate_of"),
        ]
