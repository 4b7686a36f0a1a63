"""Aesthetic filter: mean score of ``aesthetic.num_frames`` uniformly sampled frames on a 0-10 scale,
from the weight-free technical proxy (``scorer: technical``) or the LAION predictor (``scorer: laion``)."""

from __future__ import annotations

import numpy as np

from easyanimate.config import resolve_weight_path
from easyanimate.data.filters.base import ClipFilter, Column, uniform_times
from easyanimate.data.filters.technical import SCORE_SIDE, technical_score


class AestheticFilter(ClipFilter):
    name = "aesthetic"
    columns = (Column("aesthetic", digits=4),)

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings.curate.aesthetic
        self._model = None
        if self.cfg.scorer == "laion":  # fail on a bad path now, not after decoding the first video
            self._clip_dir = resolve_weight_path(settings.weights.aesthetic_clip, "weights.aesthetic_clip")
            self._head = resolve_weight_path(settings.weights.aesthetic_head, "weights.aesthetic_head")

    @property
    def uses_device(self) -> bool:
        return self.cfg.scorer == "laion"

    @property
    def decode_side(self) -> int:
        return SCORE_SIDE  # both scorers see at most 512 px (CLIP resizes further)

    def sample_times(self, plan, info) -> list[float]:
        return uniform_times(plan.start_s, plan.end_s, self.cfg.num_frames)

    def setup(self, device: str) -> None:
        if self.cfg.scorer == "laion" and self._model is None:
            from easyanimate.data.filters.laion import LaionAesthetic

            self._model = LaionAesthetic(self._clip_dir, self._head, device)

    def score(self, frames: np.ndarray) -> dict[str, float]:
        if self.cfg.scorer == "laion":
            with self.lock:  # one model per worker, shared by its threads
                return {"aesthetic": float(self._model.score_frames(frames).mean())}
        return {"aesthetic": technical_score(frames)}

    def accept(self, scores: dict[str, float]) -> str | None:
        return None if scores["aesthetic"] >= self.cfg.threshold else "low_aesthetic"

    def expectations(self) -> list:
        import great_expectations as gx

        E = gx.expectations
        return [
            E.ExpectColumnValuesToNotBeNull(column="aesthetic"),
            E.ExpectColumnValuesToBeBetween(column="aesthetic", min_value=self.cfg.threshold),
        ]
