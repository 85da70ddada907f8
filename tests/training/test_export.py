"""training/export.py: the bundle a finished training leaves, written from a real config, EMA and
(run-less) tracker, and read back through model/'s loaders."""

from __future__ import annotations

import pytest

from model.bundle import read_bundle_config
from model.card import default_limits, load_card
from model.conditioning import ConditioningProbs
from model.dit import DiT, dit_config
from training.checkpoint import ParameterEMA
from training.config import ModelSection, TrainingConfig, TrainSection
from training.export import BUNDLE_DIR, export_bundle
from training.tracking import Tracker


def test_export_writes_the_card_of_what_the_run_trained(tmp_path):
    # Image-to-video and backward extension drawn; forward extension, connect and keyframes never.
    conditioning = ConditioningProbs(first_frame=0.2, first_k=0.0, last_k=0.1, both_ends=0.0, random=0.0, max_k=2)
    cfg = TrainingConfig(
        model=ModelSection(autoencoder="pixel", text_encoder="minilm", fps=8, num_frames=4, size="16x16", buckets=["2x32x16"]),
        train=TrainSection(text_dropout=0.0, conditioning=conditioning, timestep_shift=3.0),
    )
    dit_cfg = dit_config(cfg.model.preset, in_channels=48, text_dim=384, depth=1, hidden_size=32, num_heads=2)
    tracker = Tracker(cfg.mlflow, tmp_path)  # never started: logs nothing, as on a rank without the run
    export_bundle(ParameterEMA(DiT(dit_cfg), decay=0.9, zero3=False), dit_cfg, cfg, tmp_path, rank=0, tracker=tracker)

    config = read_bundle_config(tmp_path / BUNDLE_DIR)
    assert config.format_version == 1 and config.generation.guidance == 1.0  # no text dropout: guidance off
    card = load_card(tmp_path / BUNDLE_DIR)
    assert card.recorded and card.modes == ("text", "image", "extend-backward", "edit")
    assert card.shapes == tuple(cfg.model.bucket_shapes()) and card.max_k == 2 and card.null_text_trained is False
    assert card.limits == default_limits(cfg.model.bucket_shapes())
    assert card.limits.max_width > card.limits.max_height  # the 32-wide bucket counts
    card.check_mode("image", allow_untrained=False)
    with pytest.raises(ValueError, match="mode 'extend' was never trained for this model"):
        card.check_mode("extend", allow_untrained=False)
