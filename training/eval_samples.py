"""Eval samples during training: rank 0 generates each of `train.eval_prompts` with the EMA
weights every `train.eval_every_steps` and logs the MP4s to the MLflow run, so progress can be
watched, not only read off the loss."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from model.dit import DiTConfig
from training.checkpoint import ParameterEMA
from training.config import TrainingConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def log_eval_samples(
    ema: ParameterEMA,
    dit_cfg: DiTConfig,
    cfg: TrainingConfig,
    autoencoder: Any,
    text_encoder: Any,
    device: torch.device,
    rank: int,
    tracker: Any,
    step: int,
) -> None:
    """Rank 0 samples each of `train.eval_prompts` with the EMA weights at the reference bucket and
    logs the MP4s as samples/step-NNNNNN/<prompt slug>.mp4. The EMA gather is collective (ZeRO-3
    shards), so every rank calls this; only rank 0 samples."""
    weights = ema.full_state_dict()
    if rank == 0:
        _sample_eval_videos(weights, dit_cfg, cfg, autoencoder, text_encoder, device, tracker, step)
    if dist.is_initialized():
        # Other ranks wait here, inside the eval time, not in the next step's gradient all-reduce.
        dist.barrier()


def _sample_eval_videos(
    weights: dict[str, torch.Tensor],
    dit_cfg: DiTConfig,
    cfg: TrainingConfig,
    autoencoder: Any,
    text_encoder: Any,
    device: torch.device,
    tracker: Any,
    step: int,
) -> None:
    from model.dit import DiT
    from model.rectified_flow import sample
    from model.mp4 import write_mp4
    from model.video_io import from_model

    # A plain fp32 DiT on the EMA weights: the training engine's weights (and its ZeRO state) stay untouched.
    with torch.device("meta"):
        dit = DiT(dit_cfg)
    dit.load_state_dict({name: w.to(device) for name, w in weights.items()}, assign=True)
    dit.eval()
    num_latent = autoencoder.latent_frames(cfg.model.num_frames)
    sf = autoencoder.spatial_factor
    latent_shape = (1, autoencoder.latent_channels, num_latent, cfg.model.height // sf, cfg.model.width // sf)
    # Fixed noise per prompt (seeded by its position), so samples at different steps are comparable.
    for i, prompt in enumerate(cfg.train.eval_prompts):
        generator = torch.Generator().manual_seed(cfg.train.seed + i)
        noise = torch.randn(latent_shape, generator=generator).to(device)  # (1, C, T, H, W)
        text, text_mask = text_encoder.encode([prompt])  # (1, L, Dt), (1, L)
        latents = sample(
            dit, noise, text.to(device), text_mask.to(device),
            steps=cfg.train.eval_sampling_steps, guidance=cfg.train.eval_guidance, shift=cfg.train.timestep_shift,
        )  # fmt: skip
        frames = from_model(autoencoder.decode(latents)[:, :, : cfg.model.num_frames])  # (T, H, W, 3) uint8
        tracker.log_sample_video(write_mp4(frames, cfg.model.fps), prompt, step)
    logger.info("step %d: logged %d eval samples", step, len(cfg.train.eval_prompts))
