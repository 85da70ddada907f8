"""Synthetic footage whose truth is known: the test and demo input of every other part.

Nothing is downloaded. Each file is drawn with numpy and encoded with PyAV, and its
truth (hard-cut times, shot spans, fades, frame times, one caption per shot) is computed
from the same spec that drew it, so tests of scene splitting, clipping, filtering,
captioning and training can check their output against it.

API (all deterministic: the same spec gives the same pixels, and byte-identical files):

    Shot(kind, duration_s, color, shape, direction, background)   one shot between cuts;
        .caption is a true sentence, e.g. "a red circle moving right on a dark blue background"
    FootageSpec(name, container, codec, width, height, fps, shots, pix_fmt=None,
                audio=False, rotation=0, vfr=False, sidecar="none", faststart=False,
                grain=0.0, crf=None)
    varied_shots([(kind, duration_s), ...], offset=0)   shots that change colour/shape/direction/background
    write_video(spec, path) -> GeneratedVideo            encode one file (+ its .srt/.txt sidecar)
    render_frames(spec) -> Iterator[(pts, rgb)]          the drawn frames, without encoding
    standard_specs() / demo_specs() -> list[FootageSpec] the catalogues, without encoding
    standard_suite(out_dir) / demo_suite(out_dir) -> list[GeneratedVideo]
    bad_files(out_dir) -> dict[str, Path]                empty, truncated, not a video, audio only, zero frames
    damaged_files(out_dir) -> dict[str, Path]            open fine, end early: decode error part way / silent
    write_truth(videos, path, bad=None, damaged=None)    truth.json: every GeneratedVideo as JSON
    main(argv)                                           `reelforge demo-footage DIR [--suite demo|standard|bad|all]`

Visual vocabulary, kept small so a tiny text-to-video model can learn it: a shape
(circle, square, triangle) of one of 4 colours moves left/right/up/down (or stands still)
over a textured, vertically graded background of one of 4 colours. Consecutive shots
change background between a dark and a light one, so the mean frame difference at a
cut is > 30 levels (of 255) and ContentDetector scores it > 70, while inside a shot
they stay under ~9 and ~10: PySceneDetect's ContentDetector finds every hard cut.

Conventions:
- `width`/`height` are the coded (stored) size. `rotation` is the display rotation in
  degrees counter-clockwise, as PyAV's `VideoFrame.rotation` and ffprobe's display-matrix
  `rotation` report it (PyAV reads 270 back as -90); a player shows
  `np.rot90(stored, rotation // 90)`. Frames of a rotated file are drawn in display
  orientation, so captions are true for what a viewer sees.
- A boundary between shots is a hard cut unless both sides are dark there (fade_out or
  black followed by fade_in or black). Those dips to black are `soft_cut_*`: no pixel
  jumps there, yet HSV detectors (PySceneDetect's ContentDetector) usually split within
  a frame of them, because hue and saturation of near-black pixels swing wildly.
- VFR files alternate frame durations of 2/3 and 4/3 of 1/fps (so `fps` is the mean rate),
  with timestamps in units of 1/(3·fps) seconds, exact in MP4 and MKV.
"""

from __future__ import annotations

import argparse
import bisect
import filecmp
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

# --- visual vocabulary -------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 240),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Alternately dark and light (varied_shots keeps that alternation from shot to shot): a
# cut then changes hue, saturation *and* brightness, which ContentDetector averages. Two
# dark backgrounds in a row (dark blue -> dark green) score ~26, under its default 27.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "dark blue": (20, 30, 100),
    "light gray": (195, 195, 195),
    "dark green": (20, 90, 40),
    "sky blue": (125, 180, 230),
}
# Near-black shot level: dark enough for a brightness filter, not exactly 0 (real "black"
# footage carries noise and a pedestal).
NEAR_BLACK_RGB = (9, 9, 11)

ShotKind = Literal["moving", "static", "black", "fade_out", "fade_in"]
SHOT_KINDS: tuple[str, ...] = ("moving", "static", "black", "fade_out", "fade_in")
_DARK_START = ("fade_in", "black")  # kinds whose first frame is (near) black
_DARK_END = ("fade_out", "black")  # kinds whose last frame is (near) black

# Shape size and travel, as fractions of the (display) frame.
SHAPE_RADIUS_FRAC = 0.15  # of min(H, W)
TRAVEL_FROM, TRAVEL_TO = 0.2, 0.8  # position along the motion axis at the shot's start / end

# Pixel format each encoder gets unless the spec says otherwise.
DEFAULT_PIX_FMT: dict[str, str] = {
    "libx264": "yuv420p",
    "mpeg4": "yuv420p",
    "msmpeg4": "yuv420p",
    "msmpeg4v2": "yuv420p",
    "cinepak": "rgb24",
    "libvpx-vp9": "yuv420p",
    "libtheora": "yuv420p",
    "ffv1": "yuv420p",
}
# Encoder options. One thread everywhere: multi-threaded x264/vpx slice work differently
# run to run, and determinism (byte-identical files) matters more than speed at these sizes.
CODEC_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "veryfast", "crf": "16", "x264-params": "log=0"},  # log=0: errors only, no stats on stderr
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20"},
    # One strip per frame halves cinepak's encode time at no visible cost on flat synthetic frames.
    "cinepak": {"max_extra_cb_iterations": "0", "max_strips": "1"},
}
# Bits per pixel per frame for encoders driven by bit rate (mpeg4 family, vp9, theora):
# generous, so a decoded frame stays within a few levels of what was drawn.
BITS_PER_PIXEL = 0.5
# Bit-exact muxing: Matroska/WebM otherwise write a random segment UID and a date, and
# every muxer stamps the libavformat version, so files would differ run to run.
MUXER_OPTIONS = {"fflags": "+bitexact"}
AUDIO_RATE = 44_100
AUDIO_TONE_HZ = 440.0


