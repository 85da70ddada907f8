"""The footage vocabulary and what a file is: `Shot`, `FootageSpec` (what to encode) and
`GeneratedVideo` (a written file and its truth). See infra/footage/__init__.py for the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av

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

# "visualiser": continuous, fast-changing content like a music visualiser. Its colours turn a
# quarter of the way round the colour wheel on every frame, so PySceneDetect's ContentDetector
# fires on nearly every frame although there is no cut (real visualiser footage did the same).
ShotKind = Literal["moving", "static", "black", "fade_out", "fade_in", "visualiser"]
SHOT_KINDS: tuple[str, ...] = ("moving", "static", "black", "fade_out", "fade_in", "visualiser")
DARK_START = ("fade_in", "black")  # kinds whose first frame is (near) black
DARK_END = ("fade_out", "black")  # kinds whose last frame is (near) black
PATTERN_KINDS = ("black", "visualiser")  # kinds that show no shape, colour or background of their own

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
# render._add_video_stream sets the codec context's thread_count to 1, which libav's libx264
# wrapper passes on as x264's `threads`; x264 then derives one lookahead thread and no sliced
# threads. x264-params states all three, so no default of a future x264 or FFmpeg can bring
# threads back (the options x264 records in every stream's SEI are the same, and so are the bytes).
X264_SINGLE_THREAD = "threads=1:lookahead-threads=1:sliced-threads=0"
CODEC_OPTIONS: dict[str, dict[str, str]] = {
    # log=0: errors only, no stats on stderr
    "libx264": {"preset": "veryfast", "crf": "16", "x264-params": f"log=0:{X264_SINGLE_THREAD}"},
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
    `black` and `visualiser` shots and `direction` by `static` ones; `caption` says what is on screen."""

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
        if self.kind == "visualiser":
            return "a swirl of colours changing on every frame"
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
                    "color": None if shot.kind in PATTERN_KINDS else shot.color,
                    "shape": None if shot.kind in PATTERN_KINDS else shot.shape,
                    "direction": None if shot.kind in (*PATTERN_KINDS, "static") else shot.direction,
                    "background": None if shot.kind in PATTERN_KINDS else shot.background,
                    "caption": shot.caption,
                    "start_s": start,
                    "end_s": end,
                }
                for shot, (start, end) in zip(spec.shots, self.shot_spans_s)
            ],
            "sidecar": self.sidecar.name if self.sidecar else None,
            "sha256": self.sha256,
        }

