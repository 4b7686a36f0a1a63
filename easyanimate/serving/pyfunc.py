"""MLflow ``pyfunc`` wrapper: a saved pipeline folder (and optionally a LoRA adapter) plus this class.

Two model families: ``native`` (this project's Slice VAE + DiT pipeline) and ``easyanimate-v5.1`` (a released
EasyAnimate V5.1 folder in the diffusers layout, or its fine-tune, served with diffusers' own pipelines through
``easyanimate.families.v51``; an InP checkpoint also does image-to-video).

Request (``POST /invocations``, JSON): ``{"dataframe_records": [{"prompt": "...", ...}, ...]}``, one video per
record. Fields: ``prompt`` (required), ``negative_prompt``, ``num_frames``, ``height``, ``width``, ``steps``,
``guidance_scale``, ``seed``, ``fps``, ``lora_scale`` (models with an adapter only), and for V5.1 InP models
``image`` (the start frame) and ``end_image`` (the last frame; needs ``image``): base64-encoded PNG or JPEG
bytes (a ``data:image/...;base64,`` prefix is allowed), at most ``MAX_IMAGE_BYTES`` and ``MAX_IMAGE_PIXELS``;
scaled and centre-cropped to the video's size. Native and V5.1 text-to-video models refuse them. Missing fields
take the defaults stored with the model (the ``generate`` settings it was logged with; a V5.1 model's frames and
negative prompt from its ``v51`` settings). Frame counts: native 1 or a multiple of 4 >= 8, V5.1 1 + 4k (its
MagViT VAE compresses time by 4).

Response: ``{"predictions": [{"video_mp4_base64": "...", "num_frames": F, "height": H, "width": W, "fps": R,
"seed": S}, ...]}``. A bad request (empty prompt, unknown field, size or frame count out of range or not
supported by the VAE, an image the model cannot take or that is not a readable base64 PNG/JPEG within the
limits, more records than ``generate.max_records_per_request``, more work than ``generate.max_request_budget``:
frames x height x width x steps summed over its records; a V5.1 model's default request has ``v51.num_frames``)
is answered with HTTP 400 and ``{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}``.

Bounds: every denoising step checks a stop condition (the pipeline's ``callback_on_step_end``), so a request
past its deadline stops within one step and frees the model for the next one.

Which server: ``easyanimate serve`` (``easyanimate/serving/server.py``) is the one to run: besides the
budget and the deadline (``serve.request_timeout_s``) it stops a generation whose client disconnected, bounds
its queue (503 when full), answers ``/health`` during generation and drains on SIGTERM within
``serve.shutdown_grace_s``. ``mlflow models serve`` stays supported with the budget and a deadline: inside
MLflow's scoring server a generation stops at its request timeout (``--timeout`` /
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, default 60 s) and requests waiting for the model give up at it too;
but MLflow gives the model no way to see a client disconnect, so an abandoned request runs until that
timeout, and SIGTERM waits for it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import time
from typing import TYPE_CHECKING, Callable

import mlflow.pyfunc

from easyanimate.families import NATIVE, V51, folder_family

if TYPE_CHECKING:
    import numpy as np

INT_FIELDS = ("num_frames", "height", "width", "steps", "seed", "fps")
FLOAT_FIELDS = ("guidance_scale", "lora_scale")
TEXT_FIELDS = ("prompt", "negative_prompt")
IMAGE_FIELDS = ("image", "end_image")  # base64 PNG/JPEG; V5.1 InP models only
REQUEST_FIELDS = TEXT_FIELDS + INT_FIELDS + FLOAT_FIELDS + IMAGE_FIELDS
MAX_IMAGE_BYTES = 10 * 2**20  # one decoded request image (``mlflow models serve`` has no body limit of its own)
MAX_IMAGE_PIXELS = 4096 * 4096  # one request image, checked from its header before it is decoded
IMAGE_FORMATS = ("PNG", "JPEG")
# What one request may ask for: the generate settings of these names (see GenerateConfig).
LIMIT_FIELDS = ("max_side", "max_frames", "max_inference_steps", "max_records_per_request", "max_request_budget")
DEFAULT_SIZE_FIELDS = ("num_frames", "height", "width", "num_inference_steps")  # what a default request costs
torch_seed_max = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
LOCK_POLL_S = 0.05  # how often a request waiting for the model checks whether it should give up

StopCheck = Callable[[], "str | None"]  # None: go on; a message: stop with it


def bad_request(message: str) -> Exception:
    """The exception MLflow's scoring server turns into HTTP 400 with ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class GenerationStopped(RuntimeError):
    """A generation stopped before it finished (deadline, client gone, shutdown); the message says why."""

    def __init__(self, message: str, steps_done: int = 0):
        super().__init__(message)
        self.steps_done = steps_done


