"""The model's card: what a bundle was trained for, and what a request may ask of it.

Training knows which conditioning patterns it drew (model/conditioning.py, `ConditioningProbs`), at
which frame counts and sizes, and whether it ever trained the null text. The bundle records that in
model_config.json under the key "card" (the bundle format stays v1: `BundleConfig.extra` carries it):

    "card": {
      "modes": ["text", "edit"],             # conditioning modes seen in training, in MODES order
      "shapes": [[8, 16, 16]],               # (frames, width, height) buckets, the reference one first
      "max_k": 4,                            # most latent frames training held clean at one end
      "null_text_trained": false,            # text dropout > 0: classifier-free guidance was trained
      "limits": {"max_width": 64, ...}       # RequestLimits: what one request may cost
    }

The trained clip format (fps, num_frames, width, height) and the guidance default are the bundle's
own fields; `ModelCard` joins them with the entry. A bundle written before cards existed gets a card
derived from its config, with every mode allowed (its training history is unknown) and the same
limits.

`ModelCard.check_request(request)` needs no model: `reelforge generate` runs it before loading one,
and `VideoPipeline.check_request` runs it first, so the pyfunc and the HTTP server refuse a request
beyond the card before any work, with one line naming the field. Imports torch only (PIL and PyAV
inside the input checks, as model/video_io.py does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.bundle import BundleConfig, read_bundle_config
from model.conditioning import MODES, ConditioningProbs
from model.errors import one_line

logger = logging.getLogger(__name__)

CARD_KEY = "card"  # the entry of model_config.json
# Which inputs each mode reads; any other input given is a mistake worth reporting.
MODE_INPUTS: dict[str, tuple[str, ...]] = {
    "text": (),
    "image": ("image",),
    "extend": ("video",),
    "extend-backward": ("video",),
    "connect": ("video", "video2"),
    "edit": ("video",),
}

# Limits relative to what the model was trained on. They bound what one request may cost; they
# say nothing about what looks good (quality falls off well before them).
# Sides: 3D RoPE runs at any size, but 4x a trained side is already 16x the tokens of a frame and
# ~256x the attention of a window; a side beyond that is a typo or an attack on the allocator.
SIDE_MULTIPLE = 4
# Frames of one request (the `seconds` path): 64 trained clips' worth. Windows run one after the
# other, each `steps` DiT passes, so this bounds how long one request holds the device: at the
# trained size about 64x a one-window request (64 s for the demo's 8 frames at 8 fps, 4.3 min for
# a 65-frame 16 fps model), enough for long videos, not for an hour.
WINDOWS_MULTIPLE = 64
# pixels x frames: 64x the largest trained clip. The whole latent is decoded at once at the end
# (float32 (1, 3, T, H, W): 12 bytes per pixel-frame), so this bounds the peak memory of a request:
# the 64 clips above at the trained size, 16 at twice the sides, 4 at the 4x side limit.
BUDGET_MULTIPLE = 64
# Inputs are decoded whole before they are resized, so their limits are absolute. 8192x8192 RGB is
# 200 MB, any phone or camera photo up to 64 MP, and below PIL's decompression-bomb warning (89.5 MP).
MAX_IMAGE_PIXELS = 8192 * 8192
# Input video frames: DCI 4K (4096x2160) covers 4K UHD; 8K would spend its decode time on detail the
# few conditioning frames, resized to at most 4x a trained side, cannot use.
MAX_VIDEO_PIXELS = 4096 * 2160
# extend decodes a whole input video to keep its last frames: 10 minutes at 60 fps. That is longer
# than an edit of the longest allowed output needs at any usual source rate.
MAX_VIDEO_FRAMES = 36_000


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; written into the card so an operator can change a bundle's."""

    max_width: int
    max_height: int
    max_frames: int  # output frames of one request (num_frames or round(seconds * fps))
    max_pixel_frames: int  # width * height * frames of the output
    max_image_pixels: int  # width * height of an input image, read from its header
    max_video_pixels: int  # width * height of an input video's frames, from its header
    max_video_frames: int  # frames of an input video at its own rate, from its header

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{f.name} {value!r} must be an integer >= 1")

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def default_limits(shapes: Sequence[tuple[int, int, int]]) -> RequestLimits:
    """Limits for a model trained on `shapes` ((frames, width, height), the reference bucket first,
    whose frame count is the generation window)."""
    window = shapes[0][0]
    return RequestLimits(
        max_width=SIDE_MULTIPLE * max(w for _, w, _ in shapes),
        max_height=SIDE_MULTIPLE * max(h for _, _, h in shapes),
        max_frames=WINDOWS_MULTIPLE * window,
        max_pixel_frames=BUDGET_MULTIPLE * max(f * w * h for f, w, h in shapes),
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_video_pixels=MAX_VIDEO_PIXELS,
        max_video_frames=MAX_VIDEO_FRAMES,
    )


