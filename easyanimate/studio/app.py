"""The ``easyanimate studio`` web page: Generate, Data and Models tabs (Gradio Blocks) over ``service.Studio``.

Everything is served from this process: Gradio's own bundled frontend, system fonts (no Google Fonts), analytics
off, no hub. Requests go through Gradio's queue (``studio.concurrency`` at a time); bad input is refused by the
event's validator, which puts the message next to the control.
"""

from __future__ import annotations

import json
import os
import random
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from easyanimate.config import Settings  # noqa: E402
from easyanimate.studio.service import FIELDS, MAX_THUMBNAILS, V51_SCHEDULER, InvalidRequest, Studio  # noqa: E402

# System font stacks: the default theme would fetch Google Fonts from the network.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)
SEED_RANDOM_MAX = 2**31 - 1
NO_LORA = ("none", "")


def _lora_choices(studio: Studio, model: str | None) -> list[tuple[str, str]]:
    return [NO_LORA, *((c.label, c.ref) for c in studio.loras(model))]


def _model_note(info) -> str:
    if info.family == "easyanimate-v5.1":
        return (
            f"EasyAnimate V5.1: sizes are the buckets it was fine-tuned in (from {info.trained_settings}); sides are "
            f"multiples of {info.multiple}; frame counts are 1 + 4k up to {info.max_frames}; its own flow-matching "
            "scheduler. "
            + (
                "An InP model: give a start image (and optionally an end image) for image-to-video."
                if info.image_to_video
                else "Text-to-video only (not an InP checkpoint)."
            )
        )
    return (
        f"Sizes are this model's trained aspect buckets (from {info.trained_settings}); sides are multiples of "
        f"{info.multiple}; frame counts are 1 or multiples of 4 from 8 to {info.max_frames}. "
        "Start/end images appear only for models that take them (EasyAnimate V5.1 InP)."
    )


