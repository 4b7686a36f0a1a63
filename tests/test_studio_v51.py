"""The studio with EasyAnimate V5.1 models: a registered V5.1 InP version and its LoRA version (tiny random
components, nothing from a hub), picked as the page picks them: V5.1 geometry and scheduler, start/end images,
the adapter and its strength. The page itself is driven in a browser by tests/test_studio.py; this is its service."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from easyanimate.config import load_settings
from easyanimate.data.video_io import decode_frames
from tests.conftest import REPO
from tests.v51_tiny import save_tiny_v51, save_tiny_v51_lora

FIELDS = {"scheduler": "flow-match", "steps": 2, "guidance_scale": 3.0, "size": "32x32", "num_frames": 5, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """models:/easyanimate/1 = a V5.1 InP pipeline, models:/easyanimate-lora/1 = an adapter trained on it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from easyanimate.registry import pyfunc_model
    from easyanimate.studio.service import Studio

    root = tmp_path_factory.mktemp("studio-v51")
    inp = save_tiny_v51(root / "inp", inpaint=True)
    lora = save_tiny_v51_lora(inp, root / "lora")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = load_settings(
        REPO / "params.yaml",
        overrides={
            "model": {"family": "easyanimate-v5.1"},
            "v51": {"model_dir": str(inp), "dtype": "float32", "num_frames": 5, "train_height": 32, "train_width": 32},
            "generate": {"height": 32, "width": 32, "num_inference_steps": 2},
            "registry": {"tracking_uri": uri},
            "paths": {"cache": str(root / "cache"), "v51_pipeline": str(root / "none")},
        },
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        experiment = mlflow.create_experiment("studio-v51", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(
                name="pipeline",
                python_model=pyfunc_model(settings),
                artifacts={"pipeline": str(inp)},
                registered_model_name="easyanimate",
                pip_requirements=["easyanimate"],
            )
            mlflow.pyfunc.log_model(
                name="lora",
                python_model=pyfunc_model(settings, base_model_uri="models:/easyanimate/1", lora_scale=1.0),
                artifacts={"lora": str(lora)},
                registered_model_name="easyanimate-lora",
                pip_requirements=["easyanimate"],
            )
        client.set_model_version_tag("easyanimate-lora", "1", "base_model_uri", "models:/easyanimate/1")
        client.set_registered_model_alias("easyanimate", "champion", "1")
        start = root / "start.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(start)
        yield {"studio": Studio(settings, cache_dir=root / "studio"), "start": start, "root": root}
    finally:
        mlflow.set_tracking_uri(previous)


def _form(prompt="a red fox runs", **kw):
    return {"prompt": prompt, "negative_prompt": "", "model": "models:/easyanimate@champion", **FIELDS, **kw}


def test_v51_model_geometry_scheduler_and_images(studio):
    s = studio["studio"]
    assert s.default_model() == "models:/easyanimate/1"
    info = s.model_info("models:/easyanimate/1")
    assert info.family == "easyanimate-v5.1" and info.image_to_video and info.schedulers == ("flow-match",)
    assert info.multiple == 16 and info.frame_counts[:4] == (1, 5, 9, 13) and info.defaults["num_frames"] == 5
    assert [c.ref for c in s.loras("models:/easyanimate/1")] == ["models:/easyanimate-lora/1"]

    from easyanimate.studio.service import InvalidRequest

    with pytest.raises(InvalidRequest) as bad:
        s.check_request(_form(num_frames=6, scheduler="dpm++", size="40x32", end_image=str(studio["start"])))
    errors = bad.value.errors
    assert "1 + 4k" in errors["num_frames"] and "flow-match" in errors["scheduler"]
    assert "multiples of 16" in errors["size"] and "start image" in errors["end_image"]


def test_v51_image_to_video_with_the_lora_and_its_strength(studio):
    s = studio["studio"]
    start = str(studio["start"])
    plain = s.generate(s.check_request(_form(start_image=start)))
    assert decode_frames(plain.video).shape[:3] == (5, 32, 32)
    assert "--image" in plain.params["command"] and "note" not in plain.params
    tuned = s.generate(s.check_request(_form(start_image=start, lora="models:/easyanimate-lora/1", lora_scale=1.0)))
    off = s.generate(s.check_request(_form(start_image=start, lora="models:/easyanimate-lora/1", lora_scale=0.0)))
    base, with_lora, at_zero = (decode_frames(r.video).astype(np.int16) for r in (plain, tuned, off))
    assert np.abs(with_lora - base).mean() > 0.5, "the adapter changes the video"
    assert np.array_equal(at_zero, base), "strength 0 is the base model"
    assert s.pipeline_loads == 2  # the adapter reloads the model once; a new strength does not
