"""What ``easyanimate studio`` does, without the web page: Prefect-free and Gradio-free, so it is unit-testable.

- **Models**: every registered version of ``registry.model_name`` (labelled with its aliases, e.g. ``v3 @champion``)
  and the local ``paths.pipeline`` folder; the LoRA versions of ``lora.registered_model`` whose ``base_model_uri``
  is the chosen version; each model's geometry (its trained aspect buckets, valid frame counts, size multiple).
- **Generation**: request checks that name the bad field (empty prompt, sizes or frame counts the model cannot
  make, a LoRA for another base, an unreadable image, the per-request work budget ``studio.max_request_work`` and
  the ``generate.max_*`` limits); one pipeline kept loaded and reused until another model is asked for.
- **Data**: the curated manifest's counts, reject reasons, score histograms, a filtered clip table, thumbnails.
- **Registry**: versions, metrics side by side, promotion decisions, lineage (``easyanimate lineage``'s facts),
  evaluation sample GIFs, and ``promote --dry-run``.

Families: a registered (or local) model is either this project's own pipeline or an EasyAnimate V5.1 one
(``easyanimate.families.folder_family``); a V5.1 model loads with ``load_v51_pipeline`` (``v51.memory_mode``), takes
1 + 4k frames and sides in multiples of 16, runs its own flow-matching scheduler, and an InP one also a start (and
end) image: ``ModelInfo.image_to_video`` shows the page's image inputs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import shlex
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from easyanimate.config import (
    VAE_TEMPORAL_COMPRESSION,
    Settings,
    frame_count_problem,
    v51_frame_count_problem,
    v51_frame_counts,
    valid_frame_counts,
)
from easyanimate.families import V51, folder_family
from easyanimate.registry import (
    REGISTRY_SCHEME,
    download_model,
    pipeline_folder,
    registered_adapter_dir,
    registered_pipeline_dir,
)
from easyanimate.tracking import tracking_uri

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
LORA_SCALE_MAX = 2.0
GUIDANCE_MAX = 30.0
MAX_THUMBNAILS = 48
THUMBNAIL_SIDE = 160
HISTOGRAM_BINS = 10
SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*$")
V51_SCHEDULER = "flow-match"  # a V5.1 model runs the scheduler it was released with
V51_MAX_FRAMES = 49  # the V5.1 releases' longest video (trained at 49 frames)

# Request fields in the order the page's Generate tab lists its inputs; ``check_request`` keys its messages by them.
FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "lora",
    "lora_scale",
    "scheduler",
    "steps",
    "guidance_scale",
    "size",
    "num_frames",
    "seed",
    "start_image",
    "end_image",
)

ProgressFn = Callable[[int, int, str], None]  # (done, total, what)


# ------------------------------------------------------------------------------------------ small types
@dataclass(frozen=True)
class Choice:
    """A dropdown entry: what the page shows and the reference it passes back."""

    label: str
    ref: str


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model: where its pipeline folder is and what it can make."""

    ref: str  # models:/NAME/VERSION, or the folder
    label: str
    folder: Path
    multiple: int  # every side a multiple of this (VAE compression x patch size x motion grid)
    sizes: tuple[tuple[int, int], ...]  # (width, height): the trained aspect buckets, the default first
    frame_counts: tuple[int, ...]
    max_frames: int
    defaults: dict  # num_frames, width, height, steps, guidance_scale, scheduler
    trained_settings: str  # where the buckets and defaults came from
    version: str | None = None
    run_id: str | None = None
    image_to_video: bool = False  # a V5.1 InP model: start (and end) images
    family: str = "native"
    schedulers: tuple[str, ...] = ()  # the scheduler choices this model takes (empty: every native one)

    @property
    def size_labels(self) -> list[str]:
        return [size_label(w, h) for w, h in self.sizes]


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str
    model: str  # canonical: models:/NAME/VERSION or a folder
    lora: str | None
    lora_scale: float
    scheduler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    num_frames: int
    seed: int
    start_image: str | None = None  # V5.1 InP models only
    end_image: str | None = None


@dataclass
class Result:
    video: Path
    params: dict
    seconds: float

    @property
    def caption(self) -> str:
        p = self.params
        return f"{p['prompt'][:40]} · {p['model_label']} · seed {p['seed']}"


class InvalidRequest(ValueError):
    """Messages keyed by ``FIELDS`` name."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(text) -> tuple[int, int]:
    """``"80x48"`` (width x height) -> (80, 48)."""
    match = SIZE_RE.match(str(text or ""))
    if not match:
        raise ValueError(f"{text!r} is not a size: write WIDTHxHEIGHT, e.g. 80x48")
    return int(match.group(1)), int(match.group(2))


def _int(value, name: str) -> int:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _float(value, name: str) -> float:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_frames(num_frames: int, max_frames: int, family: str = "native") -> None:
    problem = (v51_frame_count_problem if family == V51 else frame_count_problem)(num_frames, max_frames)
    if problem:
        raise ValueError(problem)


def check_image(path) -> Path:
    """A start/end image that PIL can decode; ValueError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.convert("RGB").load()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ValueError(f"cannot read {path.name} as an image ({type(exc).__name__}: {exc})") from None
    return path


