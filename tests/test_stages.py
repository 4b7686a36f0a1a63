"""The DAG is described once (easyanimate.stages); dvc.yaml and the library must agree with it."""

import subprocess
import sys

import yaml

from easyanimate.config import load_settings
from easyanimate.stages import STAGE_NAMES, STAGES, stage_inputs_hash, stage_version
from tests.conftest import REPO


def test_dvc_yaml_matches_stage_specs():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    settings = load_settings(REPO / "params.yaml")
    assert list(dvc) == list(STAGE_NAMES)
    for spec in STAGES:
        stage = dvc[spec.name]
        assert stage["cmd"] == f"easyanimate run {spec.name}"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        for dep in spec.deps:
            path = str(getattr(settings.paths, dep))
            if dep != "captions":  # the captions file lives inside the raw-video folder dep
                assert path in stage["deps"], f"{spec.name}: dvc.yaml lacks dep {path}"
        for out in spec.outs:
            assert str(getattr(settings.paths, out)) in outs, f"{spec.name}: dvc.yaml lacks out {out}"
        for param in stage["params"]:
            node = yaml.safe_load((REPO / "params.yaml").read_text())
            for part in param.split("."):
                node = node[part]  # every DVC param key must exist in params.yaml


def test_stage_version_follows_settings(tmp_path):
    base = load_settings(REPO / "params.yaml")
    changed = load_settings(REPO / "params.yaml", overrides={"dit": {"stage2": {"steps": 3}}})
    assert stage_version("dit_stage2", base) != stage_version("dit_stage2", changed)
    assert stage_version("vae_stage1", base) == stage_version("vae_stage1", changed)
    assert stage_version("curate", base) == stage_version("curate", changed)


def test_inputs_hash_follows_input_content(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.mp4").write_bytes(b"1")
    settings = load_settings(REPO / "params.yaml", overrides={"paths": {"raw_videos": str(raw),
                                                                       "captions": str(raw / "c.yaml")}})
    first = stage_inputs_hash("curate", settings)
    assert first == stage_inputs_hash("curate", settings)
    (raw / "a.mp4").write_bytes(b"2")
    assert stage_inputs_hash("curate", settings) != first


def test_library_never_imports_prefect():
    code = (
        "import sys, importlib, pkgutil, easyanimate\n"
        "skip = {'easyanimate.cli'}\n"
        "for m in pkgutil.walk_packages(easyanimate.__path__, 'easyanimate.'):\n"
        "    if m.name not in skip: importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
        "assert not bad, bad[:5]\n"
        "train = [m for m in sys.modules if m.startswith('easyanimate.training')]\n"
        "print('ok', len(train))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
