"""``easyanimate`` command line. Heavy imports stay inside commands so ``--help`` is instant."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from easyanimate.runtime import configure_environment
from easyanimate.serving.cli import serve as _serve_command

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="EasyAnimate text-to-video: curate, train, evaluate, serve."
)
ParamsOpt = typer.Option(None, "--params", "-p", help="params file (default: params.yaml or $EASYANIMATE_PARAMS)")
WaitOpt = typer.Option(False, "--wait", help="queue behind a command that holds the workspace instead of failing")


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _settings(params: Optional[Path], preset: Optional[str] = None):
    from easyanimate.config import ConfigError, load_settings

    try:
        return load_settings(params, preset=preset)
    except ConfigError as exc:
        _fail(str(exc))


def _user_errors() -> tuple[type[Exception], ...]:
    """Failures with a one-line cause for the user: printed as such (rc 2), never as a traceback."""
    from easyanimate.data.manifest import UncaptionedClips
    from easyanimate.stage_api import StageFailed
    from easyanimate.tracking import TrackingUnavailable
    from easyanimate.utils import CorruptCheckpoint
    from easyanimate.workspace import WorkspaceBusy

    return (StageFailed, TrackingUnavailable, CorruptCheckpoint, WorkspaceBusy, UncaptionedClips)


@contextlib.contextmanager
def _writer(command: str, settings, wait: bool, flows: bool = True) -> Iterator[None]:
    """The workspace lock around a command that changes state, taken before anything opens the MLflow or
    Prefect databases; then a fast check that the tracking server answers and, for a command that runs Prefect
    flows, the workspace's Prefect server (started once, reused by later commands: ``prefect.server``)."""
    from easyanimate.prefect_server import PrefectServerError, ensure_workspace_server
    from easyanimate.tracking import check_tracking_server
    from easyanimate.workspace import workspace_lock

    errors = (*_user_errors(), PrefectServerError)
    try:
        with workspace_lock(command, wait=wait):
            check_tracking_server(settings)
            if flows:
                p = settings.prefect
                ensure_workspace_server(p.server, p.server_idle_s, p.start_timeout_s)
            yield
    except errors as exc:
        _fail(str(exc))


@app.callback()
def _main() -> None:
    configure_environment()


@app.command()
def stages(params: Optional[Path] = ParamsOpt) -> None:
    """List the stages of the pipeline (of the model.family in the params file) in order."""
    from easyanimate.stages import stages_for

    for spec in stages_for(_settings(params).model.family):
        typer.echo(
            f"{spec.name:12s} reads {', '.join(spec.deps) or '-':32s} writes {', '.join(spec.outs) or 'registry':12s} "
            f"{spec.description}"
        )


@app.command()
def config(params: Optional[Path] = ParamsOpt, preset: Optional[str] = typer.Option(None, help="tiny | paper")) -> None:
    """Validate the params file and print the effective settings."""
    typer.echo(json.dumps(_settings(params, preset).model_dump(mode="json"), indent=2))


@app.command()
def run(
    stage: str = typer.Argument(..., help="a stage name (see `easyanimate stages`)"),
    params: Optional[Path] = ParamsOpt,
    wait: bool = WaitOpt,
) -> None:
    """Run one stage as a versioned, cached Prefect task (this is what each ``dvc.yaml`` stage calls)."""
    from easyanimate.stages import STAGE_NAMES, stage_names_for

    settings = _settings(params)
    names = stage_names_for(settings.model.family)
    if stage not in names:
        other = " (a stage of another model.family)" if stage in STAGE_NAMES else ""
        _fail(f"unknown stage {stage!r}{other}; the {settings.model.family} stages are {', '.join(names)}")
    with _writer(f"easyanimate run {stage}", settings, wait):
        from flows.common import stage_flow

        result = stage_flow(stage, str(params) if params else None)
    typer.echo(json.dumps({"stage": stage, **result.get("metrics", {})}, indent=2, default=str))


