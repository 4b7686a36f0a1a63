"""``easyanimate studio`` as a user drives it: a tiny pipeline and its LoRA registered in a throwaway sqlite
registry, a small curated manifest, the page served on a free loopback port and driven in headless Debian
chromium by Selenium (generate, LoRA strength, bad inputs, the Data and Models tabs); plus the service checks
that need no browser.

Screenshots of every tab are written to a temporary folder (printed; pytest -s shows it)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from easyanimate.config import load_settings
from easyanimate.data.manifest import to_frame, write_manifest
from easyanimate.data.video_io import decode_frames, write_video
from tests.conftest import tiny_pipeline

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NAME, LORA_NAME = "studio-tiny", "studio-tiny-lora"
WAIT_S = 60  # page and generations on a busy 2-core machine
BUDGET = 1_000_000  # frames x height x width x steps one request may ask for (the default 32x32x8x2 is 16,384)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------ the world
def _moving(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)])


def curated_data(root: Path) -> tuple[Path, Path]:
    """Two source videos, three accepted clips (cut) and two rejected ones, a manifest and a gate report."""
    raw, curated = root / "raw", root / "curated"
    write_video(_moving(24, 64, 48, 0), raw / "a.mp4", fps=8)
    write_video(_moving(24, 64, 48, 1), raw / "b.mp4", fps=8)
    rows = []
    spans = [("a.mp4", 0.0, 1.0, "accepted", None, 5.5, 0.02), ("a.mp4", 1.0, 2.0, "accepted", None, 6.0, 0.03)]
    spans += [("b.mp4", 0.0, 1.0, "accepted", None, 4.5, 0.05), ("b.mp4", 1.0, 2.0, "rejected", "too_static", 4.2, 0.0)]
    spans += [("a.mp4", 2.0, 3.0, "rejected", "low_aesthetic", 1.5, None)]
    for i, (source, start, end, status, reason, aesthetic, motion) in enumerate(spans):
        clip_id = f"clip{i:02d}" + "0" * 14
        clip_path = None
        if status == "accepted":
            clip_path = f"clips/{clip_id}.mp4"
            write_video(_moving(8, 64, 48, 10 + i), curated / clip_path, fps=8)
        rows.append(
            {
                "clip_id": clip_id,
                "source": source,
                "scene_id": f"{source}-{i}",
                "start_s": start,
                "end_s": end,
                "duration_s": end - start,
                "width": 64,
                "height": 48,
                "fps": 8.0,
                "aesthetic_score": aesthetic,
                "motion_score": motion,
                "caption": f"clip {i}",
                "status": status,
                "reject_reason": reason,
                "clip_path": clip_path,
                "split": ("val" if i == 2 else "train") if status == "accepted" else None,
            }
        )
    write_manifest(
        to_frame(rows, {"aesthetic_score": "float64", "motion_score": "float64"}), curated / "manifest.parquet"
    )
    report = root / "reports" / "curate" / "gate_report" / "index.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><body><h1>Data gate: 3 of 3 accepted clips pass</h1></body></html>")
    return raw, curated


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Settings pointing at a tiny registry: v1 @champion (with a LoRA), v2 @challenger (no LoRA)."""
    import imageio.v3 as iio
    import mlflow
    from mlflow.tracking import MlflowClient

    from easyanimate.evaluation.evaluate import evaluation_protocol_hash
    from easyanimate.lineage import dvc_hash
    from easyanimate.registry import register_lora_adapter
    from easyanimate.serving.pyfunc import EasyAnimatePyfunc

    root = tmp_path_factory.mktemp("studio")
    tiny_pipeline(root / "pipeline", root / "lora")
    raw, curated = curated_data(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = load_settings(
        overrides={
            "paths": {
                "raw_videos": str(raw),
                "curated": str(curated),
                "reports": str(root / "reports"),
                "pipeline": str(root / "pipeline"),
                "lora": str(root / "lora"),
                "cache": str(root / "cache"),
            },
            "registry": {"tracking_uri": uri, "model_name": NAME, "experiment": "studio"},
            "lora": {"registered_model": LORA_NAME, "default_scale": 1.0},
            "generate": {
                "height": 32,
                "width": 32,
                "num_frames": 8,
                "num_inference_steps": 2,
                "max_side": 256,
                "max_frames": 64,
                "max_inference_steps": 50,
            },
            "dit": {"stage3": {"resolution": 32, "buckets": {"aspect_ratios": ["1:1", "16:9"]}}},
            "studio": {"max_request_work": BUDGET, "max_results": 3},
        }
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("studio", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        iio.imwrite(root / "sample_0.gif", _moving(8, 32, 32, 5), extension=".gif", duration=125, loop=0)
        with mlflow.start_run(run_name="evaluate", tags={"stage": "evaluate"}) as evaluate:
            mlflow.log_artifact(str(root / "sample_0.gif"), "evaluate")
        data_hash, protocol = dvc_hash(curated), evaluation_protocol_hash(settings)
        lineage = {
            "git_commit": "0123456789abcdef",
            "curated_data_dvc_hash": data_hash,
            "params_hash": settings.section_hash(),
            "checkpoint.dit_stage3.path": "models/dit/stage3",
            "checkpoint.dit_stage3.dvc_hash": "feedc0de.dir",
            "run.evaluate": evaluate.info.run_id,
            "evaluate_run_id": evaluate.info.run_id,
            "data_gate_passed": "True",
            "eval_passed": "True",
            "eval_data_dvc_hash": data_hash,
            "eval_protocol_hash": protocol,
            "eval_latent_space": "tiny-vae",
        }
        metrics = [
            {"eval.val_loss": 0.5, "eval.vae_psnr": 20.0, "eval.vae_ssim": 0.6, "eval.flicker": 0.1},
            {"eval.val_loss": 0.52, "eval.vae_psnr": 18.0, "eval.vae_ssim": 0.5, "eval.flicker": 0.1},
        ]
        client = MlflowClient()
        with mlflow.start_run(run_name="register", tags={"stage": "register"}):
            mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
            info = mlflow.pyfunc.log_model(
                name="pipeline",
                python_model=EasyAnimatePyfunc(generate=settings.generate),
                artifacts={"pipeline": str(root / "pipeline")},
                registered_model_name=NAME,
                pip_requirements=["easyanimate"],
            )
            mlflow.log_metrics(metrics[0], model_id=info.model_id)
        with mlflow.start_run(run_name="register", tags={"stage": "register"}) as second:
            mlflow.log_dict(settings.model_dump(mode="json"), "config/settings.json")
            mlflow.log_metrics(metrics[1])
        client.create_model_version(NAME, source=info.model_uri, run_id=second.info.run_id)  # same weights
        decisions = {"1": ("promoted", "first version whose gates pass"), "2": ("rejected", "eval/vae_psnr fell")}
        for version, (decision, reason) in decisions.items():
            tags = {**lineage, "promotion.decision": decision, "promotion.reason": reason}
            for key, value in tags.items():
                client.set_model_version_tag(NAME, version, key, value)
        client.set_registered_model_alias(NAME, "champion", "1")
        client.set_registered_model_alias(NAME, "challenger", "2")
        lora = register_lora_adapter(settings, NAME, "1")
        yield {"root": root, "settings": settings, "uri": uri, "lora": lora["uri"], "data_hash": data_hash}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def service(world):
    from easyanimate.studio.service import Studio

    return Studio(world["settings"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(world, service):
    from easyanimate.studio.app import launch

    demo, url = launch(world["settings"], host="127.0.0.1", port=_free_port(), block=False, studio=service)
    try:
        yield url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio-screenshots")
    print(f"\nstudio screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(server):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium + chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(server + "/")
        _wait(driver, lambda d: _find(d, "#prompt textarea"))
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------ page helpers
def _wait(driver, condition, timeout: float = WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Gradio re-renders components on updates: an element found a moment ago may be gone; look again.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition)


def _find(driver, css: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def _type(driver, css: str, text: str, commit: bool = True) -> None:
    """Replace a field's text; ``commit`` leaves it with Tab (a dropdown then keeps the typed value as is,
    where Enter would pick the first option that contains it)."""
    from selenium.webdriver.common.keys import Keys

    field = _wait(driver, lambda d: _find(d, css))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)
    if commit:
        field.send_keys(Keys.TAB)
    time.sleep(0.3)


def _choose(driver, elem_id: str, label: str) -> None:
    """Pick the dropdown option whose text contains ``label``."""
    from selenium.webdriver.common.by import By

    _find(driver, f"#{elem_id} input").click()
    option = _wait(
        driver, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} li") if label in o.text), None)
    )
    option.click()
    time.sleep(0.3)


def _tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{name}')]").click()
    time.sleep(0.3)


def _message(driver, elem_id: str) -> str:
    el = _find(driver, f"#{elem_id} .validation-error")
    return el.text if el is not None else ""


def _code_text(driver, elem_id: str) -> str:
    """The text of a gr.Code component (CodeMirror renders it line by line)."""
    return driver.execute_script(f"return document.querySelector('#{elem_id} .cm-content')?.innerText || ''")


def _video_src(driver, elem_id: str) -> str | None:
    video = _find(driver, f"#{elem_id} video")
    return video.get_attribute("src") if video is not None else None


def _generate(driver, previous: str | None) -> tuple[str, float]:
    """Click Generate; wait until the result video changes; return its URL and the seconds it took."""
    started = time.perf_counter()
    _find(driver, "#generate").click()
    src = _wait(driver, lambda d: (s := _video_src(d, "result")) and s != previous and s)
    return src, time.perf_counter() - started


def _screenshot(driver, path: Path) -> None:
    """The whole page (the window is stretched to its height for the shot)."""
    size = driver.get_window_size()
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(full, size["height"]), 4000))
    time.sleep(0.3)
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])


def _frames(url: str, path: Path) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        path.write_bytes(response.read())
    return decode_frames(path)


# ------------------------------------------------------------------------------------------ the page
def test_generate_tab_opens_on_the_champion_and_plays_the_video(browser, world, shots, tmp_path):
    assert _find(browser, "#model input").get_attribute("value") == "v1 @champion"
    assert _find(browser, "#size input").get_attribute("value") == "32x32"
    assert not _find(browser, "#start_image")  # no model here takes images: the inputs are not rendered
    _type(browser, "#prompt textarea", "a rabbit in a meadow", commit=False)
    _type(browser, "#seed input", "7")
    src, seconds = _generate(browser, None)
    print(f"\nclick to video (tiny model, first request incl. loading the pipeline): {seconds:.2f} s")
    video = _frames(src, tmp_path / "first.mp4")
    assert video.shape == (8, 32, 32, 3)
    params = json.loads(_wait(browser, lambda d: "command" in (text := _code_text(d, "params")) and text))
    assert params["seed"] == 7 and params["model"] == f"models:/{NAME}/1" and params["num_frames"] == 8
    assert "easyanimate generate 'a rabbit in a meadow'" in params["command"] and "--seed 7" in params["command"]
    assert _find(browser, "#download a").get_attribute("href").endswith(".mp4")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#history .thumbnail-item")) == 1)
    _screenshot(browser, shots / "generate.png")
    import psutil  # the server runs in this process: its RSS is the studio's, with one pipeline loaded

    print(f"studio RSS with one tiny pipeline loaded: {psutil.Process().memory_info().rss / 2**20:.0f} MiB")
    world["base_video"] = video


def test_lora_strength_changes_the_video(browser, world, tmp_path):
    _choose(browser, "lora", "v1 @champion")
    _type(browser, "#lora_scale input[type=number]", "1")
    on, seconds = _generate(browser, _video_src(browser, "result"))
    print(f"\nclick to video with the LoRA (pipeline reused): {seconds:.2f} s")
    _type(browser, "#lora_scale input[type=number]", "0")
    off, _ = _generate(browser, on)
    styled, plain = _frames(on, tmp_path / "on.mp4"), _frames(off, tmp_path / "off.mp4")
    assert styled.shape == plain.shape == (8, 32, 32, 3)
    assert np.abs(styled.astype(int) - plain).mean() > 1  # strength 1 changes the frames ...
    np.testing.assert_array_equal(plain, world["base_video"])  # ... strength 0 is the base model exactly


@pytest.mark.parametrize(
    "field, setup, message",
    [
        ("prompt", [("#prompt textarea", "")], "Enter a prompt"),
        ("size", [("#size input", "40x40")], "multiples of 16"),
        ("frames", [("#frames input", "5")], "multiple of 4"),
        ("size", [("#size input", "48x32"), ("#frames input", "64"), ("#steps input", "20")], "budget"),
        ("lora", [("choose:model", "v2 @challenger"), ("#lora input", "LORA")], "was trained on"),
    ],
)
def test_bad_input_shows_its_message_next_to_the_control(browser, world, field, setup, message):
    browser.refresh()
    _wait(browser, lambda d: _find(d, "#prompt textarea"))
    _type(browser, "#prompt textarea", "a cat", commit=False)
    for css, value in setup:
        if css.startswith("choose:"):
            _choose(browser, css.split(":", 1)[1], value)
        else:
            _type(browser, css, world["lora"] if value == "LORA" else value)
    before = _video_src(browser, "result")
    _find(browser, "#generate").click()
    text = _wait(browser, lambda d: _message(d, field))
    assert message in text
    assert _video_src(browser, "result") == before  # nothing was generated
    with urllib.request.urlopen(browser.current_url, timeout=10) as response:  # the server keeps serving
        assert response.status == 200


def test_data_tab_shows_the_manifest(browser, shots):
    browser.refresh()
    _wait(browser, lambda d: _find(d, "#prompt textarea"))
    _tab(browser, "Data")
    counts = _wait(browser, lambda d: (el := _find(d, "#data_counts")) and "clips" in el.text and el.text)
    assert "5 clips" in counts and "accepted 3" in counts and "rejected 2" in counts
    assert "too_static" in _find(browser, "#reasons").text and "low_aesthetic" in _find(browser, "#reasons").text
    report = _find(browser, "#gate_report a").get_attribute("href")
    with urllib.request.urlopen(report, timeout=10) as response:  # served by the studio, inline
        assert b"Data gate" in response.read()
    thumbs = _wait(
        browser,
        lambda d: (
            len(d.find_elements("css selector", "#thumbs .thumbnail-item")) == 5
            and d.find_elements("css selector", "#thumbs .thumbnail-item")
        ),
    )
    thumbs[0].click()
    _wait(browser, lambda d: _video_src(d, "clip_video"))
    _choose(browser, "f_status", "rejected")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#thumbs .thumbnail-item")) == 2)
    _screenshot(browser, shots / "data.png")


def test_models_tab_shows_the_champions_lineage(browser, world, shots):
    _tab(browser, "Models")
    lineage = _wait(browser, lambda d: (el := _find(d, "#lineage")) and "curated_data_dvc_hash" in el.text and el.text)
    assert f"models:/{NAME}/1" in lineage and "@champion" in lineage
    assert world["data_hash"] in lineage and "0123456789abcdef" in lineage
    metrics = _find(browser, "#metrics").text
    assert "eval/vae_psnr" in metrics and "v1 @champion" in metrics and "v2 @challenger" in metrics
    _wait(browser, lambda d: d.find_elements("css selector", "#samples .thumbnail-item"))
    _choose(browser, "version_pick", "v2")
    _find(browser, "#dry_run").click()
    result = _wait(browser, lambda d: (el := _find(d, "#dry_run_result")) and "dry run" in el.text and el.text)
    assert "v2 rejected" in result
    _screenshot(browser, shots / "models.png")


# ------------------------------------------------------------------------------------------ the service
def test_service_reuses_the_loaded_pipeline_and_reports_every_step(service, world):
    from easyanimate.studio.service import InvalidRequest

    form = {"prompt": "a cat", "negative_prompt": "", "model": f"models:/{NAME}@champion", "lora": "", "lora_scale": 1}
    form.update(scheduler="ddim", steps=3, guidance_scale=4, size="32x32", num_frames="8", seed=1)
    request = service.check_request(form)
    assert request.model == f"models:/{NAME}/1"
    loads = service.pipeline_loads
    steps = []
    result = service.generate(request, lambda done, total, what: steps.append((done, total, what)))
    assert [s for s in steps if s[2] == "denoising"] == [(1, 3, "denoising"), (2, 3, "denoising"), (3, 3, "denoising")]
    assert decode_frames(result.video).shape == (8, 32, 32, 3)
    assert service.pipeline_loads - loads <= 1 and service.loaded_model == f"models:/{NAME}/1"
    service.generate(request)
    assert service.pipeline_loads - loads <= 1  # same model: reused
    service.generate(service.check_request({**form, "model": f"models:/{NAME}/2"}))
    assert service.loaded_model == f"models:/{NAME}/2"  # another model replaces it
    with pytest.raises(InvalidRequest) as bad:
        service.check_request({**form, "prompt": " ", "num_frames": "9", "seed": "-1", "lora_scale": 3})
    assert set(bad.value.errors) == {"prompt", "num_frames", "seed", "lora_scale"}


def test_service_lists_loras_by_base_and_rejects_unreadable_images(service, world, tmp_path):
    from easyanimate.studio.service import check_image

    assert [c.ref for c in service.loras(f"models:/{NAME}/1")] == [world["lora"]]
    assert service.loras(f"models:/{NAME}/2") == []
    info = service.model_info(f"models:/{NAME}/1")
    assert info.sizes[0] == (32, 32) and (48, 32) in info.sizes and not info.image_to_video
    assert info.frame_counts[:3] == (1, 8, 12) and info.frame_counts[-1] == 64
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read broken.png"):
        check_image(broken)
