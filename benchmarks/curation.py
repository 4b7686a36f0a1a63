"""Curation cost relative to a plain decode: ``python benchmarks/curation.py VIDEO... [--preset tiny]``.

Prints, measured in this one process run:
- ratio = wall time of curation analysis (probe + scene split + transition + technical aesthetic + motion +
  dedup hashing, i.e. the single decode pass with every cheap filter; no clip encoding, OCR or captioning) /
  wall time of a plain full PyAV decode of the same videos. Each is timed ``--rounds`` times, alternating, and the
  fastest round of each is used, which damps noise from other processes on the machine. Also printed: the same
  ratio in process CPU seconds (all threads), which other processes on a shared machine disturb far less.
- the breakdown of the single pass (same rounds, fastest each): decode + shrinking every frame to the analysis
  size (``analysis_frame``), + the scene detector on every frame (``analysis_bgr`` + ``ContentDetector``); the
  rest of the curation figure is the filters, frame picking and bookkeeping.
- per-filter seconds per clip: each configured frame filter's ``score`` (text/OCR excluded: next line) on
  the frames it asks for, every planned clip, after the decode; filters that cannot run say why (e.g.
  ``alignment`` without CLIP weights). ``dedup`` is its per-clip hashing; the dataset-level decision is
  ``benchmarks/dedup_index.py``.
- OCR seconds per clip (easyocr detection on each clip's middle frame, weights from ``weights.ocr``).
- captioning seconds per clip: the ``vlm`` captioner on ``caption.num_frames`` frames per clip, batched
  as in curation. Uses ``weights.captioner`` when set; otherwise a tiny randomly initialised BLIP
  (measures the code path only, say so when quoting the figure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from easyanimate.config import load_settings
from easyanimate.data.captioners import CaptionRequest
from easyanimate.data.captioners.sidecar import SidecarCaptioner
from easyanimate.data.curate import Curator, analyse_video, resolve_device
from easyanimate.data.filters.base import uniform_times
from easyanimate.data.manifest import file_hash
from easyanimate.data.scenes import scan_video
from easyanimate.data.video_io import analysis_bgr, analysis_frame, probe


class Clock:
    """Wall and process-CPU seconds of a block (``with Clock() as c: ...``, then ``c.wall``, ``c.cpu``)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def plain_decode(videos: list[Path]) -> Clock:
    with Clock() as clock:
        for video in videos:
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for _ in container.decode(stream):
                    pass
    return clock


def partial_pass(videos: list[Path], settings, detect: bool) -> float:
    """Decode + shrink every frame to the analysis size (+ the scene detector on each when ``detect``)."""
    from scenedetect import ContentDetector, FrameTimecode
    from scenedetect.common import Timecode

    from easyanimate.data.scenes import detector_size

    curator = Curator(settings)
    t0 = time.perf_counter()
    for video in videos:
        info = probe(video)
        size = curator.analysis_size(info)
        det_size = min(detector_size(info.width, info.height), detector_size(*(size or (info.width, info.height))))
        detector = ContentDetector(threshold=settings.curate.scenes.threshold)
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                compact = analysis_frame(frame, size)
                if detect:
                    tc = FrameTimecode(Timecode(pts=frame.pts, time_base=stream.time_base), fps=stream.average_rate)
                    detector.process_frame(tc, analysis_bgr(compact, det_size))
    return time.perf_counter() - t0


def curation_analysis(videos: list[Path], settings, hashes: dict) -> tuple[Clock, list[dict]]:
    # An empty sidecar: captioning costs nothing and every clip still gets every cheap-filter score.
    captioner = SidecarCaptioner([])
    with Clock() as clock:
        records = [r for v in videos for r in analyse_video(v, hashes[v], settings, captioner)]
    return clock, records


def clip_frames(videos: list[Path], settings) -> list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """(middle frame, caption frames, each active filter's frames) of every planned clip, one pass per video."""
    out = []
    curator, n = Curator(settings), settings.curate.caption.num_frames

    for video in videos:
        info = probe(video)

        def times(plan, info=info):
            mine = [(plan.start_s + plan.end_s) / 2, *uniform_times(plan.start_s, plan.end_s, n)]
            return mine + curator.samples(plan, info).times()

        def on_clip(plan, fr, info=info):
            out.append((fr[0], fr[1 : 1 + n], curator.samples(plan, info).split(fr[1 + n :])))

        scan_video(video, info, settings.curate.scenes, curator.analysis_size(info), times_for=times, on_clip=on_clip)
    return out


