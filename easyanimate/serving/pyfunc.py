"""MLflow ``pyfunc`` wrapper: the registered model is a saved pipeline folder plus this class."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import mlflow.pyfunc


class EasyAnimatePyfunc(mlflow.pyfunc.PythonModel):
    """Input: rows with ``prompt`` and optional ``num_frames``, ``height``, ``width``, ``steps``, ``seed``,
    ``guidance_scale``. Output: one base64-encoded mp4 per row (column ``video_mp4_base64``)."""

    def load_context(self, context) -> None:
        from easyanimate.pipelines import EasyAnimatePipeline
        from easyanimate.runtime import configure_environment

        configure_environment()
        self.pipe = EasyAnimatePipeline.from_pretrained(context.artifacts["pipeline"])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from easyanimate.data.video_io import write_video

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        videos = []
        for row in rows:
            prompt = str(row.get("prompt") or "").strip()
            if not prompt:
                raise ValueError("prompt must be a non-empty string")
            generator = torch.Generator().manual_seed(int(row.get("seed", 0)))
            frames = self.pipe(
                prompt,
                num_frames=int(row.get("num_frames", 8)),
                height=int(row.get("height", 64)),
                width=int(row.get("width", 64)),
                num_inference_steps=int(row.get("steps", 20)),
                guidance_scale=float(row.get("guidance_scale", 4.0)),
                generator=generator,
                output_type="np",
            ).frames[0]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "video.mp4"
                write_video(frames, path, fps=int(row.get("fps", 8)))
                videos.append(base64.b64encode(path.read_bytes()).decode())
        return pd.DataFrame({"video_mp4_base64": videos})
