"""The inference bundle a finished training leaves in `<out>/bundle`: the EMA weights and what
`model/` needs to generate with them (DESIGN.md, "Checkpoints"), also logged to the MLflow run.
Its model card (model/card.py) records what this run trained: the conditioning modes, the buckets,
whether guidance's unconditional branch was trained, and the limits requests are checked against."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from model.card import CARD_KEY, card_entry
from model.dit import DiTConfig
from model.storage import config_hash
from training.checkpoint import ParameterEMA
from training.config import TrainingConfig, TrainSection

logger = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"


def export_bundle(
    ema: ParameterEMA, dit_cfg: DiTConfig, cfg: TrainingConfig, out: Path, rank: int, tracker: Any, prompt_style: dict[str, Any] | None = None
) -> None:
    """Rank 0 writes the inference bundle from the gathered EMA weights (collective gather first).
    `prompt_style`: a few training captions for prompt expansion (training/caption_sets.py)."""
    weights = ema.full_state_dict()
    if rank != 0:
        return
    from model.bundle import save_bundle

    bundle_dir = out / BUNDLE_DIR
    save_bundle(
        bundle_dir,
        weights,
        dit_cfg,
        autoencoder=cfg.model.autoencoder,
        text_encoder=cfg.model.text_encoder,
        fps=cfg.model.fps,
        num_frames=cfg.model.num_frames,
        width=cfg.model.width,
        height=cfg.model.height,
        extra={
            "config_hash": config_hash(cfg),
            "ema_decay": cfg.train.ema_decay,
            "generation": generation_defaults(cfg.train),
            CARD_KEY: card_entry(cfg.train.conditioning, cfg.train.text_dropout, cfg.model.bucket_shapes()),
            **({"prompt_style": prompt_style} if prompt_style else {}),
        },
    )
    tracker.log_artifacts(bundle_dir, "bundle")
    logger.info("inference bundle (EMA weights) in %s", bundle_dir)


def generation_defaults(train: TrainSection) -> dict[str, float]:
    """Sampling defaults the bundle records for `reelforge generate` and serving."""
    # Sampling must integrate the same shifted schedule the model was trained on.
    defaults = {"shift": train.timestep_shift}
    if train.text_dropout == 0:
        # Never trained on the null text, so classifier-free guidance would extrapolate towards an
        # unconditional prediction the model does not have: sample with the caption alone.
        defaults["guidance"] = 1.0
    return defaults
