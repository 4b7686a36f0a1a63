"""Video probing, decoding and writing (PyAV to read, the imageio-ffmpeg binary to write).

There is no system ffmpeg; every encode goes through ``imageio_ffmpeg.get_ffmpeg_exe()``.
All writes are atomic (temp file in the destination folder + ``os.replace``) so a kill never
leaves a half-written clip that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import av
import cv2
import numpy as np

from easyanimate.utils import atomic_file

# Anything beyond 16K per side is a corrupt header or an attack, not footage.
_MAX_SIDE = 16384
_MIN_FRAMES = 2


class VideoError(Exception):
    """Unusable input. ``reason`` is a short machine-readable code stored in the manifest."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int
    duration_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def probe(path: str | Path) -> VideoInfo:
    """Read stream metadata; raise ``VideoError`` for anything a curator should quarantine."""
    path = Path(path)
    if not path.exists():
        raise VideoError("missing_file", str(path))
    if path.stat().st_size == 0:
        raise VideoError("empty_file", str(path))
    try:
        container = av.open(str(path))
    except Exception as exc:  # PyAV raises a zoo of FFmpeg error subclasses
        raise VideoError("not_a_video", f"{path.name}: {exc}") from None
    try:
        if not container.streams.video:
            raise VideoError("no_video_stream", path.name)
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height or width > _MAX_SIDE or height > _MAX_SIDE:
            raise VideoError("absurd_resolution", f"{width}x{height}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        num_frames = int(stream.frames or 0)
        if num_frames == 0 and fps > 0:
            num_frames = int(round(duration * fps))
        # Headers can lie (truncated files keep the original duration): make sure frames decode.
        decoded = 0
        try:
            for _ in container.decode(stream):
                decoded += 1
                if decoded >= _MIN_FRAMES:
                    break
        except Exception as exc:
            if decoded == 0:
                raise VideoError("unreadable", f"{path.name}: {exc}") from None
        if decoded < _MIN_FRAMES or num_frames < _MIN_FRAMES:
            raise VideoError("too_few_frames", f"{path.name}: {max(decoded, num_frames)} frame(s)")
        if fps <= 0 or duration <= 0:
            raise VideoError("unreadable", f"{path.name}: no usable fps/duration")
        return VideoInfo(int(width), int(height), fps, num_frames, duration)
    finally:
        container.close()


def resize_rgb(img: np.ndarray, size: tuple[int, int] | None, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Resize to ``size=(w, h)``; ``None`` or the same size returns ``img`` unchanged."""
    if size is None or (img.shape[1], img.shape[0]) == tuple(size):
        return img
    return cv2.resize(img, tuple(size), interpolation=interpolation)


# ------------------------------------------------------------------------------------ analysis frames
# Curation looks at every decoded frame (the scene detector) but keeps few of them, small. Converting each
# full-size frame to RGB and then shrinking it cost more than decoding it, so the curation pass shrinks the
# decoder's own YUV 4:2:0 planes (OpenCV INTER_AREA, luma and chroma separately: ~10x cheaper) and keeps them
# in that compact form (half the bytes of RGB); only frames a filter asks for become RGB. Other pixel formats
# (10-bit, 4:2:2, 4:4:4, odd sizes) take the plain path: full-size RGB, then the same resize.
_I420_FORMATS = {"yuv420p", "yuvj420p"}
# Colour spaces whose YUV -> RGB matrix is OpenCV's (BT.601, limited range): unspecified, BT470BG, SMPTE170M.
_CV2_COLORSPACES = {2, 5, 6}
_FULL_RANGE = 2  # AVCOL_RANGE_JPEG


def _i420_ok(frame, size: tuple[int, int] | None) -> bool:
    w, h = size or (frame.width, frame.height)
    return frame.format.name in _I420_FORMATS and not (frame.width % 2 or frame.height % 2) and not (w % 2 or h % 2)


def _plane(frame, i: int, w: int, h: int) -> np.ndarray:
    """Plane ``i`` of ``frame`` as a (h, w) uint8 view of the decoder's buffer (no copy; rows may be padded)."""
    plane = frame.planes[i]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w]


def _i420_views(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y (h, w), U and V (h/2, w/2) views into a contiguous I420 ``(h * 3 // 2, w)`` array (OpenCV's layout:
    the chroma planes follow the luma rows back to back, whatever h / 2's parity)."""
    h, w = array.shape[0] * 2 // 3, array.shape[1]
    flat, luma, chroma = array.reshape(-1), h * w, (h // 2) * (w // 2)
    u = flat[luma : luma + chroma].reshape(h // 2, w // 2)
    return array[:h], u, flat[luma + chroma :].reshape(h // 2, w // 2)


def _resize_i420(planes, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Y, U, V planes (4:2:0) -> one I420 array at ``size`` (even sides), each plane resized on its own."""
    w, h = size
    out = np.empty((h * 3 // 2, w), np.uint8)
    for src, dst in zip(planes, _i420_views(out)):
        if src.shape == dst.shape:
            dst[:] = src
        else:
            cv2.resize(src, (dst.shape[1], dst.shape[0]), dst=dst, interpolation=interpolation)
    return out


def analysis_frame(frame, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int] | None]:
    """A decoded frame at ``size=(w, h)`` in compact form, for ``analysis_rgb`` / ``analysis_bgr`` later.

    Returns ``(array, colour)``: for 4:2:0 sources the I420 planes as one ``(h * 3 // 2, w)`` array (INTER_AREA
    per plane) and ``colour = (colorspace, color_range)`` of the source; otherwise RGB ``(h, w, 3)`` (full-size
    RGB then ``resize_rgb``) and ``None``."""
    if not _i420_ok(frame, size):
        return resize_rgb(frame.to_ndarray(format="rgb24"), size), None
    fw, fh = frame.width, frame.height
    planes = (_plane(frame, 0, fw, fh), _plane(frame, 1, fw // 2, fh // 2), _plane(frame, 2, fw // 2, fh // 2))
    out = _resize_i420(planes, size or (fw, fh), cv2.INTER_AREA)
    full_range = frame.format.name == "yuvj420p" or frame.color_range == _FULL_RANGE
    return out, (int(frame.colorspace), _FULL_RANGE if full_range else int(frame.color_range))


def analysis_rgb(compact: tuple[np.ndarray, tuple[int, int] | None]) -> np.ndarray:
    """RGB ``(h, w, 3)`` of an ``analysis_frame``, converted with the source's colour matrix and range."""
    array, colour = compact
    if colour is None:
        return array
    colorspace, color_range = colour
    if colorspace in _CV2_COLORSPACES and color_range != _FULL_RANGE:
        return cv2.cvtColor(array, cv2.COLOR_YUV2RGB_I420)
    # BT.709, BT.2020, full range...: FFmpeg's swscale knows them all (costs more; only kept frames get here).
    small = av.VideoFrame.from_ndarray(array, format="yuv420p")
    small.colorspace, small.color_range = colorspace, color_range
    return small.to_ndarray(format="rgb24")


def analysis_bgr(compact: tuple[np.ndarray, tuple[int, int] | None], size: tuple[int, int]) -> np.ndarray:
    """BGR ``(h, w, 3)`` at ``size`` (bilinear) for the scene detector, which compares neighbouring frames' HSV:
    OpenCV's BT.601 matrix whatever the source's (a fixed colour cast cancels out of frame-to-frame changes)."""
    array, colour = compact
    if colour is None:
        return cv2.cvtColor(resize_rgb(array, size, cv2.INTER_LINEAR), cv2.COLOR_RGB2BGR)
    if size[0] % 2 or size[1] % 2:
        return resize_rgb(cv2.cvtColor(array, cv2.COLOR_YUV2BGR_I420), size, cv2.INTER_LINEAR)
    return cv2.cvtColor(_resize_i420(_i420_views(array), size, cv2.INTER_LINEAR), cv2.COLOR_YUV2BGR_I420)


def decode_frames(
    path: str | Path,
    start_s: float = 0.0,
    end_s: float | None = None,
    times: Sequence[float] | None = None,
    size: tuple[int, int] | None = None,
    analysis: bool = False,
) -> np.ndarray:
    """Decode RGB frames in one sequential pass.

    Without ``times``: every frame with ``start_s <= t < end_s``. With ``times`` (absolute seconds):
    the frame nearest each requested time, in the requested order, so one pass feeds every filter.
    ``size=(w, h)`` resizes. ``analysis=True`` converts as curation's scan does (``analysis_frame``), so a
    clip decoded on its own gets exactly the frames the scan would have handed it. Returns uint8 ``(T, H, W, 3)``.
    """

    def convert(frame) -> np.ndarray:
        if analysis:
            return analysis_rgb(analysis_frame(frame, size))
        return resize_rgb(frame.to_ndarray(format="rgb24"), size)

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise VideoError("not_a_video", f"{Path(path).name}: {exc}") from None
    try:
        if not container.streams.video:
            raise VideoError("no_video_stream", Path(path).name)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        lo = min(times) if times is not None and len(times) else start_s
        hi = max(times) if times is not None and len(times) else end_s
        if lo and lo > 1.0:
            # Seek lands on the keyframe at or before the target; decoding continues from there.
            container.seek(int((lo - 0.5) / stream.time_base), stream=stream, backward=True, any_frame=False)
        frames: list[np.ndarray] = []
        stamps: list[float] = []
        want = np.asarray(sorted(times), dtype=float) if times is not None else None
        # With ``times`` keep only the best candidate per request: memory stays O(len(times)).
        best: dict[int, tuple[float, np.ndarray]] = {}
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if want is not None:
                    if t > hi + 1.0:
                        break
                    near = np.nonzero(np.abs(want - t) < 1.0)[0]
                    if len(near) == 0:
                        continue
                    # Keep the undecoded-to-RGB frame; convert only the winners at the end.
                    for i in near:
                        d = abs(want[i] - t)
                        if i not in best or d < best[i][0]:
                            best[i] = (d, frame)
                    continue
                if t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s - 1e-6:
                    break
                frames.append(convert(frame))
                stamps.append(t)
        except av.error.FFmpegError as exc:
            # Truncated tails: keep what decoded, fail only when nothing did.
            if not frames and not best:
                raise VideoError("unreadable", f"{Path(path).name}: {exc}") from None
        if want is not None:
            if len(best) != len(want):
                # Requests past the last frame take the last decoded one.
                if not best:
                    raise VideoError("unreadable", f"{Path(path).name}: no frames near requested times")
                last = best[max(best)][1]
                for i in range(len(want)):
                    best.setdefault(i, (0.0, last))
            converted: dict[int, np.ndarray] = {}
            for _, fr in best.values():
                if id(fr) not in converted:
                    converted[id(fr)] = convert(fr)
            order = np.argsort(np.asarray(times, dtype=float), kind="stable")
            out = [None] * len(want)
            for rank, orig in enumerate(order):
                out[orig] = converted[id(best[rank][1])]
            return np.stack(out)
        if not frames:
            raise VideoError("unreadable", f"{Path(path).name}: no frames in [{start_s}, {end_s})")
        return np.stack(frames)
    finally:
        container.close()


def write_video(frames: np.ndarray, path: str | Path, fps: float, crf: int = 22, preset: str = "veryfast") -> Path:
    """Write uint8 ``(T, H, W, 3)`` RGB frames as H.264 mp4, atomically."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    with atomic_file(path) as tmp:
        # macro_block_size=1 keeps odd test sizes (e.g. 96x54) exact; yuv420p needs even sides.
        h, w = frames.shape[1:3]
        if h % 2 or w % 2:
            frames = frames[:, : h - h % 2, : w - w % 2]
        writer = imageio.get_writer(
            str(tmp),
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            macro_block_size=1,
            pixelformat="yuv420p",
            output_params=["-crf", str(crf), "-preset", preset],
            ffmpeg_log_level="error",
        )
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()
    return path


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def cut_clip(src: str | Path, dst: str | Path, start_s: float, end_s: float, encode_cfg) -> Path:
    """Re-encode ``[start_s, end_s)`` of ``src`` to ``dst`` (libx264, no audio), atomically.

    ``-ss`` after ``-i`` is frame-accurate (decodes from the start); putting it before ``-i`` too
    jumps near the target first so long sources stay cheap.
    """
    dst = Path(dst)
    with atomic_file(dst) as tmp:
        pre = max(0.0, start_s - 2.0)
        cmd = [
            ffmpeg_exe(),
            "-y",
            "-v",
            "error",
            "-ss",
            f"{pre:.3f}",
            "-i",
            str(src),
            "-ss",
            f"{start_s - pre:.3f}",
            "-t",
            f"{end_s - start_s:.3f}",
            "-an",
            "-c:v",
            encode_cfg.codec,
            "-crf",
            str(encode_cfg.crf),
            "-preset",
            encode_cfg.preset,
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            str(tmp),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VideoError("encode_failed", proc.stderr.strip()[-500:])
    return dst
