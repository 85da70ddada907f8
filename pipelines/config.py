"""The ingestion pipeline's config group, `IngestConfig`: sections `scenes`, `clips`, `filters`,
`shards`, `caption`.

Each section is a pydantic model with `extra="forbid"`, so a misspelled key fails when the
config is loaded, before any footage is read. `pipelines.ingest.run_ingest` takes an
`IngestConfig`; `infra.config.ReelforgeConfig` composes it with the training group into the
one config the command line edits (`--set clips.fps=8`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class Section(BaseModel):
    # The same two lines as training.config.Section: pipelines/ and training/ may not import each
    # other, and model/ (below both) stays free of pydantic.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScenesConfig(Section):
    detector: Literal["content", "adaptive", "threshold"] = "content"
    # None means the detector's own default (PySceneDetect: content 27, adaptive 3.0, threshold 12).
    threshold: float | None = Field(default=None, gt=0)
    # Detection runs on frames downscaled to this width: cuts are global events. At 160 px the
    # cuts equal those at 256 px on every generated and real test file (docs/benchmarks.md) for
    # 2-13% less CPU per source frame.
    detect_width: int = Field(default=160, ge=32, le=1920)
    min_scene_seconds: float = Field(default=0.5, ge=0)


class ClipsConfig(Section):
    min_seconds: float = Field(default=2.0, gt=0)
    max_seconds: float = Field(default=10.0, gt=0)
    fps: float = Field(default=24.0, gt=0, le=120)
    # Output frame size "WxH": aspect-preserving resize, then center crop.
    size: str = "256x256"
    # Frames dropped at each end of a scene, so fades and dissolves stay out of clips.
    trim_seconds: float = Field(default=0.1, ge=0)
    # x264 constant rate factor: 18 is visually lossless, 23 is x264's default, +6 halves the size.
    crf: int = Field(default=20, ge=0, le=51)
    # x264 speed/size trade-off. Encoding is the largest per-frame cost after decoding; measured on
    # 256x256 clips of 640x360 footage (CPU ms per frame / clip bytes): veryfast 0.92 / 132 kB,
    # superfast 0.70 / 161 kB, ultrafast 0.45 / 248 kB (no CABAC). superfast buys a quarter of the
    # encode for 20% more bytes at the same crf; ultrafast's near-doubling of shard size is not worth it.
    x264_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "superfast"
    # Width of the JPEG thumbnail each clip row carries for report.html.
    thumbnail_width: int = Field(default=128, ge=16, le=1024)
    # Largest scale factor a source may need to cover `size` (aspect kept, rotation applied)
    # before the whole source is rejected (stage "size") instead of silently upscaled: past 2x
    # an upscale invents no detail, it only teaches the model blur (160x120 -> 256x256 is 2.13x).
    # None: no limit.
    max_upscale: float | None = Field(default=2.0, ge=1.0)

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
    """Bounds on the scores in pipelines.filters.FILTERS; None disables a bound."""

    # "filter" drops clips that fail a threshold; "score" keeps every clip and only records scores.
    mode: Literal["filter", "score"] = "filter"
    # Mean |frame difference| of luma, 0-255, on frames area-averaged to 64 px wide (any clip
    # size). Frozen and black shots score 0; the slowest moving shot of the footage suites (a
    # shape crossing 60% of the frame in 3 s) 0.3. Over 40 is mostly strobing or shaky, unusable footage.
    min_motion: float | None = Field(default=0.1, ge=0)
    max_motion: float | None = Field(default=40.0, ge=0)
    # Mean luma 0-255: black frames and blown-out white are not training material. Near-black
    # footage scores ~9; a clip fading out to black, ~17 over the whole fade.
    min_brightness: float | None = Field(default=13.0, ge=0, le=255)
    max_brightness: float | None = Field(default=240.0, ge=0, le=255)
    # Variance of the Laplacian at clip size; out-of-focus footage scores in the single digits.
    min_sharpness: float | None = Field(default=10.0, ge=0)
    # Fraction of frames showing the same picture as 0.25 s later (pipelines.filters.static_score):
    # 1 for frozen video and slideshows, 0 for every moving shot of the footage suites.
    max_static_fraction: float | None = Field(default=0.5, ge=0, le=1)
    # Clips whose 384-bit perceptual hashes (pipelines.filters.perceptual_hash) differ in at most
    # this many bits are near duplicates; the ingest job keeps the first one seen. Measured on the
    # footage suites: distinct shots are >= 16 bits apart, a re-encode of one clip a median of 8.
    # None disables the check.
    dedup_hamming: int | None = Field(default=12, ge=0, le=384)

    @model_validator(mode="after")
    def _check_bounds(self) -> "FiltersConfig":
        for low, high in (("min_motion", "max_motion"), ("min_brightness", "max_brightness")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ValueError(f"filters.{low} ({low_value}) must not exceed filters.{high} ({high_value})")
        return self


class ShardsConfig(Section):
    target_mb: float = Field(default=256.0, gt=0, le=16384)


# Caption backends ingest has. Model captioners (a local VLM, an OpenAI-compatible endpoint) come with
# the recaptioning issue; until then naming one fails here, in one line, before any worker starts
# (it used to pass validation and then kill every worker at start-up).
CAPTION_BACKENDS = ("none", "sidecar", "metadata")
PLANNED_CAPTION_BACKENDS = ("vlm", "openai")


class CaptionConfig(Section):
    # none: empty caption; sidecar: .txt/.json/.srt next to the source; metadata: a sentence
    # built from measured properties.
    backend: Literal["none", "sidecar", "metadata"] = "metadata"
    endpoint: str | None = None
    model: str | None = None
    # Sidecar extensions tried in order next to `clip.mp4`: `clip.srt`, `clip.txt`, `clip.json`.
    sidecar_extensions: tuple[str, ...] = (".srt", ".txt", ".json")
    # Key holding the caption in a .json sidecar.
    sidecar_json_key: str = "caption"

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: object) -> object:
        if value in PLANNED_CAPTION_BACKENDS:
            raise ValueError(
                f"caption.backend {value!r} is not available yet (model captioners come with recaptioning); "
                f"available: {', '.join(CAPTION_BACKENDS)}"
            )
        return value


class IngestConfig(Section):
    """Everything `reelforge ingest` reads: what makes a clip, how clips are judged and captioned,
    and how they are packed into shards."""

    scenes: ScenesConfig = ScenesConfig()
    clips: ClipsConfig = ClipsConfig()
    filters: FiltersConfig = FiltersConfig()
    shards: ShardsConfig = ShardsConfig()
    caption: CaptionConfig = CaptionConfig()
