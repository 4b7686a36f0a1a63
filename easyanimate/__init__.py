"""EasyAnimate reproduction.

Heavy classes are resolved lazily: ``import easyanimate`` stays cheap (no torch/diffusers), while
``easyanimate.SliceVAE`` etc. still work, which diffusers relies on when ``from_pretrained`` does
``getattr(importlib.import_module("easyanimate"), class_name)`` for the pipeline's components.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SliceVAE": "easyanimate.models.vae.slice_vae",
    "EasyAnimateTransformer3DModel": "easyanimate.models.dit.transformer",
    "EasyAnimatePipeline": "easyanimate.pipelines.pipeline_easyanimate",
    "EasyAnimatePipelineOutput": "easyanimate.pipelines.pipeline_easyanimate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'easyanimate' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