def build_app(settings: Settings, studio: Studio | None = None) -> gr.Blocks:
    """The page for ``settings``; ``studio`` (the service) is made from them when not given."""
    studio = studio or Studio(settings)
    cfg = settings.studio
    models = studio.models()
    default = studio.default_model()
    info = None
    if default:
        try:
            info = studio.model_info(default)
        except ValueError:
            info = None
    d = info.defaults if info else {}
    g = settings.generate
    from easyanimate.schedulers import SCHEDULERS

    with gr.Blocks(title="EasyAnimate studio", analytics_enabled=False) as demo:
        gr.Markdown("## EasyAnimate studio")
        with gr.Tabs():
            # ------------------------------------------------------------------ Generate
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column(scale=5):
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", value=g.negative_prompt, elem_id="negative")
                        with gr.Row():
                            model = gr.Dropdown(
                                [(c.label, c.ref) for c in models],
                                value=default,
                                allow_custom_value=True,
                                label="Model",
                                info="a registry version, or type a pipeline folder",
                                elem_id="model",
                                scale=3,
                            )
                            lora = gr.Dropdown(
                                _lora_choices(studio, default),
                                value="",
                                allow_custom_value=True,
                                label="LoRA",
                                info="adapters trained on this model",
                                elem_id="lora",
                                scale=3,
                            )
                            lora_scale = gr.Slider(
                                0, 2, value=1.0, step=0.05, label="LoRA strength", elem_id="lora_scale", scale=2
                            )
                        with gr.Row():
                            scheduler = gr.Dropdown(
                                # Every family's names; the request check accepts those of the chosen model.
                                [*SCHEDULERS, V51_SCHEDULER],
                                value=d.get("scheduler", g.scheduler),
                                label="Scheduler",
                                elem_id="scheduler",
                            )
                            steps = gr.Number(
                                value=d.get("steps", g.num_inference_steps), precision=0, label="Steps", elem_id="steps"
                            )
                            guidance = gr.Number(
                                value=d.get("guidance_scale", g.guidance_scale), label="Guidance", elem_id="guidance"
                            )
                        with gr.Row():
                            size = gr.Dropdown(
                                info.size_labels if info else [],
                                value=info.size_labels[0] if info else None,
                                allow_custom_value=True,
                                label="Size (width x height)",
                                elem_id="size",
                            )
                            frames = gr.Dropdown(
                                [str(f) for f in info.frame_counts] if info else [],
                                value=str(d.get("num_frames", g.num_frames)),
                                allow_custom_value=True,
                                label="Frames",
                                elem_id="frames",
                            )
                            seed = gr.Number(value=g.seed, precision=0, label="Seed", elem_id="seed")
                        randomise = gr.Button("Randomise seed", elem_id="randomise", size="sm")
                        # Image-to-video inputs: shown only for a model that conditions on images (V5.1 InP).
                        with gr.Row(visible=bool(info and info.image_to_video)) as image_row:
                            start_image = gr.Image(type="filepath", label="Start image", elem_id="start_image")
                            end_image = gr.Image(type="filepath", label="End image", elem_id="end_image")
                        note = gr.Markdown(
                            _model_note(info) if info else "No model: run `make demo`.", elem_id="model_note"
                        )
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=4):
                        video = gr.Video(
                            label="Result", elem_id="result", autoplay=True, loop=True, interactive=False, height=320
                        )
                        params = gr.Code(
                            language="json",
                            wrap_lines=True,
                            label="Parameters (the command reruns it with easyanimate generate)",
                            elem_id="params",
                            interactive=False,
                        )
                        download = gr.File(label="Download", elem_id="download", interactive=False)
                history = gr.State([])
                gallery = gr.Gallery(label="This session", elem_id="history", columns=6, height=220)

            # ------------------------------------------------------------------ Data
            with gr.Tab("Data", id="data", elem_id="tab-data") as data_tab:
                reload_data = gr.Button("Reload", size="sm", elem_id="reload_data")
                counts = gr.Markdown(elem_id="data_counts")
                gate_link = gr.HTML(elem_id="gate_report")
                with gr.Row():
                    reasons = gr.Dataframe(label="Reject reasons", elem_id="reasons", interactive=False)
                    with gr.Column():
                        hist_score = gr.Dropdown([], label="Score", elem_id="hist_score")
                        hist = gr.BarPlot(
                            x="bin",
                            y="clips",
                            y_lim=[0, None],
                            x_title="bin (lower edge)",
                            elem_id="histogram",
                            label="Clips per bin",
                        )
                with gr.Row():
                    f_status = gr.Dropdown([], multiselect=True, label="Status", elem_id="f_status")
                    f_reason = gr.Dropdown([], multiselect=True, label="Reject reason", elem_id="f_reason")
                    f_source = gr.Dropdown([], multiselect=True, label="Source", elem_id="f_source")
                    f_score = gr.Dropdown([], label="Score range on", elem_id="f_score")
                    f_low = gr.Number(None, label="min", elem_id="f_low")
                    f_high = gr.Number(None, label="max", elem_id="f_high")
                clips = gr.Dataframe(label="Clips", elem_id="clips", interactive=False, max_height=360)
                shown = gr.State([])
                with gr.Row():
                    thumbs = gr.Gallery(
                        label="Middle frames (click to play)",
                        elem_id="thumbs",
                        columns=8,
                        allow_preview=False,
                        height=300,
                        scale=3,
                    )
                    with gr.Column(scale=2):
                        clip_video = gr.Video(
                            label="Clip", elem_id="clip_video", autoplay=True, interactive=False, height=300
                        )
                        clip_info = gr.Markdown(elem_id="clip_info")

            # ------------------------------------------------------------------ Models
            with gr.Tab("Models", id="models", elem_id="tab-models") as models_tab:
                reload_models = gr.Button("Reload", size="sm", elem_id="reload_models")
                versions = gr.Dataframe(label="Registered versions", elem_id="versions", interactive=False)
                metrics = gr.Dataframe(label="Evaluation metrics", elem_id="metrics", interactive=False)
                version_pick = gr.Dropdown([], label="Version", elem_id="version_pick")
                links = gr.Markdown(elem_id="mlflow_links")
                with gr.Row():
                    lineage = gr.Markdown(elem_id="lineage")
                    samples = gr.Gallery(label="Evaluation samples", elem_id="samples", columns=3, height=300)
                dry_run = gr.Button("Compare with champion (dry run)", elem_id="dry_run")
                dry_result = gr.Markdown(elem_id="dry_run_result")

        # ---------------------------------------------------------------------- Generate events
        inputs = [prompt, negative, model, lora, lora_scale, scheduler, steps, guidance, size, frames, seed]
        inputs += [start_image, end_image, history]

        def form(values) -> dict:
            return dict(zip(FIELDS, values))

        def validate(*values):
            try:
                studio.check_request(form(values))
                errors = {}
            except InvalidRequest as exc:
                errors = exc.errors
            checks = [gr.validate(key not in errors, errors.get(key, "")) for key in FIELDS]
            return [*checks, gr.validate(True, "")]  # the session history

        def generate(
            prompt_,
            negative_,
            model_,
            lora_,
            lora_scale_,
            scheduler_,
            steps_,
            guidance_,
            size_,
            frames_,
            seed_,
            start_,
            end_,
            history_,
            progress=gr.Progress(),
        ):
            values = (prompt_, negative_, model_, lora_, lora_scale_, scheduler_, steps_, guidance_, size_, frames_)
            values += (seed_, start_, end_)
            try:
                request = studio.check_request(form(values))
            except InvalidRequest as exc:  # the validator ran first; this is a race with a changed registry
                raise gr.Error(str(exc)) from None

            def report(done, total, what):
                progress((done, total), desc=what, unit="steps")

            try:
                result = studio.generate(request, report)
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                raise gr.Error(f"generation failed: {exc}") from None
            history_ = ([[str(result.video), result.caption]] + list(history_))[: cfg.max_results]
            return (
                str(result.video),
                json.dumps(result.params, indent=2),
                str(result.video),
                [tuple(item) for item in history_],
                history_,
            )

        go.click(
            generate,
            inputs,
            [video, params, download, gallery, history],
            validator=validate,
            concurrency_limit=cfg.concurrency,
            concurrency_id="generate",
        )
        randomise.click(lambda: random.randint(0, SEED_RANDOM_MAX), None, seed, queue=False)

        def on_model(ref):
            try:
                chosen = studio.model_info(ref)
            except ValueError:
                return [gr.skip()] * 6
            return (
                gr.Dropdown(choices=_lora_choices(studio, ref), value=""),
                gr.Dropdown(value=chosen.defaults["scheduler"]),
                gr.Dropdown(choices=chosen.size_labels, value=chosen.size_labels[0]),
                gr.Dropdown(choices=[str(f) for f in chosen.frame_counts], value=str(chosen.defaults["num_frames"])),
                gr.Row(visible=chosen.image_to_video),
                _model_note(chosen),
            )

        model.change(on_model, model, [lora, scheduler, size, frames, image_row, note], queue=False)

        def on_load():
            fresh = studio.models()
            return gr.Dropdown(choices=[(c.label, c.ref) for c in fresh], value=studio.default_model())

        demo.load(on_load, None, model, queue=False)

        # ---------------------------------------------------------------------- Data events
        def load_data():
            df = studio.manifest()
            if df is None:
                empty = gr.Dropdown(choices=[], value=None)
                message = f"No manifest at `{studio.manifest_path}`: run `easyanimate run curate`."
                return (message, "", None, empty, None, empty, empty, empty, empty)
            n = studio.status_counts(df)
            text = f"**{len(df)} clips** in `{studio.manifest_path}`: " + " · ".join(f"{k} {v}" for k, v in n.items())
            report = studio.gate_report()
            link = (
                f'<a href="/gradio_api/file={report}" target="_blank">great_expectations report (data gate)</a>'
                if report
                else "No great_expectations report in reports/curate/gate_report/."
            )
            scores = studio.score_columns(df)
            first = scores[0] if scores else None
            reasons_ = sorted({r if isinstance(r, str) else "(accepted)" for r in df["reject_reason"].tolist()})
            return (
                text,
                link,
                studio.reject_reasons(df),
                gr.Dropdown(choices=scores, value=first),
                studio.histogram(df, first) if first else None,
                gr.Dropdown(choices=list(n), value=[]),
                gr.Dropdown(choices=reasons_, value=[]),
                gr.Dropdown(choices=sorted(df["source"].dropna().unique().tolist()), value=[]),
                gr.Dropdown(choices=scores, value=None),
            )

        data_outputs = [counts, gate_link, reasons, hist_score, hist, f_status, f_reason, f_source, f_score]

        def on_hist(column):
            df = studio.manifest()
            return studio.histogram(df, column) if df is not None and column else None

        def refilter(statuses, reasons_, sources, score, low, high):
            df = studio.manifest()
            if df is None:
                return None, [], []
            view = studio.filter_clips(df, statuses, reasons_, sources, score, low, high)
            items, ids = [], []
            for _, row in view.head(MAX_THUMBNAILS).iterrows():
                thumb = studio.thumbnail(row)
                if thumb is not None:
                    items.append((str(thumb), f"{row['status']} · {row['source']} @ {float(row['start_s']):.1f}s"))
                    ids.append(str(row["clip_id"]))
            return studio.clip_table(view), items, ids

        filters = [f_status, f_reason, f_source, f_score, f_low, f_high]
        for trigger in (data_tab.select, reload_data.click):
            trigger(load_data, None, data_outputs).then(refilter, filters, [clips, thumbs, shown])
        hist_score.change(on_hist, hist_score, hist)
        gr.on([f.change for f in filters], refilter, filters, [clips, thumbs, shown])

        def play(ids, evt: gr.SelectData):
            df = studio.manifest()
            if df is None or evt.index is None or evt.index >= len(ids):
                return None, ""
            row = df[df["clip_id"] == ids[evt.index]].iloc[0]
            path, text = studio.clip_video(row)
            return (str(path) if path else None), text

        thumbs.select(play, shown, [clip_video, clip_info])

        def play_row(table, evt: gr.SelectData):
            df = studio.manifest()
            if df is None or not evt.index:
                return None, ""
            short = str(table.iloc[evt.index[0]]["clip_id"])
            row = df[df["clip_id"].str.startswith(short)].iloc[0]
            path, text = studio.clip_video(row)
            return (str(path) if path else None), text

        clips.select(play_row, clips, [clip_video, clip_info])

        # ---------------------------------------------------------------------- Models events
        def load_models():
            choices = [(c.label, c.ref) for c in studio.version_choices()]
            champion = studio.default_model()
            value = champion.rsplit("/", 1)[-1] if champion and champion.startswith("models:/") else None
            value = value or (choices[0][1] if choices else None)
            return studio.versions_table(), studio.metrics_table(), gr.Dropdown(choices=choices, value=value)

        def show_version(version):
            if not version:
                return "No registered version yet: run `make demo`.", [], ""
            text = studio.lineage_markdown(studio.lineage(version))
            return text, [str(p) for p in studio.sample_gifs(version)], studio.mlflow_links(version)

        for trigger in (models_tab.select, reload_models.click):
            trigger(load_models, None, [versions, metrics, version_pick]).then(
                show_version, version_pick, [lineage, samples, links]
            )
        version_pick.input(show_version, version_pick, [lineage, samples, links])

        def compare(version, progress=gr.Progress()):
            if not version:
                return "No version chosen."
            progress(0, desc="deciding (may re-evaluate a version on the current held-out set)")
            started = time.perf_counter()
            try:
                outcome = studio.promotion_dry_run(version)
            except (LookupError, FileNotFoundError, ValueError) as exc:
                return f"**Dry run failed:** {exc}"
            head = (
                f"**[dry run] v{outcome['version']} {outcome['decision']}**: {outcome['reason']} "
                f"(champion: v{outcome['champion_after']}; {time.perf_counter() - started:.1f} s)\n\n"
            )
            return head + outcome["markdown"]

        dry_run.click(compare, version_pick, dry_result, concurrency_limit=1, concurrency_id="dry_run")
    return demo


def auth_from_env(name: str | None) -> list[tuple[str, str]] | None:
    """Basic-auth credentials from the environment variable ``name``: ``user:password[,user2:password2]``."""
    value = os.environ.get(name or "", "").strip()
    if not value:
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"${name} must be user:password[,user:password], got an entry without both")
        pairs.append((user.strip(), password))
    return pairs


def launch(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    block: bool = True,
    studio: Studio | None = None,
) -> tuple[gr.Blocks, str]:
    """Serve the page (``studio.host``/``studio.port`` unless given); returns the app and its local URL.

    With ``block`` it serves until interrupted; without, it returns at once (tests stop it with ``demo.close()``).
    """
    cfg = settings.studio
    studio = studio or Studio(settings)
    demo = build_app(settings, studio)
    demo.queue(default_concurrency_limit=cfg.concurrency)
    demo.launch(
        server_name=host or cfg.host,
        server_port=port or cfg.port,
        auth=auth_from_env(cfg.auth_env),
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        theme=THEME,
        allowed_paths=studio.allowed_paths(),
        footer_links=["gradio", "settings"],
    )
    url = demo.local_url
    print(f"EasyAnimate studio: {url}", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url


__all__ = ["THEME", "auth_from_env", "build_app", "launch"]