def encoder_available(codec: str) -> bool:
    """True if this PyAV/FFmpeg build can encode `codec` (e.g. no libtheora here)."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # av raises UnknownCodecError, a ValueError subclass on some versions
        return False
    return True


# --- specs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One shot between hard cuts. `color`/`shape`/`direction`/`background` are ignored by
    `black` shots and `direction` by `static` ones; `caption` says what is on screen."""

    kind: ShotKind
    duration_s: float
    color: str = "red"
    shape: str = "circle"
    direction: str = "right"
    background: str = "dark blue"

    def __post_init__(self) -> None:
        if self.kind not in SHOT_KINDS:
            raise ValueError(f"Shot.kind {self.kind!r} is not one of {SHOT_KINDS}")
        if not self.duration_s > 0:
            raise ValueError(f"Shot.duration_s must be > 0, got {self.duration_s!r}")
        for name, value, allowed in (
            ("color", self.color, tuple(COLORS)),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in allowed:
                raise ValueError(f"Shot.{name} {value!r} is not one of {allowed}")

    @property
    def caption(self) -> str:
        if self.kind == "black":
            return "an empty, nearly black frame"
        if self.kind == "static":
            return f"a {self.color} {self.shape} standing still on a {self.background} background"
        moving = f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"
        if self.kind == "fade_out":
            return f"{moving}, fading out to black"
        if self.kind == "fade_in":
            return f"{moving}, fading in from black"
        return moving


@dataclass(frozen=True)
class FootageSpec:
    """What to encode. `container` is the file extension (mp4, avi, mov, mkv, webm, ogv, m4a),
    `codec` a PyAV encoder name, `fps` the frame rate (the mean rate when `vfr`)."""

    name: str
    container: str
    codec: str
    width: int
    height: int
    fps: Fraction
    shots: tuple[Shot, ...]
    pix_fmt: str | None = None  # None: DEFAULT_PIX_FMT[codec]
    audio: bool = False  # add a mono AAC sine tone for the whole duration
    rotation: int = 0  # display rotation, degrees counter-clockwise
    vfr: bool = False
    sidecar: Literal["none", "srt", "txt"] = "none"
    faststart: bool = False  # MP4/MOV: index (moov) before the data, as web-optimised files have
    # Camera-like noise, in luma levels (0: the flat, cheap-to-decode look every test uses). A static
    # blotchy texture of twice this amplitude plus per-frame grain of this standard deviation make
    # the encoder spend bits everywhere, so the file decodes about as slowly as real footage.
    grain: float = 0.0
    crf: int | None = None  # libx264 crf; None: CODEC_OPTIONS' 16

    def __post_init__(self) -> None:
        # Accept 25, 25.0 or Fraction(30000, 1001); a float is taken as the decimal it prints as.
        fps = self.fps
        if isinstance(fps, float):
            fps = Fraction(repr(fps))
        object.__setattr__(self, "fps", Fraction(fps))
        object.__setattr__(self, "shots", tuple(self.shots))
        if not self.name or "/" in self.name:
            raise ValueError(f"FootageSpec.name {self.name!r} must be a non-empty file stem")
        if not (self.width > 0 and self.height > 0):
            raise ValueError(f"{self.name}: size {self.width}x{self.height} must be positive")
        if not self.fps > 0:
            raise ValueError(f"{self.name}: fps {self.fps} must be > 0")
        if not self.shots:
            raise ValueError(f"{self.name}: needs at least one shot")
        if self.rotation not in (0, 90, 180, 270):
            raise ValueError(f"{self.name}: rotation {self.rotation!r} must be 0, 90, 180 or 270")
        if self.sidecar not in ("none", "srt", "txt"):
            raise ValueError(f"{self.name}: sidecar {self.sidecar!r} must be 'none', 'srt' or 'txt'")
        if self.sidecar == "txt" and len(self.shots) != 1:
            # A .txt sidecar is one caption for the whole file: only true for a single shot.
            raise ValueError(f"{self.name}: a 'txt' sidecar needs exactly one shot, got {len(self.shots)}")
        if not 0.0 <= self.grain <= 64.0:
            raise ValueError(f"{self.name}: grain {self.grain!r} must be between 0 and 64 levels")
        if self.crf is not None and (self.codec != "libx264" or not 0 <= self.crf <= 51):
            raise ValueError(f"{self.name}: crf {self.crf!r} needs codec libx264 and 0..51, codec is {self.codec!r}")
        if self.faststart and self.container not in ("mp4", "mov", "m4a"):
            raise ValueError(f"{self.name}: faststart applies to mp4/mov/m4a, not .{self.container}")
        if self.pix_fmt is None and self.codec not in DEFAULT_PIX_FMT:
            raise ValueError(f"{self.name}: no default pix_fmt for codec {self.codec!r}; set pix_fmt")
        if not encoder_available(self.codec):
            raise ValueError(f"{self.name}: encoder {self.codec!r} is not available in this PyAV build")

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.container}"

    @property
    def resolved_pix_fmt(self) -> str:
        return self.pix_fmt or DEFAULT_PIX_FMT[self.codec]

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as a player shows it, after the display rotation."""
        if self.rotation in (90, 270):
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class GeneratedVideo:
    """A written file and its truth. Times are presentation times in seconds from the first frame."""

    path: Path
    spec: FootageSpec
    num_frames: int
    duration_s: float  # end of the last frame
    frame_times_s: tuple[float, ...]  # presentation time of every frame (irregular when vfr)
    cut_times_s: tuple[float, ...]  # hard cuts: time of the first frame of each new shot
    cut_frames: tuple[int, ...]  # same, as frame indices
    soft_cut_times_s: tuple[float, ...]  # dips to black between dark-ended and dark-started shots
    soft_cut_frames: tuple[int, ...]  # same, as frame indices (first frame of the later shot)
    shot_spans_s: tuple[tuple[float, float], ...]  # (start, end) per shot, aligned with spec.shots
    shot_frames: tuple[tuple[int, int], ...]  # [first, last + 1) frame index per shot
    fade_spans_s: tuple[tuple[float, float], ...]  # spans of fade_out / fade_in shots
    sha256: str
    sidecar: Path | None = None
    captions: tuple[str, ...] = field(default=())  # per shot, aligned with spec.shots

    def to_json(self) -> dict:
        spec = self.spec
        return {
            "file": self.path.name,
            "path": str(self.path),
            "name": spec.name,
            "container": spec.container,
            "codec": spec.codec,
            "pix_fmt": spec.resolved_pix_fmt,
            "width": spec.width,
            "height": spec.height,
            "display_width": spec.display_size[0],
            "display_height": spec.display_size[1],
            "rotation": spec.rotation,
            "fps": float(spec.fps),
            "fps_fraction": f"{spec.fps.numerator}/{spec.fps.denominator}",
            "vfr": spec.vfr,
            "audio": spec.audio,
            "num_frames": self.num_frames,
            "duration_s": self.duration_s,
            "frame_times_s": list(self.frame_times_s),
            "cut_times_s": list(self.cut_times_s),
            "cut_frames": list(self.cut_frames),
            "soft_cut_times_s": list(self.soft_cut_times_s),
            "soft_cut_frames": list(self.soft_cut_frames),
            "shot_spans_s": [list(span) for span in self.shot_spans_s],
            "shot_frames": [list(span) for span in self.shot_frames],
            "fade_spans_s": [list(span) for span in self.fade_spans_s],
            "shots": [
                {
                    "kind": shot.kind,
                    "duration_s": shot.duration_s,
                    # null where the kind does not show it, so the truth never names what is not on screen
                    "color": None if shot.kind == "black" else shot.color,
                    "shape": None if shot.kind == "black" else shot.shape,
                    "direction": None if shot.kind in ("black", "static") else shot.direction,
                    "background": None if shot.kind == "black" else shot.background,
                    "caption": shot.caption,
                    "start_s": start,
                    "end_s": end,
                }
                for shot, (start, end) in zip(spec.shots, self.shot_spans_s)
            ],
            "sidecar": self.sidecar.name if self.sidecar else None,
            "sha256": self.sha256,
        }


# --- timing ------------------------------------------------------------------------------------


def _exact_s(duration_s: float) -> Fraction:
    """A duration as the exact decimal it prints as (1.1 -> 11/10), so shot boundaries
    fall exactly on frame times instead of a float's rounding away from them."""
    return Fraction(repr(float(duration_s)))