def decode_image(field: str, value) -> np.ndarray:
    """A request's base64 PNG/JPEG -> uint8 (H, W, 3); ``bad_request`` naming ``field`` when it is not one."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise bad_request(f"{field} must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise bad_request(f"{field}: a data URL must be base64-encoded (data:image/png;base64,...)")
    if len(text) > 4 * (MAX_IMAGE_BYTES // 3 + 1) + 4:
        raise bad_request(f"{field} is over {MAX_IMAGE_BYTES // 2**20} MiB: send a smaller image")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field} is not valid base64 (send the PNG or JPEG file's bytes, base64-encoded)") from None
    if not data:
        raise bad_request(f"{field} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise bad_request(
                    f"{field} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} allowed: send a smaller image"
                )
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise bad_request(f"{field} is not a readable PNG or JPEG image ({type(exc).__name__}: {exc})") from None
    return rgb


def _missing(value) -> bool:
    # Records with different keys become a DataFrame with NaN holes; a hole means "use the default".
    return value is None or (isinstance(value, float) and math.isnan(value))


def request_work(req: dict) -> int:
    """What a parsed request record costs, in the budget's unit: frames x height x width x steps."""
    return req["num_frames"] * req["height"] * req["width"] * req["steps"]


def limits_of(generate: dict, request_defaults: dict | None = None, num_frames: int | None = None) -> dict:
    """The request limits (``LIMIT_FIELDS``, the budget resolved) of a dumped ``GenerateConfig``; settings an
    older model was logged without take today's defaults. An unset budget is room for
    ``max_records_per_request`` videos of ``request_defaults`` (a dumped ``GenerateConfig``; default: its own),
    of ``num_frames`` frames when given (a V5.1 model's default request: ``v51.num_frames``)."""
    from easyanimate.config import GenerateConfig

    def config(values: dict) -> GenerateConfig:
        return GenerateConfig.model_validate({k: v for k, v in values.items() if k in GenerateConfig.model_fields})

    limits = config(generate)
    if request_defaults is not None:
        sizes = config(request_defaults)
        limits = limits.model_copy(update={k: getattr(sizes, k) for k in DEFAULT_SIZE_FIELDS})
    budget = limits.request_budget
    if num_frames is not None and limits.max_request_budget is None:
        budget = limits.max_records_per_request * num_frames * limits.height * limits.width * limits.num_inference_steps
    return {**{k: getattr(limits, k) for k in LIMIT_FIELDS}, "max_request_budget": budget}


