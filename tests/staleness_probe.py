"""Run inside a throwaway copy of the project: edit each stage's code and each of its params in turn and
report which stages become stale for Prefect (cache key) and for DVC (``dvc status``). JSON on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

from easyanimate.config import PRESETS_DIR, ConfigError, load_settings
from easyanimate.stages import dvc_yaml, has_key, stage_files, stage_inputs_hash, stages_for

ROOT = Path.cwd()
# dvc.yaml holds the DAG of the project's model.family; switching the family itself rewrites dvc.yaml (the guard
# stage fails until it is regenerated), so model.family is not one of the edits below.
STAGES = stages_for(load_settings(ROOT / "params.yaml").model.family)
STAGE_NAMES = tuple(s.name for s in STAGES)
FAMILY_SWITCH = "model.family"


def keys() -> dict[str, str]:
    settings = load_settings(ROOT / "params.yaml")
    return {name: stage_inputs_hash(name, settings) for name in STAGE_NAMES}


def dvc_stale(repo: Repo) -> set[str]:
    return {name.split(":")[-1] for name in repo.status()}


def stale_after(edit, repo: Repo, base: dict[str, str]) -> dict[str, list[str]]:
    undo = edit()
    try:
        now = keys()
        return {
            "prefect": sorted(n for n in STAGE_NAMES if now[n] != base[n]),
            "dvc": sorted(dvc_stale(repo)),
            "dvc_yaml_stale": dvc_yaml(ROOT / "params.yaml", ROOT) != (ROOT / "dvc.yaml").read_text(),
        }
    finally:
        undo()


def touch(file: Path):
    def edit():
        original = file.read_text()
        file.write_text(original + "\n# touched\n")
        return lambda: file.write_text(original)

    return edit


def _get(node, path):
    for part in path:
        node = node[part]
    return node


def _perturbations(value):
    if value is None:
        yield "changed"
    elif isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 4, value + 1, max(1, value - 1))
    elif isinstance(value, float):
        yield from (round(value * 1.5 + 0.01, 6), round(value / 2, 6))
    elif isinstance(value, str):  # free text, or another choice of a Literal setting
        yield from (c for c in (value + "-changed", "bf16", "fp16", "no", "linear", "scaled_linear") if c != value)
    elif isinstance(value, list) and value:
        yield value[:-1] if len(value) > 1 else value + value


def param_edit(param: str):
    """Change one leaf of ``param`` to another valid value, in the file DVC reads it from."""
    settings = load_settings(ROOT / "params.yaml")
    effective = settings.model_dump(mode="json")
    overrides = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    preset_file = PRESETS_DIR / f"{settings.preset}.yaml"
    node = _get(effective, param.split("."))
    leaves = (
        [(param.split("."), node)]
        if not isinstance(node, dict)
        else [(param.split(".") + [k], v) for k, v in node.items() if not isinstance(v, dict)]
    )
    for path, value in leaves:
        for new in _perturbations(value):
            patch: dict = {}
            cursor = patch
            for part in path[:-1]:
                cursor = cursor.setdefault(part, {})
            cursor[path[-1]] = new
            from easyanimate.config import _deep_merge

            try:
                load_settings(ROOT / "params.yaml", overrides=patch)
            except ConfigError:
                continue
            # DVC reads params.yaml where it holds the key's section, else the preset file; a key in neither
            # is a code default: DVC sees it only once a file sets it and dvc.yaml is regenerated.
            in_params = any(has_key(overrides, ".".join(path[:i])) for i in range(1, len(path) + 1))
            preset_values = yaml.safe_load(preset_file.read_text()) or {}
            in_preset = any(has_key(preset_values, ".".join(path[:i])) for i in range(1, len(path) + 1))
            target = preset_file if in_preset and not in_params else ROOT / "params.yaml"

            def edit(target=target, patch=patch):
                original = target.read_text()
                target.write_text(yaml.safe_dump(_deep_merge(yaml.safe_load(original) or {}, patch)))
                return lambda: target.write_text(original)

            return ".".join(path), str(target.relative_to(ROOT)), edit
    raise AssertionError(f"no valid change found for {param}")


def main() -> None:
    repo = Repo(str(ROOT))
    base = keys()
    assert not dvc_stale(repo), f"freshly committed project is stale: {dvc_stale(repo)}"
    report: dict = {"modules": {}, "params": {}, "files": {}}
    for spec in STAGES:
        entry = ROOT / (spec.module.replace(".", "/") + ".py")
        report["modules"][spec.name] = stale_after(touch(entry), repo, base)
        for param in (p for p in spec.params if p != FAMILY_SWITCH):
            leaf, target, edit = param_edit(param)
            report["params"][f"{spec.name}:{param}"] = {"leaf": leaf, "file": target, **stale_after(edit, repo, base)}
    for extra in sys.argv[1:]:
        report["files"][extra] = stale_after(touch(ROOT / extra), repo, base)
    report["stage_files"] = {s.name: [str(f.relative_to(ROOT)) for f in stage_files(s.name)] for s in STAGES}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