def _time_base(spec: FootageSpec) -> Fraction:
    # VFR durations are 2 and 4 ticks of 1/(3·fps): exact integers, mean 1/fps.
    return 1 / (3 * spec.fps) if spec.vfr else 1 / spec.fps


def _frame_pts(spec: FootageSpec) -> list[int]:
    """Presentation timestamps in `_time_base(spec)` ticks, up to the spec's total duration."""
    total_s = sum(_exact_s(shot.duration_s) for shot in spec.shots)
    tb = _time_base(spec)
    pts, t = [], 0
    while t * tb < total_s:
        pts.append(t)
        t += (2 if len(pts) % 2 else 4) if spec.vfr else 1
    return pts


def _plan(spec: FootageSpec) -> tuple[list[int], list[int], list[Fraction]]:
    """(pts per frame, shot index per frame, shot start boundaries as exact fractions)."""
    tb = _time_base(spec)
    boundaries, start = [], Fraction(0)
    for shot in spec.shots:
        boundaries.append(start)
        start += _exact_s(shot.duration_s)
    pts = _frame_pts(spec)
    shot_of = [bisect.bisect_right(boundaries, p * tb) - 1 for p in pts]
    for k, shot in enumerate(spec.shots):
        count = shot_of.count(k)
        if count < (2 if shot.kind in ("fade_out", "fade_in") else 1):
            raise ValueError(
                f"{spec.name}: shot {k} ({shot.kind}, {shot.duration_s}s) gets {count} frame(s) "
                f"at {float(spec.fps):g} fps"
            )
    return pts, shot_of, boundaries


