"""Moved to ``easyanimate.registry``; kept as a re-export for ``benchmarks/pipeline_memory.py`` only."""

from easyanimate.registry import REGISTRY_SCHEME, lora_path, pipeline_folder

__all__ = ["REGISTRY_SCHEME", "lora_path", "pipeline_folder"]