def trained_modes(conditioning: ConditioningProbs) -> tuple[str, ...]:
    """The generation modes whose conditioning pattern training drew (table in model/conditioning.py).
    edit is the plain text-to-video path started from a noised input, so it comes with text."""
    # 1e-9: `none` is 1 minus a float sum, which is a few ulp off 0 when the patterns fill it.
    seen = {
        "text": conditioning.none > 1e-9,
        "image": conditioning.first_frame > 0,
        "extend": conditioning.first_k > 0,
        "extend-backward": conditioning.last_k > 0,
        "connect": conditioning.both_ends > 0,
        "edit": conditioning.none > 1e-9,
    }
    return tuple(mode for mode in MODES if seen[mode])


def card_entry(
    conditioning: ConditioningProbs, text_dropout: float, shapes: Sequence[tuple[int, int, int]]
) -> dict[str, Any]:
    """The "card" entry of model_config.json for a model trained with these settings (training/export.py)."""
    return {
        "modes": list(trained_modes(conditioning)),
        "shapes": [list(shape) for shape in shapes],
        "max_k": conditioning.max_k,
        "null_text_trained": text_dropout > 0,
        "limits": default_limits(shapes).to_json(),
    }


@dataclass(frozen=True)
class ModelCard:
    """What a bundle was trained for and what a request may ask of it (`load_card`, `card_from_bundle_config`)."""

    modes: tuple[str, ...]  # conditioning modes seen in training, in MODES order
    fps: float  # the trained clip format, as the bundle's own fields say
    num_frames: int
    width: int
    height: int
    shapes: tuple[tuple[int, int, int], ...]  # every trained (frames, width, height), the reference first
    guidance: float  # the bundle's default guidance
    max_k: int | None  # most latent frames training held clean at one end; None: unknown
    null_text_trained: bool | None  # whether guidance's unconditional branch was trained; None: unknown
    limits: RequestLimits
    recorded: bool = True  # False: the bundle predates cards; modes and limits were derived

    # -- checks, each one ValueError of one line naming the field ------------------------------

    def check_request(self, request: Any) -> list[str]:  # a model.pipeline.GenerationRequest (which imports this module)
        """Everything about `request` the card alone can refuse, in this order: the mode (known, and
        trained unless `allow_untrained_mode`), the size, the length, the pixels x frames budget, and
        the headers of the input files the mode reads (their presence is the pipeline's to check).
        Needs no model. Returns the warning for an untrained mode run anyway (else [])."""
        mode = request.mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(request.allow_untrained_mode, bool):
            raise ValueError(f"allow_untrained_mode {request.allow_untrained_mode!r} must be true or false")
        warnings = self.check_mode(mode, request.allow_untrained_mode)

        width = request.width if request.width is not None else self.width
        height = request.height if request.height is not None else self.height
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} {value!r} must be an integer")
        self._check_size(width, height)

        if request.num_frames is not None and request.seconds is not None:
            raise ValueError(f"give num_frames ({request.num_frames}) or seconds ({request.seconds}), not both")
        if request.seconds is not None:
            seconds = request.seconds
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"seconds {seconds!r} must be a number > 0")
            num_frames = max(1, round(seconds * self.fps))
            self._check_frames("seconds", seconds, num_frames)
            self._check_budget("seconds", seconds, num_frames, width, height)
        else:
            num_frames = request.num_frames if request.num_frames is not None else self.num_frames
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= self.num_frames:
                raise ValueError(
                    f"num_frames {num_frames!r} must be in [1, {self.num_frames}] (the trained length); "
                    "use seconds for longer videos"
                )
            self._check_budget("num_frames", num_frames, num_frames, width, height)

        for name in MODE_INPUTS[mode]:
            value = getattr(request, name)
            path = Path(value).expanduser() if value is not None and str(value) != "" else None
            if path is not None and path.is_file():
                check = check_image_file if name == "image" else check_video_file
                check(path, name, self.limits)
        return warnings

    def check_mode(self, mode: str, allow_untrained: bool) -> list[str]:
        """Refuse a mode training never drew, unless `allow_untrained`; then the warning to return."""
        if mode in self.modes:
            return []
        reason = f"mode {mode!r} was never trained for this model (trained: {', '.join(self.modes) or 'none'})"
        if not allow_untrained:
            raise ValueError(f"{reason}; set allow_untrained_mode to run it anyway")
        return [f"{reason}; run anyway (allow_untrained_mode), the output may ignore its inputs"]

    def _check_size(self, width: int, height: int) -> None:
        for name, value, limit, trained in (
            ("width", width, self.limits.max_width, max(w for _, w, _ in self.shapes)),
            ("height", height, self.limits.max_height, max(h for _, _, h in self.shapes)),
        ):
            if value > limit:
                raise ValueError(f"{name} {value} exceeds this model's limit {limit} ({_times(limit, trained)} its trained {trained})")

    def _check_frames(self, field: str, value: float, num_frames: int) -> None:
        """`num_frames` output frames, asked for as `field` `value` (seconds or num_frames)."""
        limit = self.limits.max_frames
        if num_frames > limit:
            raise ValueError(
                f"{field} {value:g} makes {num_frames:,} frames, over this model's limit {limit:,} "
                f"({limit / self.fps:g} s at {self.fps:g} fps, {_times(limit, self.num_frames)} its trained {self.num_frames} frames)"
            )

    def _check_budget(self, field: str, value: float, num_frames: int, width: int, height: int) -> None:
        """pixels x frames of the output against the budget."""
        limit, cost = self.limits.max_pixel_frames, num_frames * width * height
        if cost > limit:
            f, w, h = max(self.shapes, key=lambda shape: shape[0] * shape[1] * shape[2])
            raise ValueError(
                f"{field} {value:g} at {width}x{height} is {num_frames:,} frames x {width * height:,} pixels = "
                f"{cost:,} pixel-frames, over this model's budget {limit:,} ({_times(limit, f * w * h)} its trained "
                f"{f} frames at {w}x{h}); ask for fewer frames or a smaller size"
            )

    def sampling_warnings(self, mode: str, guidance: float, overlap_latent_frames: int, multi_window: bool) -> list[str]:
        """What a valid request asks that training never showed the model: it runs, with these warnings."""
        warnings = []
        if multi_window:
            # Every window after the first holds clean the frames it shares with the last one: the
            # extend pattern (extend-backward's windows run backwards, holding frames at their end).
            pattern = "extend-backward" if mode == "extend-backward" else "extend"
            if pattern not in self.modes:
                warnings.append(
                    f"longer than one window: each later window continues from held frames (the {pattern!r} "
                    f"pattern), which this model never trained, so windows may not join smoothly"
                )
        holds_k = multi_window or mode in ("extend", "extend-backward", "connect")
        if holds_k and self.max_k is not None and overlap_latent_frames > self.max_k:
            warnings.append(
                f"overlap_frames holds {overlap_latent_frames} latent frames clean; training held at most {self.max_k}"
            )
        if guidance != 1 and self.null_text_trained is False:
            warnings.append(
                f"guidance {guidance:g} mixes in the unconditional branch, which this model never trained "
                "(text dropout 0); guidance 1 samples with the prompt alone"
            )
        return warnings

    # -- serialisation ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Everything on the card, for a /v1/models style response."""
        return {
            "modes": list(self.modes),
            "fps": self.fps,
            "num_frames": self.num_frames,
            "width": self.width,
            "height": self.height,
            "shapes": [list(shape) for shape in self.shapes],
            "guidance": self.guidance,
            "max_k": self.max_k,
            "null_text_trained": self.null_text_trained,
            "limits": self.limits.to_json(),
            "recorded": self.recorded,
        }


