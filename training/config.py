"""Training's config group, `TrainingConfig`: sections `model`, `data`, `train`, `scaling`, `deepspeed`,
`checkpoint`, `registry`, `mlflow`.

`model/` stays free of pydantic and of these sections: the `model` section here only names
what to build (a preset from `model.dit.DIT_PRESETS`, an autoencoder, a text encoder), and
`training` turns it into the plain dataclass config that `model/` takes. One plain dataclass of
`model/` is used as it is, `model.conditioning.ConditioningProbs` (`train.conditioning`):
pydantic validates its fields, and its own checks run on construction.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.conditioning import ConditioningProbs


class Section(BaseModel):
    # The same two lines as pipelines.config.Section: pipelines/ and training/ may not import each
    # other, and model/ (below both) stays free of pydantic.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_BUCKET_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def parse_size(value: str) -> tuple[int, int]:
    """`"64x32"` -> (width 64, height 32)."""
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 32x32), got {value!r}")
    return int(match[1]), int(match[2])


def parse_bucket(value: str) -> tuple[int, int, int]:
    """`"16x64x32"` -> (16 frames, width 64, height 32)."""
    match = _BUCKET_RE.match(value)
    if not match:
        raise ValueError(f"bucket must look like FRAMESxWIDTHxHEIGHT (e.g. 8x32x32), got {value!r}")
    return int(match[1]), int(match[2]), int(match[3])


class ModelSection(Section):
    preset: Literal["tiny", "small", "base", "1b", "3b", "7b"] = "tiny"
    # "pixel" (lossless space-to-depth, no weights) or "<kind>:<local dir or hub id>",
    # kind one of wan | cogvideox | kl (see model/autoencoders.py).
    autoencoder: str = "pixel"
    # "minilm" (offline, bundled) or "t5:<dir or id>" / "clip:<dir or id>" (see model/text_encoders.py).
    text_encoder: str = "minilm"
    # Clips are resampled to this rate before frames are taken, so one latent frame always spans
    # the same time whatever the source fps.
    fps: float = Field(default=8.0, gt=0, le=120)
    # Pixel frames per training sample at `size`: the reference bucket. Must fit the autoencoder's
    # temporal factor (checked at launch, where the autoencoder is known).
    num_frames: int = Field(default=8, ge=1)
    # "WIDTHxHEIGHT" of the reference bucket; clips are scaled to cover it and center-cropped.
    size: str = "32x32"
    # Extra (frames, width, height) buckets "FxWxH": each clip goes to the largest bucket its duration
    # allows with the aspect ratio nearest its own, so mixed durations and shapes train without padding.
    # Empty: one bucket, `num_frames` x `size`. Batch size per bucket keeps tokens per batch ~constant.
    buckets: list[str] = Field(default_factory=list)
    # DiT spacetime patch (pt, ph, pw) in latent cells; None keeps the preset's (1, 2, 2). A token
    # carries C*pt*ph*pw numbers, which must stay well below the preset's width or the network cannot
    # carry the noise through: tiny (width 192) on the pixel autoencoder's 48 channels needs (1, 1, 1).
    patch_size: tuple[int, int, int] | None = None

    @field_validator("patch_size")
    @classmethod
    def _check_patch(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"model.patch_size {value} must be three positive ints (pt, ph, pw)")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[str]) -> list[str]:
        for bucket in value:
            parse_bucket(bucket)
        return value

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    def dit_overrides(self) -> dict[str, tuple[int, int, int]]:
        """Fields this section overrides in `model.dit.dit_config(preset, ...)`."""
        return {} if self.patch_size is None else {"patch_size": self.patch_size}

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """Every (frames, width, height) bucket, the reference one first, duplicates removed."""
        shapes = [(self.num_frames, self.width, self.height)]
        for bucket in self.buckets:
            shape = parse_bucket(bucket)
            if shape not in shapes:
                shapes.append(shape)
        return shapes


class TrainSection(Section):
    max_steps: int = Field(default=1000, ge=1)
    # Clips per worker per micro-step at the reference bucket; other buckets scale it so that
    # tokens per batch stay about the same (see training/data.py).
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-4, gt=0, lt=1)
    seed: int = 0
    # Linear warmup from 0, then cosine decay to lr * min_lr_ratio at max_steps.
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    # Micro-steps per optimizer step; a "step" everywhere (logs, checkpoints, max_steps) is an optimizer step.
    grad_accum_steps: int = Field(default=1, ge=1)
    # EMA of the weights that the exported bundle carries; 0 exports the raw weights.
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    # Probability of training on the null text (classifier-free guidance needs an unconditional model).
    text_dropout: float = Field(default=0.1, ge=0, le=1)
    # Per-sample probabilities of clean conditioning frames (image-to-video, extend, connect, ...).
    conditioning: ConditioningProbs = Field(default_factory=ConditioningProbs)
    # Timestep shift s (SD3's t' = s t / (1 + (s - 1) t)) for training AND sampling: the exported
    # bundle records it as `generation.shift`. None: model.rectified_flow.timestep_shift of each
    # batch's latent size, which is 1 below a 64x64-position latent; tiny low-variance latents (the
    # pixel autoencoder's) need far more noise than that to learn layout (see configs/train/tiny.yaml).
    timestep_shift: float | None = Field(default=None, gt=0)
    log_every_steps: int = Field(default=10, ge=1)
    # Every this many steps rank 0 samples `eval_prompts` with the EMA weights
    # and logs the MP4s to MLflow as samples/step-NNNNNN/<prompt>.mp4; 0 disables. Counted as eval
    # time, not step time.
    eval_every_steps: int = Field(default=500, ge=0)
    eval_prompts: list[str] = Field(
        default_factory=lambda: ["a red circle moving right on a dark blue background", "a person walking on a beach"]
    )
    # Euler steps per eval sample: few, since eval samples only need to show progress cheaply.
    eval_sampling_steps: int = Field(default=10, ge=1, le=1000)
    eval_guidance: float = Field(default=5.0, ge=0)
    # DataLoader processes per training worker (decode + resize run there).
    data_workers: int = Field(default=2, ge=0)
    # Caption embeddings kept per worker; a caption is encoded once while it stays in the cache.
    text_cache_size: int = Field(default=100_000, ge=0)
    # Append each step's clip indices to <out>/workers/samples-rank-R.jsonl (data-order debugging, tests).
    log_sample_ids: bool = False


class ScalingSection(Section):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    # Worker-group restarts Ray Train attempts (from the last checkpoint) before the run fails.
    max_failures: int = Field(default=2, ge=0)


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    # None: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slower than fp32 on most hosts).
    bf16: bool | None = None
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer states in host memory (CPU Adam)
    activation_checkpointing: bool = False  # recompute each DiT block in backward
    compile: bool = False  # torch.compile each DiT block (after checkpointing, before ZeRO)


class CheckpointSection(Section):
    every_steps: int = Field(default=500, ge=1)
    # Checkpoints Ray Train keeps (oldest deleted first); the last one always survives.
    num_to_keep: int = Field(default=2, ge=1)


class RegistrySection(Section):
    model_name: str = Field(default="reelforge-t2v", min_length=1)
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class MlflowSection(Section):
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store under the run's output folder.
    tracking_uri: str | None = None
    experiment: str = "reelforge"


class DataSection(Section):
    # Train on the captions of this caption set (SHARDS/captions/NAME, written by `reelforge
    # recaption`) instead of the shards' own; clips without a usable caption in it are skipped
    # and counted. None: the shards' own captions.
    caption_set: str | None = None
    # Fraction of clips kept out of training for `reelforge eval` and the promotion gate. Chosen per
    # clip by a hash of its id (training/clip_index.py `is_held_out`), so growing the data never moves a
    # trained clip into it; no minimum count: a small dataset may hold out none (the run says so).
    held_out: float = Field(default=0.01, ge=0, le=0.5)


class TrainingConfig(Section):
    """Everything `reelforge train` (and the worker loop it starts) reads."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())  # a field is named `model`

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    registry: RegistrySection = RegistrySection()
    mlflow: MlflowSection = MlflowSection()
