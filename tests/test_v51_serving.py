"""Serving EasyAnimate V5.1 models: tiny random V5.1 folders (tests/v51_tiny.py), a text-to-video one, an InP one and a
LoRA adapter, logged as ``EasyAnimatePyfunc`` models in a throwaway sqlite registry the way the DAG registers them,
loaded back with ``mlflow.pyfunc.load_model`` and asked for videos; plus ``easyanimate generate`` with registered
V5.1 models and adapters (``models:/NAME@ALIAS``)."""

from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pandas as pd
import pytest

from easyanimate.config import GenerateConfig, V51Config
from easyanimate.data.video_io import decode_frames
from easyanimate.serving.pyfunc import EasyAnimatePyfunc, GenerationStopped
from tests.v51_tiny import save_tiny_v51, save_tiny_v51_lora

FRAMES, SIZE, STEPS = 5, 32, 2
PROMPT = "a red fox runs"
GENERATE = GenerateConfig(
    height=SIZE,
    width=SIZE,
    num_inference_steps=STEPS,
    guidance_scale=3.0,
    max_side=256,
    max_frames=64,
    max_inference_steps=50,
)
V51 = V51Config(dtype="float32", num_frames=FRAMES)
FAMILY = "easyanimate-v5.1"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    start = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not the video's size: scaled and cropped
    return start, 255 - start, np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """models:/v51-t2v/1 (no adapter), models:/v51-inp@champion, and models:/v51-lora@champion: the adapter alone
    on top of v51-t2v/1 at scale 1, as the DAG's LoRA registry versions are."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("v51-serving")
    t2v = save_tiny_v51(root / "t2v", inpaint=False)
    inp = save_tiny_v51(root / "inp", inpaint=True)
    lora = save_tiny_v51_lora(t2v, root / "lora")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()

    def log(name, model, artifacts):
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=model,
            artifacts={k: str(v) for k, v in artifacts.items()},
            registered_model_name=name,
            pip_requirements=["easyanimate"],
        )
        client.set_registered_model_alias(name, "champion", info.registered_model_version)

    try:
        experiment = mlflow.create_experiment("v51-serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            log("v51-t2v", EasyAnimatePyfunc(generate=GENERATE, family=FAMILY, v51=V51), {"pipeline": t2v})
            log("v51-inp", EasyAnimatePyfunc(generate=GENERATE, family=FAMILY, v51=V51), {"pipeline": inp})
            base = "models:/v51-t2v/1"
            lora_model = EasyAnimatePyfunc(
                generate=GENERATE, family=FAMILY, v51=V51, base_model_uri=base, lora_scale=1.0
            )
            log("v51-lora", lora_model, {"lora": lora})
        yield {"root": root, "uri": uri, "t2v": t2v, "inp": inp, "lora": lora}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def models(registry):
    import mlflow

    return {name: mlflow.pyfunc.load_model(f"models:/v51-{name}@champion") for name in ("t2v", "inp", "lora")}


def _predict(model, tmp_path, **record) -> tuple[np.ndarray, dict]:
    out = model.predict(pd.DataFrame([{"prompt": PROMPT, **record}]))
    row = out.iloc[0].to_dict()
    path = tmp_path / f"video-{abs(hash(str(sorted(record.items())))) % 10**8}.mp4"
    path.write_bytes(base64.b64decode(row["video_mp4_base64"]))
    return decode_frames(path), row


def _refused(model, match: str, **record) -> str:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=match) as info:
        model.predict(pd.DataFrame([{"prompt": PROMPT, **record}]))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 in the scoring server
    return info.value.message


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------- pyfunc
def test_t2v_model_returns_mp4_of_the_requested_frames(models, tmp_path):
    frames, row = _predict(models["t2v"], tmp_path)  # frames default to the stored v51.num_frames
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert row["num_frames"] == FRAMES and (row["height"], row["width"]) == (SIZE, SIZE)
    assert (row["fps"], row["seed"]) == (GENERATE.fps, GENERATE.seed)
    frames, row = _predict(models["t2v"], tmp_path, num_frames=9, width=48, seed=3)
    assert frames.shape == (9, SIZE, 48, 3) and row["num_frames"] == 9 and row["seed"] == 3
    model = models["t2v"].unwrap_python_model()
    assert model.family == FAMILY and not model.inpaint and not model.has_lora


def test_image_to_video_on_the_inp_model(models, tmp_path):
    start, other, end = _images()
    model = models["inp"]
    with_start, _ = _predict(model, tmp_path, image=_png(start))
    assert with_start.shape == (FRAMES, SIZE, SIZE, 3)
    both, _ = _predict(model, tmp_path, image=_png(start), end_image=_png(end))
    assert both.shape == (FRAMES, SIZE, SIZE, 3)
    data_url, _ = _predict(model, tmp_path, image="data:image/png;base64," + _png(other))
    assert _diff(with_start, data_url) > 0.5, "the start image conditions the video"
    text_only, _ = _predict(model, tmp_path)  # an InP model also does text-to-video
    assert text_only.shape == (FRAMES, SIZE, SIZE, 3)


def test_bad_requests_are_400_naming_the_field(models):
    start, _, end = _images()
    message = _refused(models["t2v"], "InP", image=_png(start))
    assert "text-to-video" in message
    _refused(models["t2v"], "num_frames=6: .*1 \\+ 4k frames", num_frames=6)
    _refused(models["t2v"], "height=40: must be a positive multiple of 16", height=40)
    inp = models["inp"]
    _refused(inp, "end_image needs image", end_image=_png(end))
    _refused(inp, "^image is not valid base64", image="not base64 at all!")
    _refused(
        inp,
        "^end_image is not a readable PNG or JPEG",
        image=_png(start),
        end_image=base64.b64encode(b"GIF89a").decode(),
    )
    _refused(inp, "^image must be a base64-encoded PNG or JPEG string", image=7)
    _refused(inp, "unknown request field", mask="x")
    _refused(models["t2v"], "no LoRA adapter", lora_scale=0.5)


def test_work_budget_counts_v51_frames(models):
    model = models["t2v"].unwrap_python_model()
    budget = GENERATE.max_records_per_request * FRAMES * SIZE * SIZE * STEPS  # the default request: v51.num_frames
    assert model.limits["max_request_budget"] == budget
    _refused(models["t2v"], "9 frames x 32x32 x 10 steps .* over this server.s budget", num_frames=9, steps=10)
    model.set_limits(GENERATE.model_copy(update={"max_records_per_request": 2}))
    try:
        assert model.limits["max_request_budget"] == 2 * FRAMES * SIZE * SIZE * STEPS
    finally:
        model._limits = None


def test_lora_model_scale_zero_is_the_base_model(models, tmp_path):
    base, _ = _predict(models["t2v"], tmp_path)
    styled, _ = _predict(models["lora"], tmp_path)  # the registered adapter's default scale: 1
    off, _ = _predict(models["lora"], tmp_path, lora_scale=0)
    assert np.array_equal(off, base)
    assert _diff(styled, base) > 0.5
    again, _ = _predict(models["lora"], tmp_path, lora_scale=1.0)
    assert np.array_equal(again, styled), "the per-request scale is set back for each request"
    model = models["lora"].unwrap_python_model()
    assert model.has_lora and model.base_model_uri == "models:/v51-t2v/1"


def test_stop_checks_and_progress_reach_the_v51_pipeline(models):
    model = models["t2v"].unwrap_python_model()
    requests = model.check_request([{"prompt": PROMPT}])
    steps = []
    [out] = model.generate(requests, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, STEPS), (2, STEPS)] and out["num_frames"] == FRAMES
    with pytest.raises(GenerationStopped, match="client gone") as info:
        model.generate(requests, should_stop=lambda: "client gone" if steps else None, on_step=None)
    assert info.value.steps_done == 0  # asked before the first step too
    seen = []
    with pytest.raises(GenerationStopped, match="deadline") as info:
        model.generate(requests, should_stop=lambda: "deadline" if seen else None, on_step=lambda d, t: seen.append(d))
    assert info.value.steps_done == 1 and seen == [1]
    assert model.lock.acquire(blocking=False), "a stopped generation frees the model"
    model.lock.release()


def test_native_model_refuses_images_and_pickles_plain_values():
    start, _, _ = _images()
    native = EasyAnimatePyfunc(generate=GENERATE)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="native EasyAnimate model: text-to-video only") as info:
        native.parse({"prompt": PROMPT, "image": _png(start)})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    old = EasyAnimatePyfunc(generate=GENERATE)
    del old.family, old.v51  # pickled before V5.1 serving: native
    assert not old.is_v51 and old.limits["max_request_budget"] == GENERATE.request_budget
    v51 = pickle.loads(pickle.dumps(EasyAnimatePyfunc(generate=GENERATE, family=FAMILY, v51=V51)))
    assert isinstance(v51.v51, dict) and v51.v51["num_frames"] == FRAMES and isinstance(v51.defaults, dict)
    with pytest.raises(ValueError, match="family='v5'"):
        EasyAnimatePyfunc(family="v5")


def test_easyanimate_serve_app_takes_v51_image_requests(models):
    from fastapi.testclient import TestClient

    from easyanimate.config import ServeConfig
    from easyanimate.serving.server import build_app

    start, _, end = _images()
    app = build_app(models["inp"].unwrap_python_model(), ServeConfig(request_timeout_s=120))
    with TestClient(app) as client:
        record = {"prompt": PROMPT, "image": _png(start), "end_image": _png(end), "num_frames": 9}
        response = client.post("/invocations", json={"dataframe_records": [record]})
        assert response.status_code == 200, response.text
        [prediction] = response.json()["predictions"]
        assert (prediction["num_frames"], prediction["height"], prediction["width"]) == (9, SIZE, SIZE)
        assert base64.b64decode(prediction["video_mp4_base64"])[4:8] == b"ftyp"
        response = client.post("/invocations", json={"dataframe_records": [{"prompt": PROMPT, "image": "%%%"}]})
        assert response.status_code == 400 and "image is not valid base64" in response.json()["message"]
    app = build_app(models["t2v"].unwrap_python_model(), ServeConfig(request_timeout_s=120))
    with TestClient(app) as client:
        response = client.post("/invocations", json={"dataframe_records": [{"prompt": PROMPT, "image": _png(start)}]})
        assert response.status_code == 400 and "needs a V5.1 InP checkpoint" in response.json()["message"]


# ----------------------------------------------------------------------------------------- CLI
def test_cli_generate_with_registered_v51_models(registry, tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from easyanimate.cli import app
    from easyanimate.data.video_io import probe

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    start, _, _ = _images()
    Image.fromarray(start).save(tmp_path / "start.png")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"registry:\n  tracking_uri: {registry['uri']}\n"
        f"model:\n  family: easyanimate-v5.1\n"
        f"v51:\n  dtype: float32\n  num_frames: {FRAMES}\n  model_dir: {registry['t2v']}\n"
        f"generate:\n  height: {SIZE}\n  width: {SIZE}\n  num_inference_steps: {STEPS}\n"
    )
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, ["generate", PROMPT, *args, "--params", str(params)])

    # A registered InP model, found as V5.1 from its own folder; image-to-video.
    result = cli("-o", "i2v.mp4", "--model", "models:/v51-inp@champion", "--image", "start.png")
    assert result.exit_code == 0, result.output
    info = probe(tmp_path / "i2v.mp4")
    assert (info.num_frames, info.width, info.height) == (FRAMES, SIZE, SIZE)
    # model.family easyanimate-v5.1 makes v5.1 the default family (v51.model_dir), with a registered adapter.
    result = cli("-o", "lora.mp4", "--lora", "models:/v51-lora@champion")
    assert result.exit_code == 0, result.output
    styled = decode_frames(tmp_path / "lora.mp4")
    assert styled.shape == (FRAMES, SIZE, SIZE, 3)
    result = cli("-o", "base.mp4", "--model", "models:/v51-t2v/1")
    assert result.exit_code == 0, result.output
    assert _diff(styled, decode_frames(tmp_path / "base.mp4")) > 0.5, "the registered adapter is applied"
    # Errors: one line, rc 2.
    result = cli("-o", "x.mp4", "--model", "models:/v51-t2v/1", "--image", "start.png")
    assert result.exit_code == 2 and "needs a V5.1 InP checkpoint" in result.output, result.output
    result = cli("-o", "x.mp4", "--model", "models:/v51-inp@champion", "--family", "native")
    assert result.exit_code == 2 and "holds a v5.1 model, not --family native" in result.output, result.output
    result = cli("-o", "x.mp4", "--frames", "6")
    assert result.exit_code == 2 and "1 + 4k" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()
