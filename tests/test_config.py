from pathlib import Path

import pytest
import yaml

from easyanimate.config import ConfigError, Settings, available_presets, load_settings, resolve_weight_path
from tests.conftest import REPO


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_on_tiny_preset():
    settings = load_settings(REPO / "params.yaml")
    assert settings.preset == "tiny"
    assert settings.vae.model.block_out_channels == (16, 32, 64, 64)
    assert settings.dit.stage1.num_frames == 1


def test_presets_exist_and_validate():
    assert {"tiny", "paper"} <= set(available_presets())
    paper = load_settings(REPO / "params.yaml", preset="paper")
    assert paper.preset == "paper"
    # EasyAnimate v2: resolution progression 256 -> 512 -> 768 at up to 144 frames.
    assert [paper.dit.stage1.resolution, paper.dit.stage2.resolution, paper.dit.stage3.resolution] == [256, 512, 768]
    assert paper.dit.stage3.num_frames == 144
    assert paper.curate.aesthetic.scorer == "laion" and paper.curate.caption.captioner == "vlm"
    assert paper.lora.rank == 128 and paper.lora.alpha == 64


def test_overrides_merge_onto_preset(tmp_path):
    settings = load_settings(write(tmp_path, {"preset": "tiny", "dit": {"stage1": {"steps": 7}}}))
    assert settings.dit.stage1.steps == 7
    assert settings.dit.stage1.batch_size == load_settings(write(tmp_path, {})).dit.stage1.batch_size


@pytest.mark.parametrize(
    "data, key",
    [
        ({"dit": {"stage1": {"stepz": 3}}}, "dit.stage1.stepz: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"vae": {"stage1": {"steps": 0}}}, "vae.stage1.steps"),
        ({"curate": {"aesthetic": {"scorer": "magic"}}}, "curate.aesthetic.scorer"),
        ({"dit": {"model": {"hidden_size": 65, "num_heads": 4}}}, "dit.model"),
        ({"curate": {"scenes": {"min_duration_s": 5, "max_duration_s": 2}}}, "curate.scenes"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, data))
    assert key in str(err.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_settings(write(tmp_path, {"preset": "huge"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)


def test_weight_paths_resolve_or_name_the_setting(tmp_path):
    settings = load_settings(REPO / "params.yaml")
    assert (resolve_weight_path(settings.weights.text_encoder, "weights.text_encoder") / "config.json").exists()
    assert (resolve_weight_path(settings.weights.ocr, "weights.ocr") / "craft_mlt_25k.pth").exists()
    with pytest.raises(FileNotFoundError, match="weights.aesthetic_clip"):
        resolve_weight_path(str(tmp_path / "nope"), "weights.aesthetic_clip")
    with pytest.raises(FileNotFoundError, match="weights.captioner"):
        resolve_weight_path(None, "weights.captioner")
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_weight_path("package:no_such_pkg_xyz", "weights.text_encoder")
    paper = load_settings(REPO / "params.yaml", preset="paper")
    with pytest.raises(FileNotFoundError, match="weights.text_encoder"):
        resolve_weight_path(paper.weights.text_encoder, "weights.text_encoder")


def test_section_hash_tracks_only_its_section(tmp_path):
    a = load_settings(write(tmp_path, {"dit": {"stage1": {"steps": 5}}}))
    b = load_settings(write(tmp_path, {"dit": {"stage1": {"steps": 6}}}))
    assert a.section_hash("vae") == b.section_hash("vae")
    assert a.section_hash("dit") != b.section_hash("dit")
    assert isinstance(a, Settings)
