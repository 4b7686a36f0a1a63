"""MLflow ``pyfunc`` wrapper: a saved pipeline folder (and optionally a LoRA adapter) plus this class.

Request (``POST /invocations``, JSON): ``{"dataframe_records": [{"prompt": "...", ...}, ...]}``, one video per
record. Fields: ``prompt`` (required), ``negative_prompt``, ``num_frames``, ``height``, ``width``, ``steps``,
``guidance_scale``, ``seed``, ``fps``, ``lora_scale`` (models with an adapter only). Missing fields take the
defaults stored with the model (the ``generate`` settings it was logged with).

Response: ``{"predictions": [{"video_mp4_base64": "...", "num_frames": F, "height": H, "width": W, "fps": R,
"seed": S}, ...]}``. A bad request (empty prompt, unknown field, size or frame count out of range or not
supported by the VAE) is answered with HTTP 400 and ``{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}``.
"""

from __future__ import annotations

import base64
import math
import threading

import mlflow.pyfunc

INT_FIELDS = ("num_frames", "height", "width", "steps", "seed", "fps")
FLOAT_FIELDS = ("guidance_scale", "lora_scale")
TEXT_FIELDS = ("prompt", "negative_prompt")
REQUEST_FIELDS = TEXT_FIELDS + INT_FIELDS + FLOAT_FIELDS
torch_seed_max = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def bad_request(message: str) -> Exception:
    """The exception MLflow's scoring server turns into HTTP 400 with ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value) -> bool:
    # Records with different keys become a DataFrame with NaN holes; a hole means "use the default".
    return value is None or (isinstance(value, float) and math.isnan(value))


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
        limits = {
            "height": (1, d["max_side"]),
            "width": (1, d["max_side"]),
            "num_frames": (1, d["max_frames"]),
            "steps": (1, d["max_inference_steps"]),
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

    # ------------------------------------------------------------------ inference
    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        if hasattr(model_input, "to_dict"):
            rows = model_input.to_dict("records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = list(model_input)
        if not rows:
            raise bad_request("the request holds no records")
        requests = [self.parse(dict(row)) for row in rows]  # validate all before spending time on any
        out = []
        with self.lock:
            for req in requests:
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
        return pd.DataFrame(out)