def _times(limit: int, trained: int) -> str:
    return f"{limit / trained:g}x"


def card_from_bundle_config(config: BundleConfig) -> ModelCard:
    """The card of a bundle: its "card" entry joined with the clip format and guidance it records.
    A bundle without one (written before cards) gets every mode and the default limits, with a warning."""
    reference = (config.num_frames, config.width, config.height)
    common = dict(fps=config.fps, num_frames=config.num_frames, width=config.width, height=config.height,
                  guidance=config.generation.guidance)  # fmt: skip
    entry = config.extra.get(CARD_KEY)
    if entry is None:
        _warn_once(config)
        return ModelCard(modes=MODES, shapes=(reference,), max_k=None, null_text_trained=None,
                         limits=default_limits([reference]), recorded=False, **common)  # fmt: skip
    where = f"{CARD_KEY} entry of model_config.json"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    allowed = {"modes", "shapes", "max_k", "null_text_trained", "limits"}
    unknown, missing = set(entry) - allowed, allowed - set(entry)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    modes = entry["modes"]
    if not isinstance(modes, list) or not set(modes) <= set(MODES):
        raise ValueError(f"{where}: modes {modes!r} must be a list of {', '.join(MODES)}")
    try:
        shapes = tuple((int(f), int(w), int(h)) for f, w, h in entry["shapes"])
        limits = RequestLimits(**entry["limits"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {one_line(exc)}") from exc
    if not shapes or shapes[0] != reference:
        raise ValueError(f"{where}: shapes {entry['shapes']!r} must start with the bundle's clip {list(reference)}")
    max_k, null_text = entry["max_k"], entry["null_text_trained"]
    if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1):
        raise ValueError(f"{where}: max_k {max_k!r} must be an integer >= 1 or null")
    if null_text is not None and not isinstance(null_text, bool):
        raise ValueError(f"{where}: null_text_trained {null_text!r} must be true, false or null")
    return ModelCard(modes=tuple(m for m in MODES if m in modes), shapes=shapes, max_k=max_k,
                     null_text_trained=null_text, limits=limits, **common)  # fmt: skip


_warned: set[str] = set()  # configs whose missing card was logged: once per process, not per reader


def _warn_once(config: BundleConfig) -> None:
    key = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True, default=str).encode()).hexdigest()
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "this bundle has no model card (written before cards): its training history is unknown, so "
            "every mode is allowed; limits are derived from its trained %d frames at %dx%d",
            config.num_frames, config.width, config.height,
        )


