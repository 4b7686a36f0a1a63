"""The v5.1 preset (easyanimate/presets/v5.1.yaml): every key validates, GPU-scale values, and the one path a user
must fill (v51.model_dir) is a clear error naming that setting. No model is loaded."""

from __future__ import annotations

import pytest
import yaml

from easyanimate.config import PRESETS_DIR, available_presets, load_settings, parse_aspect_ratio
from easyanimate.families.v51 import V51Error, check_v51_folder, parse_memory_mode


@pytest.fixture(scope="module")
def settings():
    return load_settings(preset="v5.1")


def test_preset_loads_with_the_v51_family(settings, tmp_path):
    assert "v5.1" in available_presets()
    assert settings.preset == "v5.1" and settings.model.family == "easyanimate-v5.1"
    # ...and the same through params.yaml, where a project names it and fills in the release folder.
    params = tmp_path / "params.yaml"
    release = tmp_path / "models" / "released" / "EasyAnimateV5.1-12b-zh-InP-diffusers"
    params.write_text(yaml.safe_dump({"preset": "v5.1", "v51": {"model_dir": str(release)}}))
    own = load_settings(params)
    assert own.model.family == "easyanimate-v5.1" and own.v51.model_dir == release
    assert own.v51.lora_rank == settings.v51.lora_rank  # the rest still comes from the preset


def test_every_preset_key_is_a_setting(settings):
    """Settings forbid unknown keys, so loading proves the keys exist; this checks the file's values arrived."""
    raw = yaml.safe_load((PRESETS_DIR / "v5.1.yaml").read_text())
    dumped = settings.model_dump(mode="json")

    def walk(node, got, path):
        for key, value in node.items():
            assert key in got, f"{path}{key}"
            if isinstance(value, dict):
                walk(value, got[key], f"{path}{key}.")
            elif isinstance(value, list):
                assert list(got[key]) == value, f"{path}{key}"
            else:
                assert got[key] == value, f"{path}{key}"

    walk(raw, dumped, "")


def test_gpu_scale_values(settings):
    v, g = settings.v51, settings.generate
    assert v.model_dir is None and v.dtype == "bfloat16"
    assert (v.train_height, v.train_width, v.train_num_frames, v.num_frames) == (512, 512, 49, 49)
    assert (v.lora_rank, v.lora_alpha) == (128, 64)  # EasyAnimate's train_lora.py defaults
    assert v.finetune == "lora" and v.gradient_checkpointing and v.checkpoint_every == 100
    assert parse_memory_mode(v.memory_mode) == ["fp8_layerwise", "model_cpu_offload"]
    assert len(v.bucket_aspect_ratios) > 1 and "512:512" in v.bucket_aspect_ratios
    ratios = sorted(parse_aspect_ratio(r) for r in v.bucket_aspect_ratios)
    assert ratios[0] < 0.5 < 2.0 < ratios[-1]  # portrait to landscape, as EasyAnimate's 512 buckets
    assert (g.height, g.width, g.num_inference_steps, g.guidance_scale) == (512, 512, 50, 6.0)
    assert g.max_frames >= v.num_frames
    assert g.request_budget >= v.num_frames * g.height * g.width * g.num_inference_steps
    assert settings.curate.probe.min_width == settings.curate.probe.min_height == 512


def test_missing_model_dir_is_a_clear_error_naming_the_setting(settings, tmp_path):
    with pytest.raises(V51Error, match=r"v51\.model_dir is not set"):
        check_v51_folder(settings.v51.model_dir)
    with pytest.raises(V51Error, match=r"v51\.model_dir=.*not a folder"):
        check_v51_folder(tmp_path / "models" / "released" / "EasyAnimateV5.1-12b-zh-InP-diffusers")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(V51Error, match=r"v51\.model_dir=.*missing model_index\.json"):
        check_v51_folder(empty)
