"""Config sections owned by the ingestion pipeline (`scenes`, `clips`, `filters`, `shards`, `caption`).

Each section is a pydantic model with `extra="forbid"`, so a misspelled key fails when the
config is loaded, before any footage is read. `infra.config.ReelforgeConfig` composes them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ScenesConfig(Section):
    detector: Literal["content", "adaptive", "threshold"] = "content"
    # None means the detector's own default (PySceneDetect: content 27, adaptive 3.0, threshold 12).
    threshold: float | None = Field(default=None, gt=0)
    # Detection runs on frames downscaled to this width: cuts are global events, and a
    # 256-px frame is ~30x cheaper to score than 1080p with the same cut positions.
    detect_width: int = Field(default=256, ge=32, le=1920)
    min_scene_seconds: float = Field(default=0.5, ge=0)


class ClipsConfig(Section):
    min_seconds: float = Field(default=2.0, gt=0)
    max_seconds: float = Field(default=10.0, gt=0)
    fps: float = Field(default=24.0, gt=0, le=120)
    # Output frame size "WxH": aspect-preserving resize, then center crop.
    size: str = "256x256"
    # Frames dropped at each end of a scene, so fades and dissolves stay out of clips.
    trim_seconds: float = Field(default=0.1, ge=0)

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"clips.size must look like WIDTHxHEIGHT (e.g. 256x256), got {value!r}")
        width, height = int(match[1]), int(match[2])
        if width % 2 or height % 2 or not (16 <= width <= 4096 and 16 <= height <= 4096):
            raise ValueError(f"clips.size {value!r}: width and height must be even and within 16..4096 (H.264 4:2:0)")
        return value

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    @model_validator(mode="after")
    def _check_range(self) -> "ClipsConfig":
        if self.min_seconds > self.max_seconds:
            raise ValueError(
                f"clips.min_seconds ({self.min_seconds}) must not exceed clips.max_seconds ({self.max_seconds})"
            )
        return self


class FiltersConfig(Section):
    # "filter" drops clips that fail a threshold; "score" keeps every clip and only records scores.
    mode: Literal["filter", "score"] = "filter"


class ShardsConfig(Section):
    target_mb: float = Field(default=256.0, gt=0, le=16384)


class CaptionConfig(Section):
    backend: Literal["none", "sidecar", "metadata", "vlm", "openai"] = "metadata"
    endpoint: str | None = None
    model: str | None = None
