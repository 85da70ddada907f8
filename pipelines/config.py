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


CAPTION_BACKENDS = ("none", "sidecar", "metadata", "hf", "openai")
MODEL_CAPTION_BACKENDS = ("hf", "openai")

DEFAULT_CAPTION_PROMPT = (
    "These are {frames} frames in order from a {seconds:.1f}-second video clip. Describe the video in one dense "
    "paragraph: the main subjects and what they do, the setting, lighting and colours, and how the camera moves. "
    "Describe only what is visible; do not guess at sounds or speech."
)

# Openings that describe the medium instead of the content; stripped from the front of a model
# caption (case-insensitive, longest first), then the next letter is capitalised.
DEFAULT_STRIP_PREFIXES = (
    "The video shows",
    "The video depicts",
    "The video features",
    "The video captures",
    "This video shows",
    "This video depicts",
    "In this video,",
    "In the video,",
    "The clip shows",
    "This clip shows",
    "The footage shows",
    "The frames show",
    "These frames show",
    "The images show",
    "The image shows",
    "In the frames,",
    "The sequence shows",
)


class CaptionConfig(Section):
    # none: empty caption; sidecar: .txt/.json/.srt next to the source; metadata: a sentence built
    # from measured properties; hf: a transformers image-text-to-text model (local folder or hub id
    # in `model`); openai: any OpenAI-compatible chat-completions endpoint (`endpoint`, `model`).
    backend: Literal["none", "sidecar", "metadata", "hf", "openai"] = "metadata"
    # hf: folder or hub id; openai: the model name the endpoint serves.
    model: str | None = None
    # A hub revision (hf), or a label recorded for an endpoint's model; part of a caption set's id.
    revision: str | None = None
    # openai: the server's base URL, e.g. http://gpu-node:8000/v1 (we POST <endpoint>/chat/completions).
    endpoint: str | None = None
    # Name of the environment variable holding the endpoint's API key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    # The instruction sent with the frames; {frames} and {seconds} are filled in per clip. Recorded
    # in every caption set by its hash.
    prompt: str = DEFAULT_CAPTION_PROMPT
    system_prompt: str | None = None
    # Frames shown to the model per clip: `frames` spread evenly over the clip, or with `frames_fps`
    # one every 1/fps seconds (at most `frames`).
    frames: int = Field(default=4, ge=1, le=64)
    frames_fps: float | None = Field(default=None, gt=0)
    # Pixel budget per frame (width x height, aspect kept, never upscaled): 448x448 is what
    # Qwen2-VL-class models see at ~256 visual tokens per frame.
    max_pixels: int = Field(default=448 * 448, ge=32 * 32, le=4096 * 4096)
    jpeg_quality: int = Field(default=90, ge=30, le=100)
    # Sampling: greedy (temperature 0) by default, so a rerun writes the same captions.
    max_new_tokens: int = Field(default=160, ge=8, le=4096)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    # hf: clips per generate() call; openai: requests in flight per captioning actor.
    batch_size: int = Field(default=8, ge=1, le=512)
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    # openai: send the clip itself as vLLM's `video_url` instead of frames.
    video_input: bool = False
    # hf: GPUs per captioning actor (None: 1 when the cluster has GPUs, else CPU).
    num_gpus: float | None = Field(default=None, ge=0)
    # Captioning actors (None: one per GPU for hf on GPUs, else 1; an endpoint actor keeps
    # `concurrency` requests in flight, so raise this only when one actor's CPU share is the limit).
    workers: int | None = Field(default=None, ge=1)
    # Clips per committed part file: a killed job loses at most this many clips per batch in flight
    # (one per hf actor, two per endpoint actor).
    part_clips: int = Field(default=64, ge=1, le=100_000)
    # Cleaning (pipelines/caption_clean.py).
    strip_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES
    # Cap captions at this many tokens of the training text encoder (`model.text_encoder`); None:
    # that encoder's own limit (MiniLM 256, T5 512, CLIP 77).
    max_tokens: int | None = Field(default=None, ge=8)
    min_words: int = Field(default=3, ge=1)
    # Sidecar extensions tried in order next to `clip.mp4`: `clip.srt`, `clip.txt`, `clip.json`.
    sidecar_extensions: tuple[str, ...] = (".srt", ".txt", ".json")
    # Key holding the caption in a .json sidecar.
    sidecar_json_key: str = "caption"

    @model_validator(mode="after")
    def _check_model_backend(self) -> "CaptionConfig":
        if self.backend in MODEL_CAPTION_BACKENDS and not self.model:
            example = "/models/Qwen2.5-VL-7B-Instruct" if self.backend == "hf" else "Qwen/Qwen2.5-VL-7B-Instruct"
            raise ValueError(f"caption.model is required for caption.backend={self.backend} (e.g. caption.model={example})")
        if self.backend == "openai":
            if not self.endpoint:
                raise ValueError("caption.endpoint is required for caption.backend=openai (e.g. caption.endpoint=http://gpu-node:8000/v1)")
            if not re.match(r"^https?://[^/\s]+", self.endpoint):
                raise ValueError(f"caption.endpoint must be an http(s) URL, got {self.endpoint!r}")
        try:
            self.prompt.format(frames=1, seconds=1.0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"caption.prompt may use only {{frames}} and {{seconds}} as fields ({exc!r})") from None
        return self


class IngestConfig(Section):
    """Everything `reelforge ingest` reads: what makes a clip, how clips are judged and captioned,
    and how they are packed into shards."""

    scenes: ScenesConfig = ScenesConfig()
    clips: ClipsConfig = ClipsConfig()
    filters: FiltersConfig = FiltersConfig()
    shards: ShardsConfig = ShardsConfig()
    caption: CaptionConfig = CaptionConfig()
