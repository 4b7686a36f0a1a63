"""Turn a pipeline or LoRA reference (local folder, file, or ``models:/`` registry URI) into a local path."""

from __future__ import annotations

import os
from pathlib import Path

from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME

REGISTRY_SCHEME = "models:/"


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", tracking_uri))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def pipeline_folder(model: str | Path, tracking_uri: str | None = None) -> Path:
    """A saved pipeline folder, or the one inside ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
    model = str(model)
    if model.startswith(REGISTRY_SCHEME):
        found = sorted(_download(model, tracking_uri).rglob("model_index.json"))
        if not found:
            raise FileNotFoundError(f"{model} holds no pipeline folder (no model_index.json)")
        return found[0].parent
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a pipeline folder (no model_index.json); "
                                "run the pipeline or pass models:/NAME@ALIAS")
    return path


def lora_path(lora: str | Path, tracking_uri: str | None = None) -> Path:
    """An adapter folder or ``.safetensors`` file, or the adapter inside a registered LoRA model."""
    lora = str(lora)
    if lora.startswith(REGISTRY_SCHEME):
        found = sorted(_download(lora, tracking_uri).rglob(LORA_WEIGHT_NAME))
        if not found:
            raise FileNotFoundError(f"{lora} holds no LoRA adapter ({LORA_WEIGHT_NAME})")
        return found[0].parent
    path = Path(lora)
    if not (path / LORA_WEIGHT_NAME).is_file() and not (path.is_file() and path.suffix == ".safetensors"):
        raise FileNotFoundError(f"{lora} is neither a LoRA folder (with {LORA_WEIGHT_NAME}) nor a .safetensors file")
    return path
