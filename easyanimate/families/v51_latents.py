"""The ``v51_latents`` stage: the latent cache the V5.1 fine-tune and its evaluation read.

Encoding with the released MagViT VAE and Qwen2-VL text encoder is the expensive, frozen part of fine-tuning, so it
runs once per dataset: each training and held-out clip (or each image/video of ``v51.data_dir``) is scaled to cover
the nearest ``v51.bucket_aspect_ratios`` bucket of ``train_height x train_width`` pixels, cut to its first 1 + 4k
frames (at most ``train_num_frames``, decoded at ``sample_fps``) and stored as its VAE posterior, its prompt embedding
and, for an InP checkpoint, its frame-1 inpaint condition. The fine-tune then loads only the transformer.

Layout: ``index.json`` (samples per split, the checkpoint's scaling factor and kind), ``empty_prompt.safetensors``
and ``<split>/<key>.safetensors`` (tensors ``mean``, ``std``, ``prompt_embeds``, optional ``inpaint_latents``; the
caption in the metadata).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from easyanimate.config import Settings
from easyanimate.data.buckets import BucketTable
from easyanimate.data.datasets import ClipFrames, load_clip_frames
from easyanimate.families.v51 import (
    LatentSample,
    V51Error,
    check_v51_folder,
    encode_prompts,
    encode_sample,
    load_v51_pipeline,
    pipeline_is_inpaint,
    sample_frames,
)
from easyanimate.stage_api import StageContext, StageResult, write_reports
from easyanimate.utils import atomic_directory, link_or_copy

SPLITS = ("train", "val")
INDEX = "index.json"
EMPTY_PROMPT = "empty_prompt.safetensors"


def buckets_for(settings: Settings) -> BucketTable:
    v = settings.v51
    side = int(math.sqrt(v.train_height * v.train_width))
    return BucketTable.build(side, v.bucket_aspect_ratios, 16)


def clips_by_split(settings: Settings, splits: tuple[str, ...] = SPLITS) -> dict[str, list[ClipFrames]]:
    """The decoded clips of each of ``splits`` at their buckets (``train``: ``v51.data_dir``'s instead, when set);
    only the splits asked for are decoded."""
    v = settings.v51
    buckets = buckets_for(settings)
    max_seconds = v.train_num_frames / v.sample_fps
    curated = settings.paths.curated

    def from_curated(split: str) -> list[ClipFrames]:
        if not (curated / "manifest.parquet").exists():
            return []
        return load_clip_frames(
            curated, split, v.train_height, v.sample_fps, max_seconds=max_seconds, square_crop=False, buckets=buckets
        )

    def decode(split: str) -> list[ClipFrames]:
        if split == "train" and v.data_dir is not None:
            from easyanimate.training.lora import load_style_folder

            if not Path(v.data_dir).is_dir():
                raise V51Error(f"v51.data_dir={v.data_dir} is not a folder of images/videos with <name>.txt captions")
            return load_style_folder(
                Path(v.data_dir), v.train_height, v.sample_fps, settings.curate.video_extensions, buckets
            )
        return from_curated(split)

    return {split: decode(split) for split in splits}


def _write_sample(path: Path, sample: LatentSample) -> None:
    from safetensors.torch import save_file

    tensors = {"mean": sample.mean, "std": sample.std, "prompt_embeds": sample.prompt_embeds}
    if sample.inpaint_latents is not None:
        tensors["inpaint_latents"] = sample.inpaint_latents
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"caption": sample.caption})


def load_latent_cache(folder: str | Path, split: str = "train") -> tuple[list[LatentSample], torch.Tensor, dict]:
    """``(samples of split, empty-prompt embedding, index)`` from a ``v51_latents`` folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder} is not a V5.1 latent cache (no {INDEX}): run the v51_latents stage")
    index = json.loads((folder / INDEX).read_text())
    samples = []
    for key in index["splits"].get(split, []):
        path = folder / split / f"{key}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            caption = (f.metadata() or {}).get("caption", "")
        t = load_file(str(path))
        samples.append(LatentSample(key, caption, t["mean"], t["std"], t["prompt_embeds"], t.get("inpaint_latents")))
    empty = load_file(str(folder / EMPTY_PROMPT))["prompt_embeds"]
    return samples, empty, index


