"""Model families served beside the project's own from-scratch EasyAnimate.

Each family loads a released checkpoint with the ecosystem's own classes (diffusers, transformers, peft):

- ``v51``: EasyAnimate V5.1 (and V5.1 InP) in the layout of its ``-diffusers`` releases.

This package's own module stays light (no torch): the CLI and the studio read a folder's family through it.
"""

from __future__ import annotations

import json
from pathlib import Path

NATIVE, V51 = "native", "easyanimate-v5.1"  # model families (``model.family``)


def folder_family(folder: str | Path) -> str | None:
    """Which family a saved pipeline folder holds, from its ``model_index.json``: ``easyanimate-v5.1`` (diffusers'
    ``EasyAnimatePipeline``/``EasyAnimateInpaintPipeline`` around diffusers' ``EasyAnimateTransformer3DModel``),
    ``native`` (any other pipeline folder: this project's own classes), None without a readable index."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    transformer = index.get("transformer")
    if (
        index.get("_class_name") in ("EasyAnimatePipeline", "EasyAnimateInpaintPipeline")
        and isinstance(transformer, list)
        and list(transformer) == ["diffusers", "EasyAnimateTransformer3DModel"]
    ):
        return V51
    return NATIVE