# --- drawing -----------------------------------------------------------------------------------


def _background(shot: Shot, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: the shot's colour, graded top-to-bottom, with faint diagonal stripes
    (texture keeps blur/sharpness filters honest and gives ContentDetector edges to see)."""
    if shot.kind == "black":
        return np.broadcast_to(np.array(NEAR_BLACK_RGB, np.uint8), (height, width, 3)).copy()
    base = np.array(BACKGROUNDS[shot.background], np.float32)
    grade = np.linspace(0.8, 1.1, height, dtype=np.float32)[:, None]  # (H, 1)
    period = max(min(height, width) / 6.0, 4.0)  # stripes scale with the frame
    # Stripes depend on x + y only: one sine per diagonal, gathered, instead of H*W sines.
    diagonal = 1.0 + 0.1 * np.sin(2 * np.pi * np.arange(height + width, dtype=np.float32) / period)  # (H+W,)
    shade = grade * diagonal[np.add.outer(np.arange(height), np.arange(width))]  # (H, W)
    img = shade[..., None] * base  # (H, W, 3)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _shape_center(shot: Shot, progress: float, height: int, width: int) -> tuple[float, float]:
    """(cy, cx) in pixels; `progress` runs 0 → 1 over the shot."""
    if shot.kind == "static":
        return height / 2, width / 2
    along = TRAVEL_FROM + (TRAVEL_TO - TRAVEL_FROM) * progress
    match shot.direction:
        case "right":
            return height / 2, width * along
        case "left":
            return height / 2, width * (1 - along)
        case "down":
            return height * along, width / 2
        case _:  # "up"
            return height * (1 - along), width / 2


def _paint_shape(img: np.ndarray, shot: Shot, cy: float, cx: float) -> None:
    """Paint the shape in place, touching only its bounding box (the frame copy dominates cost)."""
    height, width = img.shape[:2]
    r = max(SHAPE_RADIUS_FRAC * min(height, width), 3.0)
    y0, y1 = max(int(cy - r), 0), min(int(np.ceil(cy + r)) + 1, height)
    x0, x1 = max(int(cx - r), 0), min(int(np.ceil(cx + r)) + 1, width)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy  # (h, 1) offsets from the centre
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx  # (1, w)
    match shot.shape:
        case "circle":
            mask = yy * yy + xx * xx <= r * r
        case "square":
            mask = (np.abs(yy) <= r * 0.85) & (np.abs(xx) <= r * 0.85)  # same area as the circle, roughly
        case _:  # "triangle", apex up: half-width grows linearly from apex (yy=-r) to base (yy=+r)
            mask = (yy >= -r) & (yy <= r) & (np.abs(xx) <= (yy + r) / 2)
    np.copyto(img[y0:y1, x0:x1], np.array(COLORS[shot.color], np.uint8), where=mask[..., None])


def render_frames(spec: FootageSpec) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (pts, rgb (H, W, 3) uint8 in coded orientation) for every frame of `spec`.

    Frozen shots (static, black) yield the same array object again, so the caller may
    skip re-conversion; everything else is a fresh array.
    """
    pts_list, shot_of, boundaries = _plan(spec)
    tb = _time_base(spec)
    disp_w, disp_h = spec.display_size
    turns = -(spec.rotation // 90)  # display = rot90(stored, rotation/90) ⇒ stored = rot90(display, -k)
    per_shot_count = [shot_of.count(k) for k in range(len(spec.shots))]
    backgrounds: dict[int, np.ndarray] = {}
    frozen: dict[int, np.ndarray] = {}
    grain = _Grain(spec.grain, disp_h, disp_w) if spec.grain > 0 else None
    index_in_shot = 0
    for i, (pts, k) in enumerate(zip(pts_list, shot_of)):
        index_in_shot = 0 if i == 0 or shot_of[i - 1] != k else index_in_shot + 1
        shot = spec.shots[k]
        if k in frozen:
            yield pts, frozen[k]
            continue
        if k not in backgrounds:
            backgrounds.clear()  # one shot at a time: a 1080p background is 6 MB
            backgrounds[k] = _background(shot, disp_h, disp_w)
            if grain:
                backgrounds[k] = grain.add_texture(backgrounds[k])
        img = backgrounds[k].copy()  # (H, W, 3) display orientation
        if shot.kind != "black":
            progress = float((pts * tb - boundaries[k]) / _exact_s(shot.duration_s))
            _paint_shape(img, shot, *_shape_center(shot, progress, disp_h, disp_w))
        if shot.kind in ("fade_out", "fade_in"):
            # Linear ramp over the shot's frames: a fade_out's last frame and a fade_in's first are black.
            alpha = index_in_shot / (per_shot_count[k] - 1)
            if shot.kind == "fade_out":
                alpha = 1.0 - alpha
            img = (img.astype(np.float32) * alpha + 0.5).astype(np.uint8)
        if grain:
            grain.add_noise(img, i)
        if turns:
            img = np.ascontiguousarray(np.rot90(img, turns))  # (W, H, 3) → coded orientation
        if shot.kind in ("static", "black") and not grain:
            frozen[k] = img
        yield pts, img


class _Grain:
    """Film grain and texture for `FootageSpec.grain`, deterministic: the texture is seeded by a
    constant, each frame's grain by its index.

    Grain comes from 4 noise fields drawn once, a little larger than the frame; frame i adds a
    window of one of them at an offset drawn from seed i. Drawing 2 M Gaussians per 1080p frame
    would cost ~50 ms; this costs two saturating cv2 adds. Luma only (the same value on R, G, B).
    """

    FIELDS = 4
    MARGIN = 64  # px of slack for the per-frame window offset

    def __init__(self, sigma: float, height: int, width: int):
        self.sigma, self.height, self.width = sigma, height, width
        rng = np.random.default_rng(0x6A41)
        shape = (height + self.MARGIN, width + self.MARGIN)
        self.positive, self.negative = [], []
        for _ in range(self.FIELDS):
            noise = np.clip(np.rint(rng.standard_normal(shape, dtype=np.float32) * sigma), -255, 255)
            # Split into the parts above and below zero, so adding is two uint8 saturating ops.
            self.positive.append(np.repeat(np.maximum(noise, 0).astype(np.uint8)[..., None], 3, axis=2))
            self.negative.append(np.repeat(np.maximum(-noise, 0).astype(np.uint8)[..., None], 3, axis=2))

    def add_texture(self, background: np.ndarray) -> np.ndarray:
        """The background plus a static blotchy texture (noise drawn at 1/8 size, upscaled)."""
        rng = np.random.default_rng(0x7E47)
        small = rng.standard_normal((self.height // 8 + 2, self.width // 8 + 2), dtype=np.float32)
        texture = cv2.resize(small, (self.width, self.height), interpolation=cv2.INTER_CUBIC)  # (H, W)
        out = background.astype(np.float32) + (2.0 * self.sigma) * texture[..., None]  # (H, W, 3)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    def add_noise(self, img: np.ndarray, frame_index: int) -> None:
        """Add frame `frame_index`'s grain to `img` ((H, W, 3) uint8) in place."""
        rng = np.random.default_rng(frame_index)
        field_index = int(rng.integers(self.FIELDS))
        dy, dx = (int(v) for v in rng.integers(self.MARGIN, size=2))
        window = np.s_[dy : dy + self.height, dx : dx + self.width]
        cv2.add(img, self.positive[field_index][window], dst=img)
        cv2.subtract(img, self.negative[field_index][window], dst=img)


# --- encoding ----------------------------------------------------------------------------------


def _add_video_stream(container: av.container.OutputContainer, spec: FootageSpec) -> av.VideoStream:
    stream = container.add_stream(spec.codec, rate=spec.fps)
    stream.width, stream.height = spec.width, spec.height
    stream.pix_fmt = spec.resolved_pix_fmt
    stream.codec_context.thread_count = 1
    stream.codec_context.time_base = _time_base(spec)
    if spec.vfr:
        stream.time_base = _time_base(spec)
    # A keyframe every second keeps seeking (clip extraction) cheap in every container.
    stream.codec_context.gop_size = max(int(round(float(spec.fps))), 1)
    if spec.codec not in ("libx264", "cinepak", "ffv1"):
        stream.codec_context.bit_rate = int(BITS_PER_PIXEL * spec.width * spec.height * float(spec.fps))
    stream.codec_context.options = dict(CODEC_OPTIONS.get(spec.codec, {})) | ({"crf": str(spec.crf)} if spec.crf is not None else {})
    if spec.rotation:
        stream.set_display_rotation(spec.rotation)
    return stream


def _sine(start_sample: int, stop_sample: int) -> np.ndarray:
    n = np.arange(start_sample, stop_sample, dtype=np.float64)
    return (0.3 * np.sin(2 * np.pi * AUDIO_TONE_HZ * n / AUDIO_RATE)).astype(np.float32)


class _AudioTrack:
    """Mono AAC sine tone, encoded in step with the video so the muxer can interleave."""

    def __init__(self, container: av.container.OutputContainer):
        self.stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        self.stream.codec_context.thread_count = 1
        self.container = container
        self.samples_done = 0

    def encode_until(self, t_s: float | None) -> None:
        """Encode samples up to time `t_s` (None: flush the encoder)."""
        frame_size = self.stream.codec_context.frame_size or 1024
        target = self.samples_done if t_s is None else int(round(t_s * AUDIO_RATE))
        while self.samples_done < target:
            stop = min(self.samples_done + frame_size, target)
            frame = av.AudioFrame.from_ndarray(_sine(self.samples_done, stop)[None, :], format="fltp", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = self.samples_done
            frame.time_base = Fraction(1, AUDIO_RATE)
            self.container.mux(self.stream.encode(frame))
            self.samples_done = stop
        if t_s is None:
            self.container.mux(self.stream.encode(None))


def write_video(spec: FootageSpec, path: Path) -> GeneratedVideo:
    """Encode `spec` to `path` (its sidecar beside it) and return the file's truth."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts_list, shot_of, _ = _plan(spec)
    tb = _time_base(spec)
    end_tick = pts_list[-1] + ((2 if len(pts_list) % 2 else 4) if spec.vfr else 1)
    # Encode beside the target and replace it only when the bytes differ: an unchanged file keeps its
    # mtime, so rerunning `make demo` (or a test) lets incremental ingest skip it as already done.
    tmp_path = path.with_name(f".tmp-{path.name}")
    try:
        options = MUXER_OPTIONS | ({"movflags": "+faststart"} if spec.faststart else {})
        with av.open(str(tmp_path), "w", options=options) as container:
            video = _add_video_stream(container, spec)
            audio = _AudioTrack(container) if spec.audio else None
            last_img, last_frame = None, None
            for pts, img in render_frames(spec):
                if img is not last_img:  # frozen shots reuse the converted frame
                    last_frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                    last_img = img
                last_frame.pts = pts
                last_frame.time_base = tb
                container.mux(video.encode(last_frame))
                if audio:
                    audio.encode_until(float(pts * tb))
            container.mux(video.encode(None))
            if audio:
                audio.encode_until(float(end_tick * tb))
                audio.encode_until(None)
    except (av.error.FFmpegError, ValueError) as exc:
        tmp_path.unlink(missing_ok=True)
        raise ValueError(
            f"{spec.name}: cannot encode {spec.width}x{spec.height} {spec.resolved_pix_fmt} with {spec.codec} "
            f"in .{spec.container}: {exc}"
        ) from exc
    if path.is_file() and filecmp.cmp(tmp_path, path, shallow=False):
        tmp_path.unlink()
    else:
        os.replace(tmp_path, path)

    frame_times = [float(p * tb) for p in pts_list]
    duration_s = float(end_tick * tb)
    # Shot k covers frames [first[k], first[k + 1]); the last one runs to the end of the file.
    first = [shot_of.index(k) for k in range(len(spec.shots))]
    shot_frames = list(zip(first, first[1:] + [len(pts_list)]))
    shot_spans = [(frame_times[a], frame_times[b] if b < len(pts_list) else duration_s) for a, b in shot_frames]
    boundaries = range(1, len(spec.shots))
    soft = {k for k in boundaries if spec.shots[k - 1].kind in _DARK_END and spec.shots[k].kind in _DARK_START}
    cut_frames = [first[k] for k in boundaries if k not in soft]
    soft_cut_frames = [first[k] for k in boundaries if k in soft]
    fades = [span for shot, span in zip(spec.shots, shot_spans) if shot.kind in ("fade_out", "fade_in")]
    sidecar = _write_sidecar(spec, path, shot_spans)
    video = GeneratedVideo(
        path=path,
        spec=spec,
        num_frames=len(pts_list),
        duration_s=duration_s,
        frame_times_s=tuple(frame_times),
        cut_times_s=tuple(frame_times[f] for f in cut_frames),
        cut_frames=tuple(cut_frames),
        soft_cut_times_s=tuple(frame_times[f] for f in soft_cut_frames),
        soft_cut_frames=tuple(soft_cut_frames),
        shot_spans_s=tuple(shot_spans),
        shot_frames=tuple(shot_frames),
        fade_spans_s=tuple(fades),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        sidecar=sidecar,
        captions=tuple(shot.caption for shot in spec.shots),
    )
    logger.debug("wrote %s: %d frames, %.2fs, cuts at %s", path, video.num_frames, duration_s, video.cut_times_s)
    return video


def _srt_time(t_s: float) -> str:
    ms = int(round(t_s * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def _write_sidecar(spec: FootageSpec, path: Path, shot_spans: list[tuple[float, float]]) -> Path | None:
    if spec.sidecar == "none":
        return None
    sidecar = path.with_suffix(f".{spec.sidecar}")
    if spec.sidecar == "txt":
        sidecar.write_text(spec.shots[0].caption + "\n", encoding="utf-8")
        return sidecar
    cues = [
        f"{i}\n{_srt_time(start)} --> {_srt_time(end)}\n{shot.caption}\n"
        for i, (shot, (start, end)) in enumerate(zip(spec.shots, shot_spans), start=1)
    ]
    sidecar.write_text("\n".join(cues), encoding="utf-8")
    return sidecar


# --- catalogues --------------------------------------------------------------------------------


def varied_shots(kinds_and_durations: list[tuple[ShotKind, float]], offset: int = 0) -> tuple[Shot, ...]:
    """Shots whose colour, shape, direction and background change from each to the next.

    Cycling indices at different strides walks through many of the 4×3×4×4 combinations;
    `offset` shifts the walk so different files show different combinations.
    """
    colors, backgrounds = tuple(COLORS), tuple(BACKGROUNDS)
    shots = []
    for j, (kind, duration_s) in enumerate(kinds_and_durations):
        i = j + offset
        shots.append(
            Shot(
                kind=kind,
                duration_s=duration_s,
                color=colors[i % 4],
                shape=SHAPES[i % 3],
                direction=DIRECTIONS[(i + i // 4) % 4],
                # Steps of +1, or +3 every 4 shots: always odd, so dark and light alternate.
                background=backgrounds[(i + 1 + 2 * (i // 4)) % 4],
            )
        )
    return tuple(shots)


def _moving(*durations: float) -> list[tuple[ShotKind, float]]:
    return [("moving", d) for d in durations]


def standard_specs() -> list[FootageSpec]:
    """The test catalogue: containers, codecs, sizes, rates, VFR, odd size, audio, rotation.

    Kept short (≈40 s of video in all, most files 2–8 s) so the whole suite encodes in seconds.
    """
    specs = [
        # Hard cuts between moving shots, a frozen shot, .srt sidecar; the determinism reference.
        FootageSpec("cuts_h264_320x240_25fps", "mp4", "libx264", 320, 240, Fraction(25),
                    varied_shots([("moving", 2.0), ("moving", 1.5), ("static", 1.0), ("moving", 1.5)]),
                    sidecar="srt"),
        # Fade out to black, fade in, and a near-black shot between moving shots.
        FootageSpec("fades_mpeg4_320x240_24fps", "avi", "mpeg4", 320, 240, Fraction(24),
                    varied_shots([("moving", 1.5), ("fade_out", 1.0), ("fade_in", 1.0), ("moving", 1.5),
                                  ("black", 1.0), ("moving", 1.0)], offset=4)),
        FootageSpec("msmpeg4v2_160x120_15fps", "avi", "msmpeg4v2", 160, 120, Fraction(15),
                    varied_shots(_moving(1.5, 1.5, 1.5), offset=10)),
        # Cinepak's vector quantiser is by far the slowest encoder here (~20 ms a 160x120 frame): keep it short.
        FootageSpec("cinepak_160x120_30fps", "mov", "cinepak", 160, 120, Fraction(30),
                    varied_shots(_moving(1.0, 1.0), offset=13)),
        FootageSpec("vp9_256x144_2997fps", "webm", "libvpx-vp9", 256, 144, Fraction(30000, 1001),
                    varied_shots(_moving(1.5, 1.5, 1.0), offset=15)),
        FootageSpec("h264_320x180_60fps", "mkv", "libx264", 320, 180, Fraction(60),
                    varied_shots(_moving(1.0, 1.0, 1.0), offset=18)),
        # Big frames, short file: exercises downscaling without costing CPU.
        FootageSpec("h264_1920x1080_30fps", "mp4", "libx264", 1920, 1080, Fraction(30),
                    varied_shots(_moving(0.75, 0.75), offset=21)),
        # Odd size: x264 refuses odd dims in 4:2:0, MPEG-4 Part 2 accepts them.
        FootageSpec("odd_mpeg4_321x241_25fps", "avi", "mpeg4", 321, 241, Fraction(25),
                    varied_shots(_moving(1.5, 1.5), offset=23)),
        FootageSpec("vfr_h264_320x240", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(1.5, 1.5, 1.0), offset=25), vfr=True),
        # One shot, so a whole-file .txt caption is true.
        FootageSpec("audio_h264_aac_320x240_30fps", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(3.0), offset=28), audio=True, sidecar="txt"),
        # Portrait phone footage: stored 320x240, shown 240x320.
        FootageSpec("rotated90_h264_320x240_30fps", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(1.5, 1.5), offset=29), rotation=90),
    ]  # fmt: skip
    if encoder_available("libtheora"):  # no Theora encoder in the PyAV wheels; appears where one exists
        specs.append(FootageSpec("theora_320x240_25fps", "ogv", "libtheora", 320, 240, Fraction(25),
                                 varied_shots(_moving(1.5, 1.5), offset=31)))  # fmt: skip
    return specs


def demo_specs() -> list[FootageSpec]:
    """What `make demo` ingests: 4 small files, 12–16 s each, several 2–3 s shots, .srt sidecars.

    Mostly moving shots (the training signal), one frozen shot and one fade pair, so the
    demo also shows the filters and the scene splitter at work.
    """
    return [
        FootageSpec("demo_a_h264_256x144_24fps", "mp4", "libx264", 256, 144, Fraction(24),
                    varied_shots(_moving(2.5, 3.0, 2.5, 3.0, 2.5), offset=0), sidecar="srt"),
        FootageSpec("demo_b_h264_320x240_25fps", "mp4", "libx264", 320, 240, Fraction(25),
                    varied_shots([("moving", 3.0), ("static", 2.0), ("moving", 2.5), ("moving", 3.0),
                                  ("moving", 2.5)], offset=5), sidecar="srt"),
        FootageSpec("demo_c_h264_192x144_30fps", "mkv", "libx264", 192, 144, Fraction(30),
                    varied_shots([("moving", 2.5), ("fade_out", 1.5), ("fade_in", 1.5), ("moving", 3.0),
                                  ("moving", 2.5), ("moving", 2.5)], offset=10), sidecar="srt"),
        FootageSpec("demo_d_mpeg4_160x128_24fps", "avi", "mpeg4", 160, 128, Fraction(24),
                    varied_shots(_moving(3.0, 2.5, 3.0, 2.5, 3.0), offset=16), sidecar="srt"),
    ]  # fmt: skip


def _write_all(specs: list[FootageSpec], out_dir: Path, desc: str) -> list[GeneratedVideo]:
    out_dir = Path(out_dir)
    return [write_video(spec, out_dir / spec.filename) for spec in tqdm(specs, desc=desc, unit="file")]


def standard_suite(out_dir: Path) -> list[GeneratedVideo]:
    return _write_all(standard_specs(), out_dir, "encoding standard footage")


def demo_suite(out_dir: Path) -> list[GeneratedVideo]:
    return _write_all(demo_specs(), out_dir, "encoding demo footage")


def bad_files(out_dir: Path) -> dict[str, Path]:
    """Files ingestion must reject without crashing: name -> path.

    empty (0 bytes), truncated (an H.264 MP4 cut to 40%: its moov atom, written last, is
    gone), not_video (text and random bytes named .mp4), audio_only (AAC in .m4a),
    zero_frames (an AVI whose header declares an MPEG-4 video stream that has no frames).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "empty": out_dir / "bad_empty.mp4",
        "truncated": out_dir / "bad_truncated.mp4",
        "not_video": out_dir / "bad_not_video.mp4",
        "audio_only": out_dir / "bad_audio_only.m4a",
        "zero_frames": out_dir / "bad_zero_frames.avi",
    }
    paths["empty"].write_bytes(b"")

    whole = write_video(
        FootageSpec("whole", "mp4", "libx264", 160, 120, Fraction(25), varied_shots(_moving(1.0, 1.0))),
        out_dir / "bad_truncated.full.mp4",
    )
    data = whole.path.read_bytes()
    whole.path.unlink()
    paths["truncated"].write_bytes(data[: int(len(data) * 0.4)])

    rng = np.random.default_rng(0)
    paths["not_video"].write_bytes(b"this is not a video, just text and noise\n" + rng.bytes(4096))

    with av.open(str(paths["audio_only"]), "w", format="mp4", options=MUXER_OPTIONS) as container:
        track = _AudioTrack(container)
        track.encode_until(1.0)
        track.encode_until(None)

    # AVI writes its stream header even with no packets; MP4/MKV/WebM drop an empty track
    # or fail to open, which would not test "a video stream with zero frames".
    with av.open(str(paths["zero_frames"]), "w", options=MUXER_OPTIONS) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        container.start_encoding()
    return paths


DAMAGED_SOURCE = FootageSpec(
    "damaged_source", "mp4", "libx264", 160, 120, Fraction(25), varied_shots(_moving(1.0, 1.0), offset=3)
)


def damaged_files(out_dir: Path) -> dict[str, Path]:
    """Files that open and declare frames but end early: name -> path. Both are cut from
    encodings of `DAMAGED_SOURCE` (50 frames, a cut at frame 25), so the frames that do
    decode match its truth.

    cut_data: a faststart MP4 (index first) cut to 70%: opens, declares 50 frames, then
    decoding raises InvalidDataError part way. cut_silently: an MKV cut to 50%: decoding
    just stops early, without an error, so only a frame count shows the loss.
    """
    out_dir = Path(out_dir)
    paths = {"cut_data": out_dir / "damaged_cut_data.mp4", "cut_silently": out_dir / "damaged_cut_silently.mkv"}
    for (name, path), spec, keep in zip(
        paths.items(),
        (replace(DAMAGED_SOURCE, faststart=True), replace(DAMAGED_SOURCE, container="mkv")),
        (0.7, 0.5),
    ):
        whole = write_video(spec, path.with_suffix(".full" + path.suffix))
        data = whole.path.read_bytes()
        whole.path.unlink()
        path.write_bytes(data[: int(len(data) * keep)])
    return paths


def write_truth(
    videos: list[GeneratedVideo],
    path: Path,
    bad: dict[str, Path] | None = None,
    damaged: dict[str, Path] | None = None,
) -> Path:
    """Write truth.json: {"videos": [GeneratedVideo.to_json(), ...], "bad": {name: file},
    "damaged": {name: file}}."""
    path = Path(path)
    truth = {
        "generator": "pipelines.footage",
        "videos": [video.to_json() for video in videos],
        "bad": {name: bad_path.name for name, bad_path in (bad or {}).items()},
        "damaged": {name: damaged_path.name for name, damaged_path in (damaged or {}).items()},
    }
    path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return path


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from infra.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="reelforge demo-footage",
        description="Write synthetic footage with known cuts and captions, plus truth.json.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the files and truth.json into")
    parser.add_argument("--suite", choices=("demo", "standard", "bad", "all"), default="demo")
    args = parser.parse_args(argv)
    setup_logging()

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"out_dir {str(out_dir)!r} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    videos: list[GeneratedVideo] = []
    bad: dict[str, Path] = {}
    damaged: dict[str, Path] = {}
    if args.suite in ("demo", "all"):
        videos += demo_suite(out_dir)
    if args.suite in ("standard", "all"):
        videos += standard_suite(out_dir)
    if args.suite in ("bad", "all"):
        bad = bad_files(out_dir)
        damaged = damaged_files(out_dir)
    truth = write_truth(videos, out_dir / "truth.json", bad, damaged)

    print("| file | size | fps | frames | seconds | hard cuts |")
    print("|---|---|---|---|---|---|")
    for v in videos:
        s = v.spec
        print(f"| {v.path.name} | {s.width}x{s.height} | {float(s.fps):.3f}{' vfr' if s.vfr else ''} | "
              f"{v.num_frames} | {v.duration_s:.2f} | {len(v.cut_times_s)} |")  # fmt: skip
    for kind, files in (("bad", bad), ("damaged", damaged)):
        for name, file_path in files.items():
            print(f"| {file_path.name} | {kind}: {name} | | | | |")
    logger.info("wrote %d videos, %d bad and %d damaged files, and %s", len(videos), len(bad), len(damaged), truth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
