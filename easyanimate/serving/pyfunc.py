"""MLflow ``pyfunc`` wrapper: a saved pipeline folder (and optionally a LoRA adapter) plus this class.

Request (``POST /invocations``, JSON): ``{"dataframe_records": [{"prompt": "...", ...}, ...]}``, one video per
record. Fields: ``prompt`` (required), ``negative_prompt``, ``num_frames``, ``height``, ``width``, ``steps``,
``guidance_scale``, ``seed``, ``fps``, ``lora_scale`` (models with an adapter only). Missing fields take the
defaults stored with the model (the ``generate`` settings it was logged with).

Response: ``{"predictions": [{"video_mp4_base64": "...", "num_frames": F, "height": H, "width": W, "fps": R,
"seed": S}, ...]}``. A bad request (empty prompt, unknown field, size or frame count out of range or not
supported by the VAE, more records than ``generate.max_records_per_request``, more work than
``generate.max_request_budget``: frames x height x width x steps summed over its records) is answered with
HTTP 400 and ``{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}``.

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
import math
import threading
import time
from typing import Callable

import mlflow.pyfunc

INT_FIELDS = ("num_frames", "height", "width", "steps", "seed", "fps")
FLOAT_FIELDS = ("guidance_scale", "lora_scale")
TEXT_FIELDS = ("prompt", "negative_prompt")
REQUEST_FIELDS = TEXT_FIELDS + INT_FIELDS + FLOAT_FIELDS
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


def _missing(value) -> bool:
    # Records with different keys become a DataFrame with NaN holes; a hole means "use the default".
    return value is None or (isinstance(value, float) and math.isnan(value))


def request_work(req: dict) -> int:
    """What a parsed request record costs, in the budget's unit: frames x height x width x steps."""
    return req["num_frames"] * req["height"] * req["width"] * req["steps"]


def limits_of(generate: dict, request_defaults: dict | None = None) -> dict:
    """The request limits (``LIMIT_FIELDS``, the budget resolved) of a dumped ``GenerateConfig``; settings an
    older model was logged without take today's defaults. An unset budget is room for
    ``max_records_per_request`` videos of ``request_defaults`` (a dumped ``GenerateConfig``; default: its own)."""
    from easyanimate.config import GenerateConfig

    def config(values: dict) -> GenerateConfig:
        return GenerateConfig.model_validate({k: v for k, v in values.items() if k in GenerateConfig.model_fields})

    limits = config(generate)
    if request_defaults is not None:
        sizes = config(request_defaults)
        limits = limits.model_copy(update={k: getattr(sizes, k) for k in DEFAULT_SIZE_FIELDS})
    return {**{k: getattr(limits, k) for k in LIMIT_FIELDS}, "max_request_budget": limits.request_budget}


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

    ``generate`` is a ``GenerateConfig`` (request defaults and limits); ``max_text_tokens`` the DiT's text
    length. Only plain values are stored, so the pickled model does not depend on the config classes.
    """

    def __init__(
        self,
        generate=None,
        max_text_tokens: int | None = None,
        base_model_uri: str | None = None,
        lora_scale: float = 0.0,
    ):
        from easyanimate.config import DiTModelConfig, GenerateConfig

        self.defaults = (generate or GenerateConfig()).model_dump(mode="json")
        self.max_text_tokens = max_text_tokens or DiTModelConfig().max_text_tokens
        self.base_model_uri = base_model_uri
        # The base model serves what evaluation checked (scale 0); a registered LoRA model its own default.
        self.lora_scale = lora_scale

    def load_context(self, context) -> None:
        from easyanimate.pipelines import EasyAnimatePipeline
        from easyanimate.registry import pipeline_folder
        from easyanimate.runtime import configure_environment

        configure_environment()
        if not hasattr(self, "defaults"):  # pickled by an earlier version of this class, before its settings
            EasyAnimatePyfunc.__init__(self)
        source = context.artifacts.get("pipeline") or getattr(self, "base_model_uri", None)
        if not source:
            raise ValueError("the model has neither a 'pipeline' artifact nor a base_model_uri")
        self.pipe = EasyAnimatePipeline.from_pretrained(pipeline_folder(source))
        self.pipe.set_progress_bar_config(disable=True)
        self.has_lora = "lora" in context.artifacts
        if self.has_lora:
            self.pipe.load_lora_weights(context.artifacts["lora"], scale=self.lora_scale)
        # One request at a time: the adapter scale is pipeline state, and one generation already uses every core.
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ request limits
    @property
    def limits(self) -> dict:
        """What one request may ask for (``LIMIT_FIELDS``): the logged ``generate`` settings, unless a server
        replaced them with ``set_limits``."""
        if getattr(self, "_limits", None) is None:
            self._limits = limits_of(self.defaults)
        return self._limits

    def set_limits(self, generate) -> None:
        """Apply a ``GenerateConfig``'s request limits (the serving host's params) instead of the logged ones;
        requests keep the logged defaults, and an unset budget is sized by them."""
        self._limits = limits_of(generate.model_dump(mode="json"), self.defaults)

    # ------------------------------------------------------------------ request parsing
    def parse(self, row: dict) -> dict:
        """One request record -> validated generation settings; raises ``bad_request`` naming the field."""
        unknown = sorted(set(row) - set(REQUEST_FIELDS))
        if unknown:
            raise bad_request(f"unknown request field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}")
        d = self.defaults
        req = {
            "negative_prompt": d["negative_prompt"],
            "num_frames": d["num_frames"],
            "height": d["height"],
            "width": d["width"],
            "steps": d["num_inference_steps"],
            "guidance_scale": d["guidance_scale"],
            "seed": d["seed"],
            "fps": d["fps"],
            "lora_scale": self.lora_scale,
        }
        for key, value in row.items():
            if _missing(value):
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
        import torch

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

                if self.has_lora:
                    self.pipe.set_lora_scale(req["lora_scale"])
                video = self.pipe(
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
