"""LoRA fine-tuning flow (peft adapters on the DiT's attention projections), and the adapter's own
registered MLflow model, linked to the base pipeline version it was trained on."""

from __future__ import annotations

import mlflow
from prefect import flow

from easyanimate.config import Settings
from flows.common import run_training_stage, settings_from


@flow(name="lora", log_prints=True)
def lora_flow(params_path: str | None = None, parent_run_id: str | None = None,
              upstream_run_id: str | None = None) -> dict:
    return run_training_stage("lora", settings_from(params_path), parent_run_id, upstream_run_id)


def register_lora_adapter(settings: Settings, base_model_name: str, base_version: str,
                          parent_run_id: str | None = None) -> dict | None:
    """Register ``paths.lora`` as a version of ``lora.registered_model`` (a pyfunc whose only artifact is
    the adapter folder; it loads ``models:/BASE/VERSION`` when served) and link the two by tags.

    The adapter version takes the champion alias when its base version holds it, so
    ``models:/<lora model>@champion`` always pairs with ``models:/<base>@champion``. Returns None when
    no adapter was trained.
    """
    from mlflow.tracking import MlflowClient

    from easyanimate.lineage import dvc_hash
    from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME, read_lora_config
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc

    adapter = settings.paths.lora
    if not (adapter / LORA_WEIGHT_NAME).is_file():
        print(f"no LoRA adapter at {adapter}; nothing to register")
        return None
    client = MlflowClient()
    name = settings.lora.registered_model
    base_uri = f"models:/{base_model_name}/{base_version}"
    adapter_bytes = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    nested = mlflow.active_run() is not None or parent_run_id is not None
    with mlflow.start_run(run_name="register_lora", parent_run_id=parent_run_id, nested=nested,
                          tags={"lora_base_model": base_uri}):
        model = EasyAnimatePyfunc(generate=settings.generate, max_text_tokens=settings.dit.model.max_text_tokens,
                                  base_model_uri=base_uri, lora_scale=settings.lora.default_scale)
        info = mlflow.pyfunc.log_model(name="lora", python_model=model, artifacts={"lora": str(adapter)},
                                       registered_model_name=name, pip_requirements=["easyanimate"])
        mlflow.log_metric("lora.adapter_bytes", float(adapter_bytes))
    version = str(info.registered_model_version)
    config = read_lora_config(adapter)  # what the file holds, whatever the settings say now
    tags = {
        "base_model_name": base_model_name,
        "base_model_version": str(base_version),
        "base_model_uri": base_uri,
        "lora_rank": str(config.get("r", "")),
        "lora_alpha": str(config.get("lora_alpha", "")),
        "lora_target_modules": ",".join(sorted(config.get("target_modules") or [])),
        "lora_default_scale": str(settings.lora.default_scale),
        "adapter_bytes": str(adapter_bytes),
        "lora_dvc_hash": dvc_hash(adapter),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    uri = f"models:/{name}/{version}"
    client.set_model_version_tag(base_model_name, str(base_version), "lora_model_uri", uri)
    champion = settings.registry.champion_alias
    alias = None
    if champion in client.get_model_version(base_model_name, str(base_version)).aliases:
        client.set_registered_model_alias(name, champion, version)
        alias = champion
    print(f"registered LoRA adapter {uri} ({adapter_bytes / 1024:.0f} KiB) for {base_uri}"
          + (f" as @{alias}" if alias else ""))
    return {"model": name, "version": version, "uri": uri, "base_model_uri": base_uri, "alias": alias,
            "adapter_bytes": adapter_bytes}
