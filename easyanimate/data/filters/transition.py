"""Scene-transition filter: are the clip's sampled frames one shot?

ContentDetector finds hard cuts from frame-to-frame HSV changes; a cross-dissolve or a fade to black changes
every frame only a little and slips through, leaving two shots (or a dip to black) inside one clip. This
filter compares frames taken across the whole clip instead of neighbouring ones: the first and last frame
(taken ``transition.edge_s`` inside the clip, so a short fade at an edge passes, as the scene planner's tail
trim already assumes), the middle frame and the aesthetic filter's ``num_frames`` frames (same times: the
single decode pass hands them out again, nothing is decoded twice).

Two scores, both must pass (reason ``scene_transition``):
- ``scene_similarity``: the lowest similarity between any two of those frames. Weight-free (``histogram``):
  OpenCV correlation of 16x4x4-bin HSV colour histograms (1 = same colour distribution, ~0 = different
  shots). With ``weights.frame_embedding`` (a transformers CLIP or DINOv2 folder; ``scorer: auto`` picks it)
  the cosine similarity of the model's image embeddings, thresholded by ``min_embedding_similarity``.
- ``luma_ratio``: (darkest frame's mean luma + 4) / (brightest's + 4); a fade to (or from) black drives it
  towards 0 while a shot's exposure barely moves. Computed by both scorers.
"""

from __future__ import annotations

import cv2
import numpy as np

from easyanimate.config import resolve_weight_path
from easyanimate.data.filters.base import ClipFilter, Column, resize_long_side, uniform_times

_BINS = [16, 4, 4]
_RANGES = [0, 180, 0, 256, 0, 256]


def colour_histogram(rgb: np.ndarray, max_side: int) -> np.ndarray:
    hsv = cv2.cvtColor(resize_long_side(rgb, max_side), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, _BINS, _RANGES)
    return cv2.normalize(hist, hist).flatten()


def histogram_similarity(frames: np.ndarray, max_side: int) -> float:
    """Lowest HSV-histogram correlation between any two frames (1.0 for fewer than two)."""
    hists = [colour_histogram(f, max_side) for f in frames]
    pairs = [cv2.compareHist(a, b, cv2.HISTCMP_CORREL) for i, a in enumerate(hists) for b in hists[i + 1 :]]
    return float(min(pairs, default=1.0))


def embedding_similarity(embeddings: np.ndarray) -> float:
    """Lowest cosine similarity between any two L2-normalised embeddings."""
    if len(embeddings) < 2:
        return 1.0
    return float((embeddings @ embeddings.T).min())


def luma_ratio(frames: np.ndarray, max_side: int) -> float:
    lumas = [float(cv2.cvtColor(resize_long_side(f, max_side), cv2.COLOR_RGB2GRAY).mean()) for f in frames]
    return (min(lumas) + 4.0) / (max(lumas) + 4.0)


class TransitionFilter(ClipFilter):
    name = "transition"
    columns = (Column("scene_similarity", digits=4), Column("luma_ratio", digits=4))

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.transition
        self.num_frames = settings.curate.aesthetic.num_frames
        spec = settings.weights.frame_embedding
        self.scorer = self.cfg.scorer if self.cfg.scorer != "auto" else ("embedding" if spec else "histogram")
        self._model = None
        if self.scorer == "embedding":  # a bad path fails now, not after decoding the first video
            self._model_dir = resolve_weight_path(spec, "weights.frame_embedding")

    @property
    def uses_device(self) -> bool:
        return self.scorer == "embedding"

    @property
    def decode_side(self) -> int:
        return self.cfg.max_side

    def sample_times(self, plan, info) -> list[float]:
        frame_s = 1.0 / max(info.fps, 1.0)
        edge = min(self.cfg.edge_s, plan.duration_s / 4)
        first, last = plan.start_s + edge, max(plan.start_s + edge, plan.end_s - max(edge, frame_s))
        inner = [t for t in uniform_times(plan.start_s, plan.end_s, self.num_frames) if first <= t <= last]
        return sorted([first, *inner, (plan.start_s + plan.end_s) / 2, last])

    def setup(self, device: str) -> None:
        if self.scorer == "embedding" and self._model is None:
            from easyanimate.data.embeddings import ImageEmbedder

            self._model = ImageEmbedder(self._model_dir, device)

    def score(self, frames: np.ndarray) -> dict[str, float]:
        if self.scorer == "embedding":
            with self.lock:
                similarity = embedding_similarity(self._model.embed(frames))
        else:
            similarity = histogram_similarity(frames, self.cfg.max_side)
        return {"scene_similarity": similarity, "luma_ratio": luma_ratio(frames, self.cfg.max_side)}

    @property
    def min_similarity(self) -> float:
        return self.cfg.min_embedding_similarity if self.scorer == "embedding" else self.cfg.min_similarity

    def accept(self, scores: dict[str, float]) -> str | None:
        if scores["scene_similarity"] < self.min_similarity or scores["luma_ratio"] < self.cfg.min_luma_ratio:
            return "scene_transition"
        return None

    def expectations(self) -> list:
        import great_expectations as gx

        E = gx.expectations
        return [
            E.ExpectColumnValuesToNotBeNull(column="scene_similarity"),
            E.ExpectColumnValuesToBeBetween(column="scene_similarity", min_value=self.min_similarity),
            E.ExpectColumnValuesToBeBetween(column="luma_ratio", min_value=self.cfg.min_luma_ratio),
        ]
