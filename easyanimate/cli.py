"""``easyanimate`` command line. Heavy imports stay inside commands so ``--help`` is instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from easyanimate.runtime import configure_environment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EasyAnimate text-to-video: curate, train, evaluate, serve.")
ParamsOpt = typer.Option(None, "--params", "-p", help="params file (default: params.yaml or $EASYANIMATE_PARAMS)")


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _settings(params: Optional[Path], preset: Optional[str] = None):
    from easyanimate.config import ConfigError, load_settings

    try:
        return load_settings(params, preset=preset)
    except ConfigError as exc:
        _fail(str(exc))


@app.callback()
def _main() -> None:
    configure_environment()


@app.command()
def stages() -> None:
    """List the pipeline's stages in order."""
    from easyanimate.stages import STAGES

    for spec in STAGES:
        typer.echo(f"{spec.name:12s} reads {', '.join(spec.deps) or '-':40s} writes {', '.join(spec.outs) or 'registry'}")


@app.command()
def config(params: Optional[Path] = ParamsOpt, preset: Optional[str] = typer.Option(None, help="tiny | paper")) -> None:
    """Validate the params file and print the effective settings."""
    typer.echo(json.dumps(_settings(params, preset).model_dump(mode="json"), indent=2))


@app.command()
def run(stage: str = typer.Argument(..., help="curate | vae_stage1 | vae_stage2 | dit_stage1 | dit_stage2 | "
                                              "dit_stage3 | lora | evaluate | register"),
        params: Optional[Path] = ParamsOpt) -> None:
    """Run one stage's Prefect flow (this is what each ``dvc.yaml`` stage calls)."""
    from easyanimate.stages import STAGE_NAMES

    if stage not in STAGE_NAMES:
        _fail(f"unknown stage {stage!r}; stages are {', '.join(STAGE_NAMES)}")
    settings = _settings(params)
    params_path = str(params) if params else None
    from easyanimate.stages import stage_version

    version = stage_version(stage, settings)
    if stage == "curate":
        from flows.curate import curate_flow

        result = curate_flow.with_options(version=version)(params_path)
    elif stage.startswith("vae_stage"):
        from flows.train_vae import train_vae_flow

        result = train_vae_flow.with_options(version=version)(int(stage[-1]), params_path)
    elif stage.startswith("dit_stage"):
        from flows.train_dit import train_dit_flow

        result = train_dit_flow.with_options(version=version)(int(stage[-1]), params_path)
    elif stage == "lora":
        from flows.lora import lora_flow

        result = lora_flow.with_options(version=version)(params_path)
    elif stage == "evaluate":
        from flows.evaluate import evaluate_flow

        result = evaluate_flow.with_options(version=version)(params_path)
    else:
        from flows.register import register_flow

        result = register_flow(params_path)
    metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
    typer.echo(json.dumps({"stage": stage, **{k: v for k, v in metrics.items()}}, indent=2, default=str))


@app.command()
def pipeline(params: Optional[Path] = ParamsOpt,
             version_data: bool = typer.Option(True, help="dvc commit + push the outputs at the end")) -> None:
    """Run the whole DAG as one Prefect flow with one parent MLflow run."""
    _settings(params)
    from flows.pipeline import pipeline_flow

    summary = pipeline_flow(str(params) if params else None, version_data=version_data)
    typer.secho(f"generated video:  {summary['generated_video']}", fg=typer.colors.GREEN)
    typer.secho(f"registered model: {summary['registered_model']}"
                + (f" (alias @{summary['alias']}: models:/{summary['registered_model'].split('/')[1]}@{summary['alias']})"
                   if summary["alias"] else " (not promoted)"), fg=typer.colors.GREEN)


@app.command()
def curate(input_dir: Path = typer.Argument(..., exists=True, file_okay=False),
           output_dir: Path = typer.Argument(...),
           preset: Optional[str] = typer.Option(None, help="tiny | paper"),
           params: Optional[Path] = ParamsOpt) -> None:
    """Curate a folder of videos into OUTPUT_DIR/manifest.parquet and OUTPUT_DIR/clips/."""
    _settings(params, preset)
    from flows.curate import curate_flow

    result = curate_flow(str(params) if params else None, str(input_dir), str(output_dir), preset=preset)
    typer.echo(json.dumps(result["metrics"], indent=2))
    typer.secho(f"manifest: {result['manifest']}  accepted clips: {result['accepted']}", fg=typer.colors.GREEN)


def resolve_pipeline_dir(model: str, settings) -> Path:
    """A pipeline folder, or a registry URI (``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``)."""
    if model.startswith("models:/"):
        import os

        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", settings.registry.tracking_uri))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        candidates = list(local.rglob("model_index.json"))
        if not candidates:
            _fail(f"{model} holds no pipeline folder")
        return candidates[0].parent
    path = Path(model)
    if not (path / "model_index.json").exists():
        _fail(f"{model} is not a pipeline folder (no model_index.json); run the pipeline or pass models:/NAME@ALIAS")
    return path


@app.command()
def generate(prompt: str = typer.Argument(...),
             out: Path = typer.Option(..., "--out", "-o", help="output .mp4 or .gif"),
             model: Optional[str] = typer.Option(None, help="pipeline folder or models:/NAME@ALIAS (default: paths.pipeline)"),
             lora: Optional[Path] = typer.Option(None, help="LoRA adapter folder"),
             lora_scale: float = typer.Option(1.0),
             steps: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
             frames: Optional[int] = typer.Option(None), height: Optional[int] = typer.Option(None),
             width: Optional[int] = typer.Option(None), guidance: Optional[float] = typer.Option(None),
             negative_prompt: Optional[str] = typer.Option(None),
             params: Optional[Path] = ParamsOpt) -> None:
    """Generate a video for PROMPT with a trained pipeline."""
    settings = _settings(params)
    g = settings.generate
    import torch

    from easyanimate.data.video_io import write_video
    from easyanimate.pipelines import EasyAnimatePipeline

    pipe = EasyAnimatePipeline.from_pretrained(resolve_pipeline_dir(model or str(settings.paths.pipeline), settings))
    if lora:
        pipe.load_lora_weights(lora, scale=lora_scale)
    try:
        result = pipe(prompt, negative_prompt=negative_prompt if negative_prompt is not None else (g.negative_prompt or None),
                      num_frames=frames or g.num_frames, height=height or g.height, width=width or g.width,
                      num_inference_steps=steps or g.num_inference_steps, guidance_scale=guidance or g.guidance_scale,
                      generator=torch.Generator().manual_seed(g.seed if seed is None else seed), output_type="np",
                      max_text_tokens=settings.dit.model.max_text_tokens)
    except ValueError as exc:
        _fail(str(exc))
    video = result.frames[0]
    if out.suffix.lower() == ".gif":
        import imageio.v3 as iio

        out.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(out, video, extension=".gif", duration=1000 / g.fps, loop=0)
    else:
        write_video(video, out, fps=g.fps)
    typer.secho(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]})", fg=typer.colors.GREEN)


if __name__ == "__main__":
    app()