def load_card(bundle_dir: str | Path) -> ModelCard:
    """The card of the bundle in `bundle_dir` (reads model_config.json only, no weights)."""
    return card_from_bundle_config(read_bundle_config(bundle_dir))


# -- inputs, checked from their headers before anything is decoded -------------------------------


def check_image_file(path: Path, field: str, limits: RequestLimits) -> None:
    """The image's size from its header (PIL reads no pixels until asked)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise ValueError(f"{field}: not a readable image (cannot read image header: unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:  # PIL refuses over 2x its own limit before we see the size
        raise ValueError(f"{field}: not a readable image ({one_line(exc)})") from None
    except OSError as exc:
        raise ValueError(f"{field}: not a readable image (cannot read image header: {one_line(exc)})") from None
    if width * height > limits.max_image_pixels:
        raise ValueError(
            f"{field}: {width}x{height} = {width * height:,} pixels exceeds this model's limit "
            f"{limits.max_image_pixels:,} for an input image"
        )


def check_video_file(path: Path, field: str, limits: RequestLimits) -> None:
    """The video's frame size and length from its container and stream headers (nothing decoded
    beyond what FFmpeg probes to open it)."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"{field}: not a readable video ({one_line(exc)})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{field}: not a readable video (no video stream)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = stream.frames  # the container's count (MP4, MOV); 0 when it keeps none (WebM, MKV)
        if not frames:
            rate = stream.average_rate or stream.guessed_rate
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / av.time_base if container.duration else None
            frames = math.ceil(seconds * float(rate)) if seconds and rate else 0
    if width * height > limits.max_video_pixels:
        raise ValueError(
            f"{field}: {width}x{height} frames = {width * height:,} pixels exceed this model's limit "
            f"{limits.max_video_pixels:,} for an input video"
        )
    if not frames:
        raise ValueError(f"{field}: its header states no frame count or duration; remux it (e.g. to MP4)")
    if frames > limits.max_video_frames:
        raise ValueError(f"{field}: {frames:,} frames exceed this model's limit {limits.max_video_frames:,} for an input video")