def filter_seconds(frames, settings) -> None:
    """Seconds per clip of each configured frame filter's ``score``, on the frames the single pass handed it."""
    curator = Curator(settings)
    curator.setup()
    for f in curator.filters:
        if f.skip_reason:
            print(f"filter {f.name}: skipped ({f.skip_reason})")
            continue
        if f.needs_caption:
            print(f"filter {f.name}: scored after captioning; not timed here")
            continue
        t0 = time.perf_counter()
        for _, _, groups in frames:
            f.score(groups[f.name])
        print(
            f"filter {f.name}: {(time.perf_counter() - t0) / len(frames) * 1000:.1f} ms/clip over {len(frames)} clips"
        )


def tiny_blip(folder: Path) -> Path:
    """The tests' tiny random BLIP (``tests/test_curation_weights.py``; needs the test extra)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_curation_weights import build_tiny_blip

    return build_tiny_blip(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="+", type=Path)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base = load_settings(args.params, preset=args.preset)
    curate = base.curate.model_copy(
        update={
            "aesthetic": base.curate.aesthetic.model_copy(update={"scorer": "technical"}),
            "text": base.curate.text.model_copy(update={"enabled": False}),
            "caption": base.curate.caption.model_copy(update={"captioner": "sidecar"}),
        }
    )
    settings = base.model_copy(update={"curate": curate})
    hashes = {v: file_hash(v) for v in args.videos}

    decode_s, curate_s, shrink_s, detect_s, decode_cpu, curate_cpu, records = [], [], [], [], [], [], []
    for _ in range(args.rounds):
        clock = plain_decode(args.videos)
        decode_s.append(clock.wall)
        decode_cpu.append(clock.cpu)
        clock, records = curation_analysis(args.videos, settings, hashes)
        curate_s.append(clock.wall)
        curate_cpu.append(clock.cpu)
        shrink_s.append(partial_pass(args.videos, settings, detect=False))
        detect_s.append(partial_pass(args.videos, settings, detect=True))
    clips = [r for r in records if r["aesthetic"] is not None]
    print(f"videos: {', '.join(v.name for v in args.videos)}")
    print(
        f"plain decode: {min(decode_s):.2f} s   curation analysis: {min(curate_s):.2f} s   "
        f"({len(records)} clip plans, {len(clips)} scored)"
    )
    print(
        f"ratio curation/decode: {min(curate_s) / min(decode_s):.2f}   (goal <= 2.0; rounds: "
        + ", ".join(f"{c / d:.2f}" for c, d in zip(curate_s, decode_s))
        + ")"
    )
    print(
        f"ratio in process CPU seconds: {min(curate_cpu) / min(decode_cpu):.2f}   "
        f"(decode {min(decode_cpu):.2f} s, curation {min(curate_cpu):.2f} s)"
    )

    d, sh, de, cu = min(decode_s), min(shrink_s), min(detect_s), min(curate_s)
    print(
        f"breakdown (fastest rounds, s): decode {d:.2f} | + shrink to analysis size {sh - d:+.2f} | "
        f"+ scene detector {de - sh:+.2f} | + filters, frame picks, bookkeeping {cu - de:+.2f} | = {cu:.2f}"
    )

    frames = clip_frames(args.videos, settings)
    if not frames:
        print("no clips planned: OCR/caption figures skipped")
        return
    filter_seconds(frames, settings)
    from easyanimate.data.filters.text import TextFilter

    device = resolve_device(base.curate.device)
    ocr = TextFilter(
        base.model_copy(
            update={
                "curate": base.curate.model_copy(update={"text": base.curate.text.model_copy(update={"enabled": True})})
            }
        )
    )
    ocr.setup(device)  # model load is a one-off, not a per-clip cost
    t0 = time.perf_counter()
    for middle, _, _ in frames:
        ocr.score(middle[None])
    print(f"OCR: {(time.perf_counter() - t0) / len(frames):.3f} s/clip over {len(frames)} clips")

    from easyanimate.data.captioners.vlm import VLMCaptioner

    vlm_cfg = base.curate.caption.model_copy(update={"captioner": "vlm"})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = (
            (base.weights.captioner, "weights.captioner")
            if base.weights.captioner
            else (tiny_blip(Path(tmp)), "tiny random BLIP: code path only, not a model figure")
        )
        vlm_settings = base.model_copy(
            update={
                "curate": base.curate.model_copy(update={"caption": vlm_cfg}),
                "weights": base.weights.model_copy(update={"captioner": str(model_dir)}),
            }
        )
        captioner = VLMCaptioner.from_settings(vlm_settings)
        captioner.setup(device)
        requests = [CaptionRequest("x", 0.0, 1.0, cap) for _, cap, _ in frames]
        t0 = time.perf_counter()
        captioner.caption_clips(requests)
        print(
            f"captioning: {(time.perf_counter() - t0) / len(frames):.3f} s/clip over {len(frames)} clips "
            f"({vlm_cfg.num_frames} frames/clip, batch {vlm_cfg.batch_size}; {label})"
        )


if __name__ == "__main__":
    main()