@app.command("dvc-yaml")
def dvc_yaml(
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="params file DVC reads"),
    out: Path = typer.Option(Path("dvc.yaml"), help="file to write"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if OUT differs"),
) -> None:
    """Generate ``dvc.yaml`` from the stage specs (code deps derived from each stage's imports)."""
    from easyanimate.stages import dvc_yaml as generate
    from easyanimate.utils import atomic_write_text

    text = generate(params, Path.cwd())
    if check:
        if not out.exists() or out.read_text() != text:
            typer.secho(
                f"{out} is out of date with easyanimate/stages.py and {params}: run `easyanimate dvc-yaml`",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"{out} is up to date")
        return
    atomic_write_text(out, text)
    typer.echo(f"wrote {out}")


@app.command()
def pipeline(
    params: Optional[Path] = ParamsOpt,
    version_data: bool = typer.Option(True, help="dvc commit + push the outputs at the end"),
    wait: bool = WaitOpt,
) -> None:
    """Run the whole DAG as one Prefect flow with one parent MLflow run."""
    settings = _settings(params)
    with _writer("easyanimate pipeline", settings, wait):
        from flows.pipeline import pipeline_flow

        summary = pipeline_flow(str(params) if params else None, version_data=version_data)
    typer.secho(f"generated video:  {summary['generated_video']}", fg=typer.colors.GREEN)
    typer.secho(
        f"registered model: {summary['registered_model']}"
        + (
            f" (alias @{summary['alias']}: models:/{summary['registered_model'].split('/')[1]}@{summary['alias']})"
            if summary["alias"]
            else " (not promoted)"
        ),
        fg=typer.colors.GREEN,
    )


@app.command()
def curate(
    input_dir: Path = typer.Argument(..., exists=True, file_okay=False),
    output_dir: Path = typer.Argument(...),
    preset: Optional[str] = typer.Option(None, help="tiny | paper"),
    params: Optional[Path] = ParamsOpt,
    wait: bool = WaitOpt,
) -> None:
    """Curate a folder of videos into OUTPUT_DIR/manifest.parquet and OUTPUT_DIR/clips/."""
    settings = _settings(params, preset)
    with _writer(f"easyanimate curate {input_dir} {output_dir}", settings, wait):
        from flows.curate import curate_flow

        result = curate_flow(str(params) if params else None, str(input_dir), str(output_dir), preset=preset)
    typer.echo(json.dumps(result["metrics"], indent=2))
    typer.secho(f"manifest: {result['manifest']}  accepted clips: {result['accepted']}", fg=typer.colors.GREEN)
    if result.get("next_step"):  # e.g. clips kept without captions, and how to caption them
        typer.secho(result["next_step"], fg=typer.colors.YELLOW)


def resolve_pipeline_dir(model: str, settings) -> Path:
    """A pipeline folder, or a registry URI (``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``)."""
    from easyanimate.registry import pipeline_folder

    try:
        return pipeline_folder(model, settings.registry.tracking_uri)
    except FileNotFoundError as exc:
        _fail(str(exc))


