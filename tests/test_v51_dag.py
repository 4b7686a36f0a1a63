"""The EasyAnimate V5.1 family through the whole DAG, as a user runs it: `easyanimate pipeline` with
``model.family: easyanimate-v5.1`` and a released-layout folder (tiny random components, built here: nothing from a
hub) curates the bundled footage, caches MagViT latents, LoRA-fine-tunes the transformer, evaluates, registers and
promotes; the registered model then serves image-to-video through the pyfunc and `easyanimate generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from easyanimate.lineage import CHECKPOINT_TAG
from tests.conftest import REPO
from tests.test_e2e import BIN, make_project, mlflow_client, run

pytestmark = pytest.mark.slow

V51_PARAMS = {
    "model": {"family": "easyanimate-v5.1"},
    "v51": {
        "dtype": "float32",
        "num_frames": 5,
        "train_height": 32,
        "train_width": 32,
        "train_num_frames": 5,
        "bucket_aspect_ratios": ["1:1", "16:9"],
        "sample_fps": 4.0,
        "lora_rank": 4,
        "lora_alpha": 4,
        "train_steps": 4,
        "checkpoint_every": 2,
        "learning_rate": 0.01,
        "eval_num_samples": 1,
        "max_sequence_length": 32,
        "vae_decoder_steps": 3,
        "vae_num_frames": 5,
        "vae_crop": 32,
        "vae_learning_rate": 0.001,
    },
    "generate": {"height": 32, "width": 32, "num_inference_steps": 2, "fps": 4},
    # The plumbing, not the quality of a random tiny release: loose gates.
    "evaluate": {"min_vae_psnr": 0.0, "max_val_loss": 100.0, "max_flicker": 1.0, "min_caption_retrieval": 0.0},
}


@pytest.fixture(scope="module")
def v51_project(tmp_path_factory):
    from tests.v51_tiny import save_tiny_v51

    root = tmp_path_factory.mktemp("v51dag")
    release = save_tiny_v51(root / "released" / "EasyAnimateV5.1-tiny-InP-diffusers", inpaint=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.pop("evaluate", None)
    for key, value in V51_PARAMS.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    params["v51"]["model_dir"] = str(release)
    project = make_project(root / "project", params, ["bigbuckbunny.mp4", "trailer_bbb.mp4"])
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    assert proc.returncode == 0, "easyanimate pipeline (V5.1 family) failed"
    return project, proc, release


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_v51_pipeline_runs_only_its_own_stages(v51_project):
    project, proc, release = v51_project
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [
        "dvc_yaml_check",
        "curate",
        "v51_vae",
        "v51_latents",
        "v51_finetune",
        "v51_evaluate",
        "v51_register",
    ]
    assert not (project / "models" / "vae").exists() and not (project / "models" / "dit").exists()

    index = _json(project / "data" / "v51_latents" / "index.json")
    assert index["inpaint"] is True and index["splits"]["train"] and index["splits"]["val"]
    from easyanimate.config import load_settings
    from easyanimate.families.v51_latents import buckets_for

    buckets = buckets_for(load_settings(project / "params.yaml")).sizes
    assert buckets == ((32, 32), (32, 48))  # 1:1 and 16:9 at ~32x32 pixels, 16-aligned
    assert {tuple(s[1:]) for s in index["shapes"].values()} <= set(buckets)
    assert all(s[0] in (1, 5) for s in index["shapes"].values())  # 1 + 4k frames

    finetune = project / "models" / "v51" / "finetune"
    summary = _json(finetune / "train_summary.json")
    assert summary["mode"] == "lora" and summary["steps"] == 4 and all(np.isfinite(summary["losses"]))
    assert (finetune / "pytorch_lora_weights.safetensors").is_file()
    assert (project / "models" / "v51" / "pipeline" / "model_index.json").is_file()

    # The decoder fine-tune: only decoder weights moved, and the assembled pipeline ships that VAE.
    from safetensors.torch import load_file

    vae_summary = _json(project / "models" / "v51" / "vae" / "train_summary.json")
    assert vae_summary["fine_tuned"] and vae_summary["steps"] == 3 and all(np.isfinite(vae_summary["losses"]))
    tuned = load_file(next((project / "models" / "v51" / "pipeline" / "vae").glob("*.safetensors")))
    base = load_file(next((release / "vae").glob("*.safetensors")))
    changed = {k for k in base if not torch.equal(tuned[k].float(), base[k].float())}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]

    metrics = _json(project / "reports" / "v51_evaluate" / "metrics.json")
    for key in ("eval/vae_psnr", "eval/val_loss", "eval/val_loss_base", "eval/flicker", "eval/val_loss_sigma0.5"):
        assert np.isfinite(metrics[key]), key
    assert metrics["eval/val_loss"] != metrics["eval/val_loss_base"], "the adapter changes the held-out loss"
    context = _json(project / "reports" / "v51_evaluate" / "eval_context.json")
    assert context["family"] == "easyanimate-v5.1" and context["latent_space"].startswith("magvit-")
    assert (project / "reports" / "v51_evaluate" / "samples" / "sample_0.mp4").is_file()


def test_v51_registry_versions_carry_the_family_lineage(v51_project):
    project, _, release = v51_project
    client = mlflow_client(project)
    registered = _json(project / "reports" / "v51_register" / "registered.json")
    version = client.get_model_version("easyanimate", registered["version"])
    tags = version.tags
    assert tags["model.family"] == "easyanimate-v5.1"
    assert tags["v51.base_model_dir"] == str(release.resolve()) and tags["v51.inpaint"] == "True"
    assert len(tags["v51.base_config_hash"]) == 16
    assert tags["eval_latent_space"].startswith("magvit-") and tags["easyanimate.registered"] == "true"
    # The fine-tune's folder, hash and parent (the release it started from), as the native stages are tagged.
    assert tags[CHECKPOINT_TAG.format(stage="v51_finetune", field="parent")] == str(release)
    assert tags[CHECKPOINT_TAG.format(stage="v51_finetune", field="dvc_hash")]
    assert "champion" in version.aliases  # the first version of the model: nothing to beat
    lora = registered["lora_model"]
    lora_version = client.get_model_version("easyanimate-lora", lora["version"])
    assert lora_version.tags["model.family"] == "easyanimate-v5.1"
    assert lora_version.tags["base_model_uri"] == f"models:/easyanimate/{registered['version']}"
    assert lora_version.tags["lora_rank"] == "4"


def test_v51_noop_rerun_trains_and_registers_nothing(v51_project):
    project, _, _ = v51_project
    client = mlflow_client(project)
    before = len(client.search_model_versions("name = 'easyanimate'"))
    mtime = (project / "models" / "v51" / "finetune" / "train_summary.json").stat().st_mtime
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    assert proc.returncode == 0
    assert (project / "models" / "v51" / "finetune" / "train_summary.json").stat().st_mtime == mtime
    assert len(client.search_model_versions("name = 'easyanimate'")) == before
    status = run([str(BIN / "dvc"), "status", "--quiet"], project)
    assert status.returncode == 0, status.stdout


def test_v51_full_finetune_replaces_the_transformer_and_registers_no_adapter(v51_project, tmp_path):
    """``v51.finetune: full`` through the same stage code (in-process, no Prefect): the assembled pipeline holds the
    fine-tuned transformer, and the register stage has no adapter to register."""
    from safetensors.torch import load_file

    from easyanimate.config import load_settings
    from easyanimate.registry import registered_adapter_dir
    from easyanimate.stages import run_stage

    project, _, release = v51_project
    settings = load_settings(
        project / "params.yaml",
        overrides={
            "v51": {"finetune": "full", "train_steps": 2, "full_learning_rate": 0.01},
            "paths": {
                "curated": str(project / "data" / "curated"),
                "v51_latents": str(project / "data" / "v51_latents"),
                "v51_vae": str(project / "models" / "v51" / "vae"),
                "v51_finetune": str(tmp_path / "full"),
                "v51_pipeline": str(tmp_path / "pipeline"),
                "reports": str(tmp_path / "reports"),
                "checkpoints": str(tmp_path / "ckpt"),
            },
        },
    )
    result = run_stage("v51_finetune", settings, show_progress=False)
    assert result.info["mode"] == "full" and (tmp_path / "full" / "transformer" / "config.json").is_file()
    evaluated = run_stage("v51_evaluate", settings, show_progress=False)
    assert np.isfinite(evaluated.metrics["eval/val_loss"]) and "eval/val_loss_base" not in evaluated.metrics
    tuned = load_file(next((tmp_path / "pipeline" / "transformer").glob("*.safetensors")))
    base = load_file(next((release / "transformer").glob("*.safetensors")))
    assert any(not torch.equal(tuned[k], base[k]) for k in base), "the pipeline holds the fine-tuned transformer"
    assert (tmp_path / "pipeline" / "vae").is_dir() and registered_adapter_dir(settings) is None


def test_registered_v51_model_serves_image_to_video(v51_project):
    """The champion the DAG registered serves through the pyfunc (what `mlflow models serve` and `easyanimate
    serve` load) and `easyanimate generate`, image-to-video from a start frame, with its registered LoRA."""
    import base64
    import io

    import mlflow.pyfunc
    from PIL import Image

    from easyanimate.data.video_io import probe

    project, _, _ = v51_project
    mlflow_client(project)  # points MLflow at the project's registry
    start = Image.fromarray(np.full((48, 64, 3), (200, 40, 40), np.uint8))
    buffer = io.BytesIO()
    start.save(buffer, format="PNG")
    model = mlflow.pyfunc.load_model("models:/easyanimate@champion")
    request = {"prompt": "a rabbit on a hill", "image": base64.b64encode(buffer.getvalue()).decode(), "steps": 2}
    [prediction] = model.predict([request]).to_dict("records")
    assert prediction["num_frames"] == 5 and (prediction["height"], prediction["width"]) == (32, 32)
    video = project / "served.mp4"
    video.write_bytes(base64.b64decode(prediction["video_mp4_base64"]))
    assert probe(video).num_frames == 5

    start_png = project / "start.png"
    start.save(start_png)
    out = project / "i2v.mp4"
    args = ["generate", "a rabbit on a hill", "-o", str(out), "--model", "models:/easyanimate@champion"]
    args += ["--lora", "models:/easyanimate-lora@champion", "--image", str(start_png), "--steps", "2"]
    proc = run([str(BIN / "easyanimate"), *args], project)
    assert proc.returncode == 0 and probe(out).num_frames == 5


def test_v51_second_version_is_compared_on_the_same_yardstick(v51_project):
    """A changed fine-tune setting reruns only the fine-tune and what follows (the latent cache is reused), and
    the new version is compared with the champion in the same latent space and protocol."""
    project, _, _ = v51_project
    client = mlflow_client(project)
    latents = (project / "data" / "v51_latents" / "index.json").stat().st_mtime
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["v51"]["train_steps"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "easyanimate"), "pipeline"], project)
    assert proc.returncode == 0
    assert (project / "data" / "v51_latents" / "index.json").stat().st_mtime == latents
    assert _json(project / "models" / "v51" / "finetune" / "train_summary.json")["steps"] == 6
    registered = _json(project / "reports" / "v51_register" / "registered.json")
    tags = client.get_model_version("easyanimate", registered["version"]).tags
    assert registered["version"] != "1" and tags["promotion.champion_version"] == "1"
    assert tags["promotion.latent_space"] == tags["promotion.champion_latent_space"] != ""
    assert "re-evaluate" not in tags["promotion.reason"], tags["promotion.reason"]  # compared, not refused
    rows = {row["metric"]: row for row in json.loads(tags["promotion.comparison"])}
    assert rows["eval/val_loss"]["comparable"] and rows["eval/vae_psnr"]["comparable"]  # the family's own loss


def test_v51_latent_cache_resumes_after_a_kill(v51_project, tmp_path, monkeypatch):
    """A latent-cache run that dies part-way keeps what it encoded: the rerun encodes only the rest, and the result
    equals the uninterrupted run's."""
    from safetensors.torch import load_file

    import easyanimate.families.v51_latents as latents
    from easyanimate.config import load_settings
    from easyanimate.stages import run_stage

    project, _, _ = v51_project
    settings = load_settings(
        project / "params.yaml",
        overrides={
            "paths": {
                "curated": str(project / "data" / "curated"),
                "v51_latents": str(tmp_path / "latents"),
                "reports": str(tmp_path / "reports"),
                "checkpoints": str(tmp_path / "ckpt"),
            }
        },
    )
    encode, calls = latents.encode_sample, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("killed mid-run")
        return encode(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_sample", dies_on_the_third)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        run_stage("v51_latents", settings, show_progress=False)
    assert not (tmp_path / "latents").exists()  # nothing half-written where the fine-tune reads
    monkeypatch.setattr(latents, "encode_sample", encode)
    result = run_stage("v51_latents", settings, show_progress=False)
    assert result.metrics["v51_latents/reused"] == 2.0
    reference = project / "data" / "v51_latents"
    assert _json(tmp_path / "latents" / "index.json")["splits"] == _json(reference / "index.json")["splits"]
    for file in (reference / "train").glob("*.safetensors"):
        resumed, original = load_file(str(tmp_path / "latents" / "train" / file.name)), load_file(str(file))
        assert all(torch.equal(resumed[k], original[k]) for k in original), file.name
    assert not (tmp_path / "ckpt" / "v51_latents").exists()  # the resume cache is emptied once complete