# ------------------------------------------------------------------------------------------ the pipeline gate
class _Gate:
    """Lets concurrent requests share the loaded pipeline when they need it in the same state (model, LoRA,
    strength); a request that needs another state waits until the running ones finish, then reconfigures."""

    def __init__(self):
        self._cond = threading.Condition()
        self._key = None
        self._active = 0

    @contextlib.contextmanager
    def hold(self, key, setup: Callable[[], None]) -> Iterator[None]:
        with self._cond:
            while self._active and self._key != key:
                self._cond.wait()
            if self._key != key:
                self._key = None  # a failed setup leaves no valid state behind
                setup()
                self._key = key
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()


# ------------------------------------------------------------------------------------------ the service
class Studio:
    """Everything the studio page shows and does, for one ``Settings``."""

    def __init__(self, settings: Settings, cache_dir: str | Path | None = None, client=None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.tracking_uri = tracking_uri(settings)
        # Registry helpers (promotion's re-evaluation) resolve models:/ URIs through the process-wide URI.
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = client or MlflowClient(self.tracking_uri, self.tracking_uri)
        self.cache_dir = Path(cache_dir or settings.paths.cache / "studio").resolve()
        self.out_dir = self.cache_dir / "videos"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # downloads and the info caches
        self._infos: dict[str, ModelInfo] = {}
        self._gate = _Gate()
        self._pipe = None
        self._pipe_ref: str | None = None
        self._lora_ref: str | None = None
        self.pipeline_loads = 0  # how many times a pipeline was loaded (tests check reuse)
        self._counter = 0

    # -------------------------------------------------------------- models
    @property
    def model_name(self) -> str:
        return self.settings.registry.model_name

    def _versions(self, name: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{name}'")
            aliases = self.client.get_registered_model(name).aliases or {} if found else {}
        except MlflowException:
            return []
        # Search results leave aliases out on some stores (sqlite): take them from the registered model.
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in found:
            mv._aliases = sorted(set(mv.aliases or ()) | set(by_version.get(str(mv.version), ())))
        return sorted(found, key=lambda mv: -int(mv.version))

    @staticmethod
    def _label(mv) -> str:
        return f"v{mv.version}" + "".join(f" @{a}" for a in sorted(mv.aliases or ()))

    def models(self) -> list[Choice]:
        """Registry versions, newest first, then the local pipeline folder when there is one."""
        out = [
            Choice(self._label(mv), f"{REGISTRY_SCHEME}{self.model_name}/{mv.version}")
            for mv in self._versions(self.model_name)
        ]
        local = registered_pipeline_dir(self.settings)  # this project's family's pipeline folder
        if (local / "model_index.json").is_file():
            out.append(Choice(f"folder {local}", str(local)))
        return out

    def default_model(self) -> str | None:
        """The champion, else the newest version, else the local folder."""
        from easyanimate.registry import champion_version

        champion = None
        with contextlib.suppress(Exception):
            champion = champion_version(self.client, self.settings)
        if champion:
            return f"{REGISTRY_SCHEME}{self.model_name}/{champion}"
        models = self.models()
        return models[0].ref if models else None

    def canonical(self, ref: str) -> tuple[str, object | None]:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (``models:/NAME/VERSION``, its ModelVersion);
        a folder -> (its resolved path, None). Raises ValueError with a one-line message."""
        from mlflow.exceptions import MlflowException

        ref = str(ref or "").strip()
        if not ref:
            raise ValueError("choose a model")
        if ref.startswith(REGISTRY_SCHEME):
            body = ref.removeprefix(REGISTRY_SCHEME)
            try:
                if "@" in body:
                    name, alias = body.split("@", 1)
                    mv = self.client.get_model_version_by_alias(name, alias)
                else:
                    name, _, version = body.rpartition("/")
                    if not name or not version.isdigit():
                        raise ValueError(f"{ref!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
                    mv = self.client.get_model_version(name, version)
            except MlflowException as exc:
                raise ValueError(f"{ref}: not in the registry ({exc.message.splitlines()[0]})") from None
            return f"{REGISTRY_SCHEME}{mv.name}/{mv.version}", mv
        path = Path(ref).expanduser()
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{ref} is not a pipeline folder (no model_index.json)")
        return str(path.resolve()), None

    def model_info(self, ref: str) -> ModelInfo:
        """The model's folder (downloaded once per version) and geometry. Raises ValueError for a bad ref."""
        ref, mv = self.canonical(ref)
        with self._lock:
            if ref in self._infos:
                return self._infos[ref]
            if mv is not None:
                name = mv.name
                try:
                    folder = pipeline_folder(
                        ref, self.tracking_uri, dst=self.cache_dir / "models" / f"{name}-v{mv.version}"
                    )
                except FileNotFoundError as exc:
                    raise ValueError(str(exc)) from None
                trained, source = self._registered_settings(mv.run_id)
                label = self._label(mv)
            else:
                folder, trained, source = Path(ref), None, "current settings (a local folder records none)"
                label = f"folder {ref}"
            info = self._geometry(ref, label, folder, trained, source, mv)
            self._infos[ref] = info
            return info

    def _registered_settings(self, run_id: str | None) -> tuple[dict | None, str]:
        """The settings the version was registered with (``config/settings.json`` of its register run)."""
        import mlflow

        if not run_id:
            return None, "current settings (the version has no run)"
        try:
            data = mlflow.artifacts.load_dict(f"runs:/{run_id}/config/settings.json")
        except Exception:  # an older version, or artifacts gone: the current settings are the best guess
            return None, "current settings (the version recorded none)"
        return data, "the settings the version was registered with"

    def _geometry(self, ref, label, folder: Path, trained: dict | None, source: str, mv) -> ModelInfo:
        from easyanimate.data.buckets import BucketTable

        current = self.settings.model_dump(mode="json")
        data = trained or current

        def pick(*path, default=None):
            for src in (data, current):
                node = src
                for key in path:
                    node = node.get(key) if isinstance(node, dict) else None
                if node is not None:
                    return node
            return default

        if folder_family(folder) == V51:
            return self._v51_geometry(ref, label, folder, pick, source, mv)
        vae = json.loads((folder / "vae" / "config.json").read_text())
        dit = json.loads((folder / "transformer" / "config.json").read_text())
        grid = int(dit.get("grid_reshape", 1)) if dit.get("motion_module", True) else 1
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * int(dit.get("patch_size", 2)) * grid
        g = self.settings.generate
        max_frames = min(g.max_frames, VAE_TEMPORAL_COMPRESSION * int(dit.get("max_frames_latent", 64)))
        stage = pick("dit", "stage3", default={})
        buckets = stage.get("buckets") or {}
        resolution = int(stage.get("resolution") or pick("generate", "height"))
        if buckets.get("enabled", True):
            try:
                table = BucketTable.build(resolution, buckets.get("aspect_ratios") or ("1:1",), multiple).sizes
            except ValueError:
                table = ()
        else:
            table = ((resolution, resolution),)
        sizes = self._sizes(pick, table, multiple)
        frames = int(pick("generate", "num_frames"))
        scheduler = self._scheduler_name(folder) or pick("generate", "scheduler")
        defaults = self._defaults(pick, sizes, frames, max_frames, scheduler)
        return ModelInfo(
            ref=ref,
            label=label,
            folder=folder,
            multiple=multiple,
            sizes=tuple(sizes),
            frame_counts=valid_frame_counts(max_frames),
            max_frames=max_frames,
            defaults=defaults,
            trained_settings=source,
            version=str(mv.version) if mv is not None else None,
            run_id=mv.run_id if mv is not None else None,
        )

    def _sizes(self, pick, table, multiple: int) -> list[tuple[int, int]]:
        """(width, height) choices: the generation default when the model can make it, then its buckets
        (``table``: (height, width)), within ``generate.max_side``."""
        default = (int(pick("generate", "width")), int(pick("generate", "height")))
        sizes = [default] if default[0] % multiple == 0 and default[1] % multiple == 0 else []
        sizes += [(w, h) for h, w in table if (w, h) not in sizes]
        return [s for s in sizes if max(s) <= self.settings.generate.max_side] or [(multiple, multiple)]

    def _defaults(self, pick, sizes, frames: int, max_frames: int, scheduler: str) -> dict:
        """What the page starts a model's form with."""
        return {
            "width": sizes[0][0],
            "height": sizes[0][1],
            "num_frames": frames if frames <= max_frames else 1,
            "steps": min(int(pick("generate", "num_inference_steps")), self.settings.generate.max_inference_steps),
            "guidance_scale": float(pick("generate", "guidance_scale")),
            "scheduler": scheduler,
        }

    def _v51_geometry(self, ref, label, folder: Path, pick, source: str, mv) -> ModelInfo:
        """A V5.1 model: sides in multiples of 8 (VAE) x its patch size, 1 + 4k frames, the buckets it was fine-tuned
        in (``v51.train_*``, ``bucket_aspect_ratios``), its own scheduler; image inputs when it is an InP one."""
        from easyanimate.data.buckets import BucketTable
        from easyanimate.families.v51 import is_inpaint_checkpoint

        dit = json.loads((folder / "transformer" / "config.json").read_text())
        multiple = 8 * int(dit.get("patch_size", 2))
        g = self.settings.generate
        max_frames = min(g.max_frames, V51_MAX_FRAMES)
        side = int(math.sqrt(int(pick("v51", "train_height")) * int(pick("v51", "train_width"))))
        try:
            table = BucketTable.build(side, pick("v51", "bucket_aspect_ratios") or ("1:1",), multiple).sizes
        except ValueError:
            table = ()
        sizes = self._sizes(pick, table, multiple)
        frames = int(pick("v51", "num_frames"))
        return ModelInfo(
            ref=ref,
            label=label,
            folder=folder,
            multiple=multiple,
            sizes=tuple(sizes),
            frame_counts=v51_frame_counts(max_frames),
            max_frames=max_frames,
            defaults=self._defaults(pick, sizes, frames, max_frames, V51_SCHEDULER),
            trained_settings=source,
            version=str(mv.version) if mv is not None else None,
            run_id=mv.run_id if mv is not None else None,
            image_to_video=is_inpaint_checkpoint(folder),
            family=V51,
            schedulers=(V51_SCHEDULER,),
        )

    @staticmethod
    def _scheduler_name(folder: Path) -> str | None:
        """The name (``easyanimate.schedulers.SCHEDULERS``) of the scheduler saved with the pipeline."""
        from easyanimate.schedulers import SCHEDULERS

        config = folder / "scheduler" / "scheduler_config.json"
        if not config.is_file():
            return None
        saved = json.loads(config.read_text())
        for name, (cls, extra) in SCHEDULERS.items():
            if cls.__name__ == saved.get("_class_name") and all(saved.get(k) == v for k, v in extra.items()):
                return name
        return None

    # -------------------------------------------------------------- LoRA adapters
    def loras(self, model_ref: str | None) -> list[Choice]:
        """Adapters trained on ``model_ref``: registry versions whose ``base_model_uri`` is that version, or, for
        the local ``paths.pipeline`` folder, the local ``paths.lora`` adapter trained with it."""

        try:
            ref, mv = self.canonical(model_ref)
        except ValueError:
            return []
        if mv is None:
            local = registered_adapter_dir(self.settings)
            if Path(ref) == registered_pipeline_dir(self.settings).resolve() and local is not None:
                return [Choice(f"folder {local}", str(local.resolve()))]
            return []
        name = self.settings.lora.registered_model
        out = []
        for lv in self._versions(name):
            if lv.tags.get("base_model_uri") == ref:
                rank = lv.tags.get("lora_rank")
                out.append(
                    Choice(
                        self._label(lv) + (f" (rank {rank})" if rank else ""), f"{REGISTRY_SCHEME}{name}/{lv.version}"
                    )
                )
        return out

    def _check_lora(self, lora: str, model: str) -> str:
        """The canonical adapter reference; ValueError when it is missing or was trained on another model."""
        from easyanimate.registry import lora_path

        if lora.startswith(REGISTRY_SCHEME):
            ref, lv = self.canonical(lora)
            base = lv.tags.get("base_model_uri")
            if not base:
                raise ValueError(f"{lora} records no base model (tag base_model_uri): it is not a LoRA version")
            if base != model:
                raise ValueError(f"{lora} was trained on {base}, not on {model}: choose one of this model's LoRAs")
            return ref
        try:
            return str(lora_path(lora).resolve())
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None

    def _lora_file(self, ref: str) -> Path:
        from easyanimate.pipelines.pipeline_easyanimate import LORA_WEIGHT_NAME

        if not ref.startswith(REGISTRY_SCHEME):
            return Path(ref)
        name, _, version = ref.removeprefix(REGISTRY_SCHEME).rpartition("/")
        with self._lock:
            root = download_model(ref, self.cache_dir / "loras" / f"{name}-v{version}", self.tracking_uri)
        found = sorted(root.rglob(LORA_WEIGHT_NAME))
        if not found:
            raise ValueError(f"{ref} holds no LoRA adapter ({LORA_WEIGHT_NAME})")
        return found[0].parent

    # -------------------------------------------------------------- request checks
    def check_request(self, form: dict) -> Request:
        """Raw page values (keys: ``FIELDS``) -> a Request; InvalidRequest with a message per bad field."""
        errors: dict[str, str] = {}
        g, cfg = self.settings.generate, self.settings.studio

        def attempt(key: str, fn):
            try:
                return fn()
            except ValueError as exc:
                errors[key] = str(exc)
                return None

        prompt = str(form.get("prompt") or "")
        if not prompt.strip():
            errors["prompt"] = "Enter a prompt: the model generates from text."
        negative = str(form.get("negative_prompt") or "")
        info = attempt("model", lambda: self.model_info(form.get("model")))
        lora_text = str(form.get("lora") or "").strip()
        lora = None
        if lora_text and info is not None:
            lora = attempt("lora", lambda: self._check_lora(lora_text, info.ref))

        def scale():
            value = _float(form.get("lora_scale", 1.0), "LoRA strength")
            if not 0 <= value <= LORA_SCALE_MAX:
                raise ValueError(f"LoRA strength must be between 0 and {LORA_SCALE_MAX:g}, got {value:g}")
            return value

        lora_scale = attempt("lora_scale", scale)

        def scheduler():
            from easyanimate.schedulers import SCHEDULERS

            name = str(form.get("scheduler") or "")
            choices = (info.schedulers if info is not None else ()) or tuple(SCHEDULERS)
            if name not in choices:
                raise ValueError(f"unknown scheduler {name!r} for this model; choose one of {sorted(choices)}")
            return name

        sched = attempt("scheduler", scheduler)

        def steps():
            value = _int(form.get("steps"), "steps")
            if not 1 <= value <= g.max_inference_steps:
                raise ValueError(f"steps must be between 1 and {g.max_inference_steps} (generate.max_inference_steps)")
            return value

        n_steps = attempt("steps", steps)

        def guidance():
            value = _float(form.get("guidance_scale"), "guidance")
            if not 1 <= value <= GUIDANCE_MAX:
                raise ValueError(f"guidance must be between 1 and {GUIDANCE_MAX:g}, got {value:g}")
            return value

        cfg_scale = attempt("guidance_scale", guidance)

        def size():
            width, height = parse_size(form.get("size"))
            if max(width, height) > g.max_side or min(width, height) < 1:
                raise ValueError(
                    f"{size_label(width, height)}: each side must be 1 to {g.max_side} px (generate.max_side)"
                )
            if info is not None and (width % info.multiple or height % info.multiple):
                raise ValueError(
                    f"{size_label(width, height)}: this model makes sides that are multiples of {info.multiple} "
                    f"(trained sizes: {', '.join(info.size_labels)})"
                )
            return width, height

        wh = attempt("size", size)

        def frames():
            value = _int(form.get("num_frames"), "frames")
            if info is None:
                check_frames(value, g.max_frames)
            else:
                check_frames(value, info.max_frames, info.family)
            return value

        n_frames = attempt("num_frames", frames)

        def seed():
            value = _int(form.get("seed"), "seed")
            if not 0 <= value <= SEED_MAX:
                raise ValueError(f"seed must be between 0 and {SEED_MAX}")
            return value

        the_seed = attempt("seed", seed)
        images: dict[str, str | None] = {"start_image": None, "end_image": None}
        for key in images:
            if form.get(key):
                if info is not None and not info.image_to_video:
                    errors[key] = "this model does not take images (text-to-video only)"
                else:
                    checked = attempt(key, lambda key=key: check_image(form[key]))
                    images[key] = str(checked) if checked is not None else None
        if form.get("end_image") and not form.get("start_image") and "end_image" not in errors:
            errors["end_image"] = "an end image needs a start image"
        if wh and n_frames and n_steps:
            work = wh[0] * wh[1] * n_frames * n_steps
            if work > cfg.max_request_work:
                errors["size"] = (
                    f"{size_label(*wh)} x {n_frames} frames x {n_steps} steps = {work:,} is over this server's "
                    f"budget of {cfg.max_request_work:,} (studio.max_request_work): lower the size, frames or steps"
                )
        if errors:
            raise InvalidRequest(errors)
        return Request(
            prompt=prompt,
            negative_prompt=negative,
            model=info.ref,
            lora=lora,
            lora_scale=lora_scale if lora else 0.0,
            scheduler=sched,
            steps=n_steps,
            guidance_scale=cfg_scale,
            width=wh[0],
            height=wh[1],
            num_frames=n_frames,
            seed=the_seed,
            **images,
        )

    # -------------------------------------------------------------- generation
    @property
    def loaded_model(self) -> str | None:
        return self._pipe_ref

    def _configure(self, info: ModelInfo, req: Request, progress: ProgressFn) -> None:
        """Runs alone (see ``_Gate``): load the model if it changed, then swap the adapter if it changed."""
        from easyanimate.pipelines import EasyAnimatePipeline

        if info.family == V51:
            self._configure_v51(info, req, progress)
            return
        if self._pipe_ref != info.ref:
            progress(0, 1, f"loading {info.label}")
            self._pipe = self._pipe_ref = self._lora_ref = None
            gc.collect()  # free the previous model before the next one is loaded
            pipe = EasyAnimatePipeline.from_pretrained(info.folder)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._pipe_ref = pipe, info.ref
            self.pipeline_loads += 1
        if self._lora_ref != req.lora:
            if self._lora_ref is not None:
                self._lora_ref = None
                self._pipe.unload_lora_weights()
            if req.lora is not None:
                progress(0, 1, "loading the LoRA adapter")
                self._pipe.load_lora_weights(self._lora_file(req.lora), scale=req.lora_scale)
                self._lora_ref = req.lora
        if req.lora is not None:
            self._pipe.set_lora_scale(req.lora_scale)

    def _configure_v51(self, info: ModelInfo, req: Request, progress: ProgressFn) -> None:
        """A V5.1 model: its adapter goes in before the memory mode's hooks, so another adapter means a reload."""
        from easyanimate.families.v51 import load_v51_pipeline, set_v51_lora_scale

        if self._pipe_ref != info.ref or self._lora_ref != req.lora:
            progress(0, 1, f"loading {info.label}" + (" with its LoRA adapter" if req.lora else ""))
            self._pipe = self._pipe_ref = self._lora_ref = None
            gc.collect()
            v = self.settings.v51
            self._pipe = load_v51_pipeline(
                info.folder,
                v.memory_mode,
                dtype=v.dtype,
                lora_dir=self._lora_file(req.lora) if req.lora else None,
                lora_scale=req.lora_scale if req.lora else 1.0,
                tile_sample_min_size=v.tile_sample_min_size,
                tile_sample_stride=v.tile_sample_stride,
            )
            self._pipe_ref, self._lora_ref = info.ref, req.lora
            self.pipeline_loads += 1
        if req.lora is not None:
            set_v51_lora_scale(self._pipe, req.lora_scale)

    def _generate_v51(self, req: Request, out: Path, progress: ProgressFn) -> None:
        from easyanimate.families.v51 import generate_v51
        from easyanimate.pipelines.pipeline_easyanimate import encode_video
        from easyanimate.utils import atomic_write_bytes

        def on_step(p, step: int, timestep, tensors: dict) -> dict:
            progress(step + 1, p.num_timesteps, "denoising")
            return tensors

        v = self.settings.v51
        frames = generate_v51(
            self._pipe,
            req.prompt,
            req.num_frames,
            req.height,
            req.width,
            req.steps,
            req.guidance_scale,
            req.seed,
            req.start_image,
            req.end_image,
            negative_prompt=req.negative_prompt,
            max_sequence_length=v.max_sequence_length,
            noise_aug_strength=v.noise_aug_strength,
            callback_on_step_end=on_step,
        )
        atomic_write_bytes(out, encode_video(frames, "mp4", self.settings.generate.fps))

    def generate(self, req: Request, progress: ProgressFn | None = None) -> Result:
        """One video for a checked request; ``progress(done, total, what)`` after every denoising step."""
        import torch

        from easyanimate.pipelines import EasyAnimatePipeline, make_scheduler

        progress = progress or (lambda done, total, what: None)
        info = self.model_info(req.model)
        key = (info.ref, req.lora, req.lora_scale if req.lora else 0.0)
        with self._lock:
            self._counter += 1
            out = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._counter:04d}-seed{req.seed}.mp4"
        if info.family == V51:
            with self._gate.hold(key, lambda: self._configure(info, req, progress)):
                started = time.perf_counter()
                self._generate_v51(req, out, progress)
                seconds = time.perf_counter() - started
            return Result(out, self.describe(req, info, seconds), seconds)
        with self._gate.hold(key, lambda: self._configure(info, req, progress)):
            pipe = self._pipe
            # A per-request view of the loaded modules with its own scheduler (scheduler state is per run).
            run = EasyAnimatePipeline(
                vae=pipe.vae,
                transformer=pipe.transformer,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
                scheduler=make_scheduler(req.scheduler, dict(pipe.scheduler.config)),
            )
            run.set_progress_bar_config(disable=True)

            def on_step(p, step: int, timestep, tensors: dict) -> dict:
                progress(step + 1, p.num_timesteps, "denoising")
                return tensors

            started = time.perf_counter()
            run(
                req.prompt,
                negative_prompt=req.negative_prompt or None,
                num_frames=req.num_frames,
                height=req.height,
                width=req.width,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                generator=torch.Generator().manual_seed(req.seed),
                output_type="mp4",
                output_path=out,
                fps=self.settings.generate.fps,
                max_text_tokens=self.settings.dit.model.max_text_tokens,
                callback_on_step_end=on_step,
            )
            seconds = time.perf_counter() - started
        return Result(out, self.describe(req, info, seconds), seconds)

    def describe(self, req: Request, info: ModelInfo, seconds: float | None = None) -> dict:
        """The request's full parameters and the ``easyanimate generate`` command that makes the same video."""
        params = {k: v for k, v in asdict(req).items()}
        params.update(model_label=info.label, fps=self.settings.generate.fps)
        if seconds is not None:
            params["seconds"] = round(seconds, 3)
        command = ["easyanimate", "generate", req.prompt, "--out", "video.mp4", "--model", req.model]
        if req.lora:
            command += ["--lora", req.lora, "--lora-scale", f"{req.lora_scale:g}"]
        command += [
            "--steps", str(req.steps), "--seed", str(req.seed), "--frames", str(req.num_frames),
            "--height", str(req.height), "--width", str(req.width), "--guidance", f"{req.guidance_scale:g}",
            "--negative-prompt", req.negative_prompt,
        ]  # fmt: skip
        for flag, image in (("--image", req.start_image), ("--end-image", req.end_image)):
            if image:
                command += [flag, image]
        params["command"] = shlex.join(command)
        own = info.defaults.get("scheduler")
        if req.scheduler != own:
            params["note"] = f"`easyanimate generate` uses the model's own scheduler ({own}); this used {req.scheduler}"
        return params

    # -------------------------------------------------------------- data
    @property
    def manifest_path(self) -> Path:
        return self.settings.paths.curated / "manifest.parquet"

    def manifest(self) -> pd.DataFrame | None:
        from easyanimate.data.manifest import read_manifest

        path = self.manifest_path
        return read_manifest(path) if path.is_file() else None

    @staticmethod
    def score_columns(df: pd.DataFrame) -> list[str]:
        """The filters' score columns: the numeric ones between the manifest's fixed head and tail."""
        from easyanimate.data.manifest import HEAD_COLUMNS, TAIL_COLUMNS

        fixed = {**HEAD_COLUMNS, **TAIL_COLUMNS}
        return [c for c in df.columns if c not in fixed and pd.api.types.is_numeric_dtype(df[c])]

    @staticmethod
    def status_counts(df: pd.DataFrame) -> dict[str, int]:
        from easyanimate.data.manifest import STATUSES

        counts = Counter(df["status"].fillna("unknown"))
        return {s: int(counts.get(s, 0)) for s in (*STATUSES, *sorted(set(counts) - set(STATUSES)))}

    @staticmethod
    def reject_reasons(df: pd.DataFrame) -> pd.DataFrame:
        from easyanimate.data.summary import reject_reason_table

        return pd.DataFrame(reject_reason_table(df), columns=["status", "reject_reason", "clips"])

    @staticmethod
    def histogram(df: pd.DataFrame, column: str) -> pd.DataFrame:
        """Clips per equal-width bin of one score (every scored clip, accepted or not); ``bin`` is its lower edge."""
        values = df[column].dropna().to_numpy(dtype=float) if column in df else np.array([])
        if not len(values):
            return pd.DataFrame({"bin": [], "clips": []})
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        return pd.DataFrame({"bin": [f"{lo:.3g}" for lo in edges[:-1]], "clips": counts.astype(int)})

    @staticmethod
    def filter_clips(
        df: pd.DataFrame,
        statuses=(),
        reasons=(),
        sources=(),
        score: str | None = None,
        low: float | None = None,
        high: float | None = None,
    ) -> pd.DataFrame:
        """Rows matching every filter given (an empty selection means any)."""
        keep = pd.Series(True, index=df.index)
        if statuses:
            keep &= df["status"].isin(list(statuses))
        if reasons:
            keep &= df["reject_reason"].fillna("").isin([r if r != "(accepted)" else "" for r in reasons])
        if sources:
            keep &= df["source"].isin(list(sources))
        if score and score in df and (low is not None or high is not None):
            values = df[score].astype(float)
            if low is not None and not (isinstance(low, float) and math.isnan(low)):
                keep &= values >= float(low)
            if high is not None and not (isinstance(high, float) and math.isnan(high)):
                keep &= values <= float(high)
        return df[keep]

    def clip_table(self, df: pd.DataFrame) -> pd.DataFrame:
        cols = ["clip_id", "source", "start_s", "end_s", "status", "reject_reason", *self.score_columns(df)]
        cols += ["split", "caption"]
        view = df[[c for c in cols if c in df]].copy()
        view["clip_id"] = view["clip_id"].str[:8]
        return view.round(4).astype(object).where(view.notna(), "")

    def clip_video(self, row: pd.Series) -> tuple[Path | None, str]:
        """What plays when a clip is clicked: the cut clip, or (rejected clips are not cut) its source video."""
        span = f"{row['source']} [{float(row['start_s']):.2f}–{float(row['end_s']):.2f} s]"
        if isinstance(row.get("clip_path"), str) and row["clip_path"]:
            path = self.settings.paths.curated / row["clip_path"]
            if path.is_file():
                return path.resolve(), f"{row['status']}: {span}"
        source = self.settings.paths.raw_videos / str(row["source"])
        reason = row.get("reject_reason")
        why = f"{row['status']} ({reason})" if isinstance(reason, str) and reason else str(row["status"])
        if source.is_file():
            return source.resolve(), f"{why}: not cut, playing the whole source {span}"
        return None, f"{why}: {span}; no clip was cut and the source video is not in {self.settings.paths.raw_videos}"

    def thumbnail(self, row: pd.Series) -> Path | None:
        """The clip's middle frame as a small JPEG (cached by clip id); None when no video is at hand."""
        from PIL import Image

        from easyanimate.data.video_io import VideoError, decode_frames

        out = self.cache_dir / "thumbnails" / f"{row['clip_id']}.jpg"
        if out.is_file():
            return out
        start, end = float(row["start_s"]), float(row["end_s"])
        clip = row.get("clip_path")
        if isinstance(clip, str) and clip and (self.settings.paths.curated / clip).is_file():
            video, at = self.settings.paths.curated / clip, (end - start) / 2
        else:
            video, at = self.settings.paths.raw_videos / str(row["source"]), (start + end) / 2
        if not video.is_file():
            return None
        try:
            frame = decode_frames(video, times=[at])[0]
        except VideoError:
            return None
        img = Image.fromarray(frame)
        img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.jpg")
        img.save(tmp, quality=85)
        tmp.replace(out)
        return out

    def gate_report(self) -> Path | None:
        """The great_expectations Data Docs page of the last curation (``reports/curate/gate_report/``)."""
        index = self.settings.paths.reports / "curate" / "gate_report" / "index.html"
        return index.resolve() if index.is_file() else None

    # -------------------------------------------------------------- registry
    def versions_table(self) -> pd.DataFrame:
        rows = []
        for mv in self._versions(self.model_name):
            t = mv.tags
            rows.append(
                {
                    "version": f"v{mv.version}",
                    "aliases": " ".join(f"@{a}" for a in sorted(mv.aliases or ())),
                    "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000)),
                    "data gate": t.get("data_gate_passed", ""),
                    "eval gate": t.get("eval_passed", ""),
                    "promotion": t.get("promotion.decision", ""),
                    "reason": t.get("promotion.reason", ""),
                    "LoRA": t.get("lora_model_uri", ""),
                }
            )
        return pd.DataFrame(
            rows, columns=["version", "aliases", "created", "data gate", "eval gate", "promotion", "reason", "LoRA"]
        )

    def metrics_table(self) -> pd.DataFrame:
        """Evaluation metrics of every version side by side (a row per metric, a column per version)."""
        from easyanimate.registry import candidate_from_version

        columns = {}
        for mv in self._versions(self.model_name):
            with contextlib.suppress(Exception):
                columns[self._label(mv)] = candidate_from_version(self.client, self.model_name, str(mv.version)).metrics
        metrics = sorted({k for m in columns.values() for k in m})
        table = pd.DataFrame({"metric": metrics})
        for label, values in columns.items():
            table[label] = [f"{values[m]:.6g}" if m in values else "—" for m in metrics]
        return table

    def version_choices(self) -> list[Choice]:
        return [Choice(self._label(mv), str(mv.version)) for mv in self._versions(self.model_name)]

    def lineage(self, version: str) -> dict:
        from easyanimate.lineage import model_lineage

        return model_lineage(self.client, self.model_name, str(version))

    @staticmethod
    def lineage_markdown(info: dict) -> str:
        """The facts ``easyanimate lineage`` prints, as markdown."""
        from easyanimate.stages import STAGE_NAMES

        lines = [f"**{info['model']}**  aliases: {', '.join('@' + a for a in info['aliases']) or '-'}", ""]
        from easyanimate.lineage import LINEAGE_FACTS

        lines += ["| fact | value |", "|---|---|", *(f"| {k} | `{info[k] or '-'}` |" for k in LINEAGE_FACTS), ""]
        if info["checkpoints"]:
            lines += ["| checkpoint | path | DVC hash | parent |", "|---|---|---|---|"]
            for stage, c in info["checkpoints"].items():
                lines.append(
                    f"| {stage} | `{c.get('path', '-')}` | `{c.get('dvc_hash', '-')}` | {c.get('parent') or '-'} |"
                )
            lines.append("")
        if info["runs"]:
            order = {s: i for i, s in enumerate(STAGE_NAMES)}
            lines += ["| stage | run | status |", "|---|---|---|"]
            for stage in sorted(info["runs"], key=lambda s: order.get(s, len(order))):
                run = info["runs"][stage]
                lines.append(f"| {stage} | `{run['run_id']}` | {run.get('status', '')} |")
            lines.append("")
        promotion = info["promotion"]
        if promotion:
            lines.append(
                f"**Promotion:** {promotion.get('promotion.decision', '-')}: {promotion.get('promotion.reason', '-')}"
            )
        return "\n".join(lines)

    def sample_gifs(self, version: str) -> list[Path]:
        """The evaluation sample GIFs of the version's evaluate run (downloaded once)."""
        mv = self.client.get_model_version(self.model_name, str(version))
        run_id = mv.tags.get("evaluate_run_id") or mv.tags.get("run.evaluate")
        if not run_id:
            return []
        dst = self.cache_dir / "samples" / f"{self.model_name}-v{version}"
        if not dst.exists():
            try:
                gifs = self._find_artifacts(run_id, "", ".gif", depth=3)
            except Exception:
                return []
            with self._lock:
                for path in gifs:
                    self.client.download_artifacts(run_id, path, str(dst))
        return sorted(dst.rglob("*.gif"))

    def _find_artifacts(self, run_id: str, path: str, suffix: str, depth: int) -> list[str]:
        found = []
        for item in self.client.list_artifacts(run_id, path or None):
            if item.is_dir and depth > 0:
                found += self._find_artifacts(run_id, item.path, suffix, depth - 1)
            elif item.path.endswith(suffix):
                found.append(item.path)
        return found

    def mlflow_links(self, version: str) -> str:
        """Links into the MLflow UI (``studio.mlflow_ui_url``); empty when none is configured."""
        ui = (self.settings.studio.mlflow_ui_url or "").rstrip("/")
        if not ui:
            return ""
        mv = self.client.get_model_version(self.model_name, str(version))
        links = [f"[model version v{version}]({ui}/#/models/{self.model_name}/versions/{version})"]
        for what, run_id in (("register run", mv.run_id), ("evaluate run", mv.tags.get("evaluate_run_id"))):
            if run_id:
                with contextlib.suppress(Exception):
                    experiment = self.client.get_run(run_id).info.experiment_id
                    links.append(f"[{what}]({ui}/#/experiments/{experiment}/runs/{run_id})")
        return "MLflow: " + " · ".join(links)

    def promotion_dry_run(self, version: str) -> dict:
        """What ``easyanimate promote --version V --dry-run`` decides (changes no alias or tag)."""
        from easyanimate.registry import promote_version

        return promote_version(self.settings, str(version), dry_run=True, client=self.client)

    # -------------------------------------------------------------- files the page may serve
    def allowed_paths(self) -> list[str]:
        p = self.settings.paths
        return [str(Path(x).resolve()) for x in (self.cache_dir, p.curated, p.raw_videos, p.reports / "curate")]


__all__ = [
    "FIELDS",
    "Choice",
    "InvalidRequest",
    "ModelInfo",
    "Request",
    "Result",
    "Studio",
    "check_frames",
    "check_image",
    "parse_size",
    "valid_frame_counts",
]