@app.command()
def generate(
    prompt: str = typer.Argument(...),
    out: Path = typer.Option(..., "--out", "-o", help="output .mp4 or .gif"),
    model: Optional[str] = typer.Option(
        None,
        help="pipeline folder (native or V5.1) or models:/NAME@ALIAS; the family is read from it "
        "(default: paths.pipeline, or v51.model_dir when model.family is easyanimate-v5.1)",
    ),
    lora: Optional[str] = typer.Option(
        None,
        help="LoRA adapter: folder or .safetensors file written by the "
        "lora stage, or models:/NAME@ALIAS of a registered adapter",
    ),
    lora_scale: float = typer.Option(1.0, help="adapter strength (0 = base model)"),
    steps: Optional[int] = typer.Option(None, min=1, help="denoising steps (default: generate.num_inference_steps)"),
    seed: Optional[int] = typer.Option(None, min=0),
    frames: Optional[int] = typer.Option(
        None,
        min=1,
        help="native: 1, or a multiple of 4 >= 8 (default: generate.num_frames); V5.1: 1 + 4k (default: v51.num_frames)",
    ),
    height: Optional[int] = typer.Option(None, min=1, help="pixels, at most generate.max_side"),
    width: Optional[int] = typer.Option(None, min=1, help="pixels, at most generate.max_side"),
    guidance: Optional[float] = typer.Option(None, min=1.0),
    negative_prompt: Optional[str] = typer.Option(None),
    family: Optional[str] = typer.Option(
        None,
        help="native (this project's Slice VAE + DiT) | v5.1 (an EasyAnimate V5.1 diffusers folder) "
        "(default: the family --model holds, else model.family)",
    ),
    image: Optional[Path] = typer.Option(
        None, exists=True, dir_okay=False, help="start frame: image-to-video (V5.1 InP checkpoints)"
    ),
    end_image: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="end frame (with --image)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Generate a video for PROMPT with a trained pipeline, or with a released EasyAnimate V5.1 folder."""
    from easyanimate.config import frame_count_problem, v51_frame_count_problem

    settings = _settings(params)
    g = settings.generate
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("mp4", "gif"):
        _fail(f"--out must end in .mp4 or .gif, got {out}")
    if family is not None and family not in ("native", "v5.1"):
        _fail(f"--family must be native or v5.1, got {family!r}")
    model_dir: Optional[Path] = None  # --model's folder (a registered model's, downloaded)
    if model:
        model_dir = resolve_pipeline_dir(model, settings) if model.startswith("models:/") else Path(model)
        # The family the folder holds (its model_index.json names diffusers' own V5.1 classes, or ours).
        from easyanimate.families import V51, folder_family

        held = {V51: "v5.1", None: None}.get(folder_family(model_dir), "native")
        if family is not None and held is not None and family != held:
            _fail(f"--model {model} holds a {held} model, not --family {family}: drop --family or pass --family {held}")
        family = family or held
    if family is None:
        family = "v5.1" if settings.model.family == "easyanimate-v5.1" else "native"
    # An explicit value is used as given (0 is refused by typer above, never replaced by the default).
    num_frames = (g.num_frames if family == "native" else settings.v51.num_frames) if frames is None else frames
    height = g.height if height is None else height
    width = g.width if width is None else width
    steps = g.num_inference_steps if steps is None else steps
    # The V5.1 rule is checked again on the loaded VAE.
    frame_rule = frame_count_problem if family == "native" else v51_frame_count_problem
    problem = frame_rule(num_frames, g.max_frames)
    if problem:
        _fail(f"--frames: {problem} (generate.max_frames)")
    for flag, value in (("--height", height), ("--width", width)):
        if value > g.max_side:
            _fail(f"{flag} {value} is above generate.max_side={g.max_side}")
    if steps > g.max_inference_steps:
        _fail(f"--steps {steps} is above generate.max_inference_steps={g.max_inference_steps}")
    if family == "v5.1":
        gen = {"height": height, "width": width, "num_inference_steps": steps}
        gen.update({k: v for k, v in (("seed", seed), ("guidance_scale", guidance)) if v is not None})
        if negative_prompt is not None:
            gen["negative_prompt"] = negative_prompt
        v51 = {"num_frames": num_frames, **({"model_dir": model_dir} if model_dir else {})}
        _generate_v51(settings, prompt, out, fmt, gen, v51, image, end_image, lora, lora_scale)
        return
    if image or end_image:
        _fail(
            "--image/--end-image need a V5.1 InP checkpoint (--family v5.1, or --model naming one): "
            "the native DiT is text-to-video"
        )
    import torch

    from easyanimate.pipelines import EasyAnimatePipeline
    from easyanimate.registry import lora_path

    pipe_dir = str(model_dir) if model_dir is not None else str(settings.paths.pipeline)
    pipe = EasyAnimatePipeline.from_pretrained(resolve_pipeline_dir(pipe_dir, settings))
    if lora:
        try:
            pipe.load_lora_weights(lora_path(lora, settings.registry.tracking_uri), scale=lora_scale)
        except (FileNotFoundError, ValueError) as exc:
            _fail(f"--lora {lora}: {exc}")
    try:
        result = pipe(
            prompt,
            negative_prompt=negative_prompt if negative_prompt is not None else (g.negative_prompt or None),
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=g.guidance_scale if guidance is None else guidance,
            generator=torch.Generator().manual_seed(g.seed if seed is None else seed),
            output_type=fmt,
            output_path=out,
            fps=g.fps,
            max_text_tokens=settings.dit.model.max_text_tokens,
        )
    except ValueError as exc:
        _fail(str(exc))
    typer.secho(
        f"wrote {result.frames[0]} ({num_frames} frames, {width}x{height})",
        fg=typer.colors.GREEN,
    )


def _generate_v51(settings, prompt, out, fmt, gen, v51, image, end_image, lora, lora_scale) -> None:
    from easyanimate.families.v51 import LORA_WEIGHTS_NAME, V51Error, generate_v51_from_settings
    from easyanimate.pipelines.pipeline_easyanimate import encode_video
    from easyanimate.registry import lora_path
    from easyanimate.utils import atomic_write_bytes

    if lora:  # a folder, its weights file, or models:/NAME@ALIAS of a registered adapter (downloaded)
        try:
            lora_dir = lora_path(lora, settings.registry.tracking_uri)
        except (FileNotFoundError, ValueError) as exc:
            _fail(f"--lora {lora}: {exc}")
        if lora_dir.is_file():
            if lora_dir.name != LORA_WEIGHTS_NAME:
                _fail(
                    f"--lora {lora}: a V5.1 adapter is a folder holding {LORA_WEIGHTS_NAME} (as save_v51_lora writes)"
                )
            lora_dir = lora_dir.parent
        lora = lora_dir

    settings = settings.model_copy(
        update={
            "generate": settings.generate.model_copy(update=gen),
            "v51": settings.v51.model_copy(update=v51),
        }
    )
    if settings.v51.model_dir is None:
        _fail("--family v5.1 needs a V5.1 folder: pass --model DIR or set v51.model_dir in params.yaml")
    try:
        [video] = generate_v51_from_settings(
            settings, [prompt], image, end_image, lora_dir=lora, lora_scale=lora_scale if lora else None
        )
    except (V51Error, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    atomic_write_bytes(out, encode_video(video, fmt, settings.generate.fps))
    frames, height, width = video.shape[:3]
    typer.secho(f"wrote {out} ({frames} frames, {width}x{height}, EasyAnimate V5.1)", fg=typer.colors.GREEN)


@app.command()
def promote(
    version: Optional[str] = typer.Option(None, help="model version (default: the latest)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="decide and print; change no alias or tag"),
    params: Optional[Path] = ParamsOpt,
    wait: bool = WaitOpt,
) -> None:
    """Gated promotion: VERSION becomes champion only if its gates passed and it beats the champion by the
    margins in registry.promotion (the register stage runs this after every registration)."""
    settings = _settings(params)
    from easyanimate.registry import promote_version

    with _writer("easyanimate promote", settings, wait, flows=False):
        try:
            outcome = promote_version(settings, version, dry_run=dry_run)
        except (LookupError, FileNotFoundError) as exc:
            _fail(str(exc))
    typer.echo(outcome["markdown"])
    colour = typer.colors.GREEN if outcome["promoted"] else typer.colors.YELLOW
    typer.secho(
        f"{'[dry run] ' if dry_run else ''}models:/{outcome['model']}/{outcome['version']} "
        f"{outcome['decision']}: {outcome['reason']} (champion: v{outcome['champion_after']})",
        fg=colour,
    )


@app.command()
def lineage(
    model: str = typer.Argument(..., help="models:/NAME/VERSION"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Where a registered version came from: data (DVC hash), git commit, params, parent checkpoints, runs."""
    import os

    settings = _settings(params)
    parts = model.removeprefix("models:/").split("/")
    if not model.startswith("models:/") or len(parts) != 2 or not parts[1].isdigit():
        _fail(f"{model!r} is not models:/NAME/VERSION")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from easyanimate.lineage import LINEAGE_FACTS, model_lineage
    from easyanimate.stages import STAGE_NAMES

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", settings.registry.tracking_uri))
    try:
        info = model_lineage(MlflowClient(), parts[0], parts[1])
    except MlflowException as exc:
        _fail(f"{model}: {exc.message}")
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.secho(f"{info['model']}  aliases: {', '.join(info['aliases']) or '-'}", bold=True)
    for key in LINEAGE_FACTS:
        typer.echo(f"  {key:22s} {info[key] or '-'}")
    typer.echo("  checkpoints:")
    for stage, ckpt in info["checkpoints"].items():
        typer.echo(
            f"    {stage:12s} {ckpt.get('path', '-')}  dvc {ckpt.get('dvc_hash', '-')}  "
            f"parent: {ckpt.get('parent') or '-'}"
        )
    typer.echo("  runs:")
    for stage in sorted(info["runs"], key=lambda s: STAGE_NAMES.index(s) if s in STAGE_NAMES else len(STAGE_NAMES)):
        run = info["runs"][stage]
        typer.echo(f"    {stage:12s} {run['run_id']}  {run.get('status', '')}")
    promotion = info["promotion"]
    if promotion:
        typer.echo(f"  promotion: {promotion.get('promotion.decision', '-')}: {promotion.get('promotion.reason', '-')}")


@app.command()
def studio(
    host: Optional[str] = typer.Option(None, help="interface to bind (default: studio.host, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default: studio.port)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Web page: generate with any registered model and LoRA, browse the curated data and the registry.

    Basic auth: put user:password in the variable named by studio.auth_env (EASYANIMATE_STUDIO_AUTH)."""
    settings = _settings(params)
    from easyanimate.studio.app import launch  # imports gradio

    try:
        launch(settings, host=host, port=port)
    except (ValueError, OSError) as exc:
        _fail(f"studio: {exc}")


# Bounded HTTP serving of a registered model (its module imports only typer until the command runs).
app.command("serve")(_serve_command)

vae_app = typer.Typer(no_args_is_help=True, help="Slice VAE tools.")
app.add_typer(vae_app, name="vae")


@vae_app.command("reconstruct")
def vae_reconstruct(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="input video"),
    dst: Path = typer.Argument(..., help="output .mp4"),
    model: Optional[Path] = typer.Option(None, help="VAE folder (default: paths.vae_stage2)"),
    frames: Optional[int] = typer.Option(None, help="at most this many frames (default: all)"),
    size: Optional[int] = typer.Option(None, help="short side in pixels (default: vae.stage2.resolution)"),
    fps: Optional[float] = typer.Option(None, help="sampling rate (default: vae.stage2.sample_fps)"),
    tile: bool = typer.Option(
        False,
        "--tile/--no-tile",
        help="overlapping spatial tiles of the model's tile_sample_size (bounded memory for large frames; approximate)",
    ),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Encode and decode a video through the Slice VAE (slice by slice, bounded memory)."""
    settings = _settings(params)
    model_dir = model or settings.paths.vae_stage2
    if not (Path(model_dir) / "config.json").exists():
        _fail(f"{model_dir} is not a saved VAE (no config.json); train it or pass --model")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from easyanimate.data.video_io import VideoError
    from easyanimate.models.vae import SliceVAE
    from easyanimate.models.vae.reconstruct import reconstruct_file

    vae = SliceVAE.from_pretrained(model_dir).eval()
    if tile:
        vae.enable_tiling()
    with Progress(
        TextColumn("[bold]vae reconstruct"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} slices"),
        TimeRemainingColumn(),
    ) as progress:
        bar = progress.add_task("slices", total=None)
        try:
            video = reconstruct_file(
                vae,
                src,
                dst,
                size or settings.vae.stage2.resolution,
                fps or settings.vae.stage2.sample_fps,
                frames,
                callback=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        except (ValueError, VideoError) as exc:
            _fail(str(exc))
    typer.secho(f"wrote {dst} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]})", fg=typer.colors.GREEN)


def main() -> None:
    """The ``easyanimate`` command: ``app`` plus a quick exit.

    Once the command has finished, the interpreter's own teardown of the module graph it imported (torch,
    Prefect, MLflow, great_expectations) takes ~2.5 s on 2 cores and does nothing the command needs: every file is
    closed and every run ended by then. So, after what a normal exit does for the program (non-daemon threads
    joined, ``atexit`` handlers run: Prefect drains its log and event workers, logging flushes), the process
    ends with ``os._exit``.
    """
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    _exit_without_teardown(code)


def _exit_without_teardown(code: int | str | None) -> None:
    import atexit
    import threading

    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs (there is no public way to run them)
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
