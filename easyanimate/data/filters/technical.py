"""Weight-free aesthetic proxy on EasyAnimate's 0-10 aesthetic scale.

Four components, each mapped to [0, 1]: exposure (mean luma near mid-grey), contrast (luma std),
sharpness (log Laplacian variance) and colourfulness (Hasler & Suesstrunk 2003). They are combined
with a weighted *geometric* mean so one failing component (too dark, too blurry) drags the score down
instead of being averaged away by the others. Frames are scored at a fixed 512 px long side so the
sharpness term does not depend on the source resolution.
"""

from __future__ import annotations

import cv2
import numpy as np

from easyanimate.data.filters.base import resize_long_side

SCORE_SIDE = 512
_WEIGHTS = {"exposure": 0.3, "contrast": 0.2, "sharpness": 0.35, "colourfulness": 0.15}
_FLOOR = 0.02  # keeps the geometric mean finite for a black frame


def frame_components(rgb: np.ndarray) -> dict[str, float]:
    img = resize_long_side(rgb, SCORE_SIDE)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    luma = float(gray.mean())
    exposure = 1.0 - min(1.0, abs(luma - 0.45) / 0.4)  # 0.05..0.85 mean luma is acceptable range
    contrast = min(1.0, float(gray.std()) / 0.2)
    lap_var = float(cv2.Laplacian(gray * 255.0, cv2.CV_32F).var())
    # log scale: var ~10 is a smeared frame, ~300+ is crisp animation/footage at 512 px.
    sharpness = float(np.clip((np.log10(lap_var + 1.0) - 1.0) / 1.5, 0.0, 1.0))
    r, g, b = (img[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness_raw = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    colourfulness = min(1.0, colourfulness_raw / 60.0)
    return {"exposure": exposure, "contrast": contrast, "sharpness": sharpness, "colourfulness": colourfulness}


def frame_score(rgb: np.ndarray) -> float:
    comp = frame_components(rgb)
    log = sum(w * np.log(max(comp[k], _FLOOR)) for k, w in _WEIGHTS.items())
    return float(10.0 * np.exp(log))


def technical_score(frames: np.ndarray) -> float:
    """Mean frame score over the given frames (the aesthetic filter samples ``num_frames`` uniformly)."""
    return float(np.mean([frame_score(f) for f in frames]))