def _encoder_id(model_dir: Path, dtype: str, max_sequence_length: int) -> str:
    """What the encoded tensors depend on besides the sample: the release's VAE/text-encoder files and settings."""
    digest = hashlib.sha256(f"{dtype}:{max_sequence_length}".encode())
    for sub in ("vae", "text_encoder", "tokenizer", "transformer"):  # transformer: in_channels (InP condition)
        for file in sorted((model_dir / sub).glob("*.json")):
            digest.update(file.read_bytes())
        for file in sorted((model_dir / sub).glob("*.safetensors")):
            stat = file.stat()  # weights are large: their size and mtime stand for their bytes
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _sample_digest(encoder_id: str, key: str, frames: np.ndarray, caption: str) -> str:
    digest = hashlib.sha256(encoder_id.encode())
    digest.update(f"{key}\0{caption}\0{frames.shape}".encode())
    digest.update(frames.tobytes())
    return digest.hexdigest()[:32]


def run_stage(settings: Settings, ctx: StageContext) -> StageResult:
    """Encode the clips into ``paths.v51_latents`` (resuming the samples a killed run already encoded)."""
    from safetensors.torch import save_file

    v = settings.v51
    folder = check_v51_folder(v.model_dir)
    if v.train_height % 16 or v.train_width % 16:
        raise V51Error(f"v51.train_height/train_width ({v.train_height}x{v.train_width}) must be multiples of 16")
    started = time.perf_counter()
    clips = clips_by_split(settings)
    if not clips["train"]:
        raise V51Error(
            "no training clips for the V5.1 fine-tune: the curated dataset has no accepted train clips"
            + (f" and v51.data_dir={v.data_dir} holds none" if v.data_dir else "")
        )
    pipe = load_v51_pipeline(folder, "none", dtype=v.dtype)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    prepared = {
        split: [
            (c.clip_id, sample_frames(c.frames.permute(0, 2, 3, 1).numpy(), v.train_num_frames), c.caption)
            for c in items
        ]
        for split, items in clips.items()
    }
    captions = [caption for items in prepared.values() for _, _, caption in items]
    texts = encode_prompts(pipe, captions, v.max_sequence_length)
    index: dict = {
        "model_dir": str(folder),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "latent_channels": int(pipe.vae.config.latent_channels),
        "inpaint": pipeline_is_inpaint(pipe),
        "splits": {},
        "shapes": {},
    }
    # Each encoded sample also lands in a content-addressed cache (its frames, caption and encoder), so a killed
    # run resumes where it stopped instead of encoding everything again; emptied once the folder is complete.
    cache = Path(ctx.checkpoint_dir)
    cache.mkdir(parents=True, exist_ok=True)
    encoder_id = _encoder_id(folder, v.dtype, v.max_sequence_length)
    reused = 0
    with atomic_directory(settings.paths.v51_latents) as tmp:
        for split, items in prepared.items():
            (tmp / split).mkdir()
            index["splits"][split] = []
            for key, frames, caption in items:
                frames = np.ascontiguousarray(frames)
                cached = cache / f"{_sample_digest(encoder_id, key, frames, caption)}.safetensors"
                if cached.is_file():
                    reused += 1
                else:
                    sample = encode_sample(pipe, key, frames, caption, texts[caption])
                    partial = cached.with_suffix(".tmp")
                    _write_sample(partial, sample)
                    partial.rename(cached)
                link_or_copy(str(cached), str(tmp / split / f"{key}.safetensors"))
                index["splits"][split].append(key)
                index["shapes"][key] = list(frames.shape[:3])  # frames, height, width
        save_file({"prompt_embeds": texts[""].contiguous()}, tmp / EMPTY_PROMPT)
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    shutil.rmtree(cache, ignore_errors=True)
    sizes = {tuple(s[1:]) for s in index["shapes"].values()}
    metrics = {
        "v51_latents/num_train": float(len(index["splits"]["train"])),
        "v51_latents/num_val": float(len(index["splits"]["val"])),
        "v51_latents/num_buckets": float(len(sizes)),
        "v51_latents/images": float(sum(1 for s in index["shapes"].values() if s[0] == 1)),
        "v51_latents/reused": float(reused),
        "v51_latents/seconds": time.perf_counter() - started,
    }
    write_reports(ctx.report_dir, metrics)
    print(
        f"v51_latents: {len(index['splits']['train'])} training and {len(index['splits']['val'])} held-out samples "
        f"in {len(sizes)} bucket(s) -> {settings.paths.v51_latents}"
    )
    return StageResult(
        "v51_latents", metrics, {"v51_latents": settings.paths.v51_latents}, info={"index": index["splits"]}
    )
