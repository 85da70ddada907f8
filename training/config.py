"""Config sections owned by training (`model`, `train`, `scaling`, `deepspeed`, `checkpoint`,
`registry`, `mlflow`).

`model/` stays free of pydantic and of these sections: the `model` section here only names
what to build (a preset from `model.dit.DIT_PRESETS`, an autoencoder, a text encoder), and
`training` turns it into the plain dataclass config that `model/` takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    preset: Literal["tiny", "small", "base", "1b", "3b", "7b"] = "tiny"
    # "pixel" (lossless space-to-depth, no weights) or "<kind>:<local dir or hub id>",
    # kind one of wan | cogvideox | kl (see model/autoencoders.py).
    autoencoder: str = "pixel"
    # "minilm" (offline, bundled) or "t5:<dir or id>" / "clip:<dir or id>" (see model/text_encoders.py).
    text_encoder: str = "minilm"


class TrainSection(Section):
    max_steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-4, gt=0, lt=1)
    seed: int = 0


class ScalingSection(Section):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0


class CheckpointSection(Section):
    every_steps: int = Field(default=500, ge=1)


class RegistrySection(Section):
    model_name: str = Field(default="reelforge-t2v", min_length=1)
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class MlflowSection(Section):
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store under the run's output folder.
    tracking_uri: str | None = None
    experiment: str = "reelforge"