def _serving_timeout_s() -> float | None:
    """MLflow's scoring-server request timeout when running inside it (``mlflow models serve``), else None."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    # `mlflow models serve` sets both (the timeout always, in its server's environment); `mlflow models predict`
    # only the first.
    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() or not MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.defined:
        return None
    return float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())


class EasyAnimatePyfunc(mlflow.pyfunc.PythonModel):
    """Serves ``artifacts["pipeline"]`` (or the registered ``base_model_uri``), with ``artifacts["lora"]``
    applied at ``lora_scale`` when present.

    ``generate`` is a ``GenerateConfig`` (request defaults and limits); ``max_text_tokens`` the native DiT's text
    length. ``family``: ``native`` or ``easyanimate-v5.1``; a V5.1 model is loaded and run as ``v51`` (a
    ``V51Config``: memory mode, dtype, VAE tiles, default frames, prompt length) says. Only plain values are
    stored, so the pickled model does not depend on the config classes; a model pickled before ``family``
    existed is native.
    """

    def __init__(
        self,
        generate=None,
        max_text_tokens: int | None = None,
        base_model_uri: str | None = None,
        lora_scale: float = 0.0,
        family: str = NATIVE,
        v51=None,
    ):
        from easyanimate.config import DiTModelConfig, GenerateConfig, V51Config

        if family not in (NATIVE, V51):
            raise ValueError(f"family={family!r}: choose {NATIVE!r} or {V51!r}")
        self.defaults = (generate or GenerateConfig()).model_dump(mode="json")
        self.max_text_tokens = max_text_tokens or DiTModelConfig().max_text_tokens
        self.base_model_uri = base_model_uri
        # The base model serves what evaluation checked (scale 0); a registered LoRA model its own default.
        self.lora_scale = lora_scale
        self.family = family
        self.v51 = (v51 or V51Config()).model_dump(mode="json") if family == V51 else None

    def load_context(self, context) -> None:
        from easyanimate.registry import pipeline_folder
        from easyanimate.runtime import configure_environment

        configure_environment()
        if not hasattr(self, "defaults"):  # pickled by an earlier version of this class, before its settings
            EasyAnimatePyfunc.__init__(self)
        if not hasattr(self, "family"):  # pickled before V5.1 models were served: a native model
            self.family, self.v51 = NATIVE, None
        source = context.artifacts.get("pipeline") or getattr(self, "base_model_uri", None)
        if not source:
            raise ValueError("the model has neither a 'pipeline' artifact nor a base_model_uri")
        folder = pipeline_folder(source)
        held = folder_family(folder)
        if held != self.family:
            raise ValueError(f"{source} holds a {held} pipeline, but this model was logged as family {self.family!r}")
        self.has_lora = "lora" in context.artifacts
        if self.family == V51:
            from easyanimate.families.v51 import load_v51_pipeline, pipeline_is_inpaint

            v = self.v51
            # The adapter goes in before the memory mode's hooks (load_v51_pipeline's order).
            self.pipe = load_v51_pipeline(
                folder,
                v["memory_mode"],
                dtype=v["dtype"],
                lora_dir=context.artifacts["lora"] if self.has_lora else None,
                lora_scale=self.lora_scale,
                tile_sample_min_size=v.get("tile_sample_min_size"),
                tile_sample_stride=v.get("tile_sample_stride"),
            )
            self.inpaint = pipeline_is_inpaint(self.pipe)
        else:
            from easyanimate.pipelines import EasyAnimatePipeline

            self.pipe = EasyAnimatePipeline.from_pretrained(folder)
            self.pipe.set_progress_bar_config(disable=True)
            self.inpaint = False
            if self.has_lora:
                self.pipe.load_lora_weights(context.artifacts["lora"], scale=self.lora_scale)
        # One request at a time: the adapter scale is pipeline state, and one generation already uses every core.
        self.lock = threading.Lock()

    @property
    def is_v51(self) -> bool:
        return getattr(self, "family", NATIVE) == V51

    def _default_frames(self) -> int:
        return self.v51["num_frames"] if self.is_v51 else self.defaults["num_frames"]

    # ------------------------------------------------------------------ request limits
    @property
    def limits(self) -> dict:
        """What one request may ask for (``LIMIT_FIELDS``): the logged ``generate`` settings, unless a server
        replaced them with ``set_limits``."""
        if getattr(self, "_limits", None) is None:
            self._limits = limits_of(self.defaults, num_frames=self.v51["num_frames"] if self.is_v51 else None)
        return self._limits

    def set_limits(self, generate) -> None:
        """Apply a ``GenerateConfig``'s request limits (the serving host's params) instead of the logged ones;
        requests keep the logged defaults, and an unset budget is sized by them."""
        frames = self.v51["num_frames"] if self.is_v51 else None
        self._limits = limits_of(generate.model_dump(mode="json"), self.defaults, num_frames=frames)

    # ------------------------------------------------------------------ request parsing
    def parse(self, row: dict) -> dict:
        """One request record -> validated generation settings; raises ``bad_request`` naming the field."""
        unknown = sorted(set(row) - set(REQUEST_FIELDS))
        if unknown:
            raise bad_request(f"unknown request field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}")
        d = self.defaults
        v51 = self.is_v51
        req = {
            "negative_prompt": (self.v51["negative_prompt"] or d["negative_prompt"]) if v51 else d["negative_prompt"],
            "num_frames": self._default_frames(),
            "height": d["height"],
            "width": d["width"],
            "steps": d["num_inference_steps"],
            "guidance_scale": d["guidance_scale"],
            "seed": d["seed"],
            "fps": d["fps"],
            "lora_scale": self.lora_scale,
            "image": None,
            "end_image": None,
        }
        images = {}
        for key, value in row.items():
            if _missing(value):
                continue
            if key in IMAGE_FIELDS:
                images[key] = value  # decoded below, once the model is known to take images
                continue
            if key in TEXT_FIELDS:
                if not isinstance(value, str):
                    raise bad_request(f"{key} must be a string, got {value!r}")
                req[key] = value
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise bad_request(f"{key} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise bad_request(f"{key} must be finite, got {value!r}")
            if key in INT_FIELDS:
                if number != int(number):
                    raise bad_request(f"{key} must be a whole number, got {value!r}")
                number = int(number)
            req[key] = number
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_request("prompt must be a non-empty string")
        if images:
            given = " and ".join(k for k in IMAGE_FIELDS if k in images)
            if not v51:
                raise bad_request(
                    f"{given} given, but this is a native EasyAnimate model: text-to-video only. Image-to-video "
                    "needs an EasyAnimate V5.1 InP model"
                )
            if not getattr(self, "inpaint", False):
                raise bad_request(
                    f"{given} given, but this model is text-to-video (a V5.1 checkpoint without the inpaint "
                    "condition): image-to-video needs a V5.1 InP checkpoint"
                )
            if "end_image" in images and "image" not in images:
                raise bad_request("end_image needs image (the start frame)")
        lim = self.limits
        limits = {
            "height": (1, lim["max_side"]),
            "width": (1, lim["max_side"]),
            "num_frames": (1, lim["max_frames"]),
            "steps": (1, lim["max_inference_steps"]),
            "fps": (1, math.inf),
            "seed": (0, torch_seed_max),
        }
        for key, (lo, hi) in limits.items():
            if not lo <= req[key] <= hi:
                raise bad_request(f"{key}={req[key]} is out of range [{lo}, {hi}]")
        if req["guidance_scale"] < 1:
            raise bad_request(f"guidance_scale must be >= 1, got {req['guidance_scale']}")
        if req["lora_scale"] != self.lora_scale and not self.has_lora:
            raise bad_request("lora_scale given, but this model has no LoRA adapter")
        if req["lora_scale"] < 0:
            raise bad_request(f"lora_scale must be >= 0, got {req['lora_scale']}")
        if v51:
            from easyanimate.families.v51 import V51Error, check_v51_request

            try:  # geometry the MagViT VAE and the transformer's patches accept (1 + 4k frames, size multiples)
                check_v51_request(self.pipe, req["num_frames"], req["height"], req["width"])
            except V51Error as exc:
                raise bad_request(str(exc)) from None
            if "end_image" in images and req["num_frames"] < 2:
                raise bad_request(f"end_image needs num_frames > 1, got {req['num_frames']}")
            for key, value in images.items():
                req[key] = decode_image(key, value)
        else:
            try:  # geometry the VAE and DiT accept (frame counts, size multiples)
                self.pipe.check_inputs(
                    prompt, req["negative_prompt"] or None, req["num_frames"], req["height"], req["width"]
                )
            except ValueError as exc:
                raise bad_request(str(exc)) from None
        return req

    def check_request(self, rows: list[dict]) -> list[dict]:
        """A whole request's records -> validated settings, within the records limit and the work budget;
        raises ``bad_request`` naming the limit and its setting. Validates all before any time is spent."""
        lim = self.limits
        if not rows:
            raise bad_request("the request holds no records")
        if len(rows) > lim["max_records_per_request"]:
            raise bad_request(
                f"{len(rows)} records in one request; this server takes at most {lim['max_records_per_request']} "
                "(generate.max_records_per_request): send them in several requests"
            )
        requests = [self.parse(dict(row)) for row in rows]
        work = sum(request_work(req) for req in requests)
        if work > lim["max_request_budget"]:
            terms = " + ".join(
                f"{r['num_frames']} frames x {r['height']}x{r['width']} x {r['steps']} steps" for r in requests[:4]
            )
            more = f" + {len(requests) - 4} more" if len(requests) > 4 else ""
            raise bad_request(
                f"request work {terms}{more} = {work:,} (frames x height x width x steps) is over this server's "
                f"budget of {lim['max_request_budget']:,} (generate.max_request_budget): lower the frames, size, "
                "steps or records"
            )
        return requests

    # ------------------------------------------------------------------ inference
    def generate(
        self,
        requests: list[dict],
        should_stop: StopCheck | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[dict]:
        """Videos for ``check_request``'s output, one at a time under the model's lock.

        ``should_stop()`` is asked while waiting for the lock and after every denoising step (the pipeline's
        ``callback_on_step_end``); when it returns a message, ``GenerationStopped`` with it is raised and the
        lock is released. ``on_step(done, total)`` reports progress of the current video.
        """
        should_stop = should_stop or (lambda: None)
        steps_done = 0

        def check() -> None:
            message = should_stop()
            if message:
                raise GenerationStopped(message, steps_done)

        while not self.lock.acquire(timeout=LOCK_POLL_S):
            check()
        try:
            out = []
            for req in requests:
                check()

                def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
                    nonlocal steps_done
                    steps_done += 1
                    if on_step is not None:
                        on_step(step + 1, pipe.num_timesteps)
                    check()
                    return tensors

                video = self._video(req, on_step_end)
                out.append(
                    {
                        "video_mp4_base64": base64.b64encode(video).decode("ascii"),
                        "num_frames": req["num_frames"],
                        "height": req["height"],
                        "width": req["width"],
                        "fps": req["fps"],
                        "seed": req["seed"],
                    }
                )
            return out
        finally:
            self.lock.release()

    def _video(self, req: dict, on_step_end: Callable) -> bytes:
        """One parsed request record -> the mp4's bytes (under the lock)."""
        import torch

        if self.is_v51:
            from easyanimate.families.v51 import V51Error, generate_v51
            from easyanimate.pipelines.pipeline_easyanimate import encode_video

            v = self.v51
            try:
                frames = generate_v51(
                    self.pipe,
                    req["prompt"],
                    req["num_frames"],
                    req["height"],
                    req["width"],
                    req["steps"],
                    req["guidance_scale"],
                    req["seed"],
                    req.get("image"),
                    req.get("end_image"),
                    negative_prompt=req["negative_prompt"],
                    max_sequence_length=v["max_sequence_length"],
                    noise_aug_strength=v["noise_aug_strength"],
                    lora_scale=req["lora_scale"] if self.has_lora else None,
                    callback_on_step_end=on_step_end,
                )
            except V51Error as exc:  # parse checked the request; this is a last line, still the client's
                raise bad_request(str(exc)) from None
            return encode_video(frames, "mp4", req["fps"])
        if self.has_lora:
            self.pipe.set_lora_scale(req["lora_scale"])
        return self.pipe(
            req["prompt"],
            negative_prompt=req["negative_prompt"] or None,
            num_frames=req["num_frames"],
            height=req["height"],
            width=req["width"],
            num_inference_steps=req["steps"],
            guidance_scale=req["guidance_scale"],
            generator=torch.Generator().manual_seed(req["seed"]),
            output_type="mp4",
            fps=req["fps"],
            max_text_tokens=self.max_text_tokens,
            callback_on_step_end=on_step_end,
        ).frames[0]

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

        if hasattr(model_input, "to_dict"):
            rows = model_input.to_dict("records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = list(model_input)
        requests = self.check_request(rows)
        should_stop = None
        timeout = _serving_timeout_s()
        if timeout:
            # Inside `mlflow models serve`: MLflow answers 504 at its request timeout but cannot stop the work,
            # so the generation stops itself then and frees the model for the requests behind it.
            deadline = time.monotonic() + timeout

            def should_stop() -> str | None:
                if time.monotonic() >= deadline:
                    return (
                        f"request stopped at the scoring server's {timeout:g} s timeout "
                        "(mlflow models serve --timeout / MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)"
                    )
                return None

        try:
            out = self.generate(requests, should_stop)
        except GenerationStopped as exc:
            raise MlflowException(str(exc), error_code=DEADLINE_EXCEEDED) from None
        return pd.DataFrame(out)
