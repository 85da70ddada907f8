"""Frame timing, drawing and encoding: `render_frames(spec)` and `write_video(spec, path)`."""

from __future__ import annotations

import bisect
import filecmp
import logging
import math
import os
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from infra.footage.spec import (
    AUDIO_RATE,
    AUDIO_TONE_HZ,
    BACKGROUNDS,
    BITS_PER_PIXEL,
    CODEC_OPTIONS,
    COLORS,
    MUXER_OPTIONS,
    NEAR_BLACK_RGB,
    SHAPE_RADIUS_FRAC,
    TRAVEL_FROM,
    TRAVEL_TO,
    DARK_END,
    DARK_START,
    FootageSpec,
    GeneratedVideo,
    Shot,
)
from model.storage import file_sha256

logger = logging.getLogger(__name__)

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


# Visualiser shots: a luma swirl that drifts slowly under colours that turn VISUALISER_TURN_DEG round
# the colour wheel on every frame. The colours turn in the CbCr plane, so luma (and with it the motion
# score) stays calm while hue, which ContentDetector weighs, jumps: it scores ~45 per frame, against
# its default threshold of 27, where AdaptiveDetector's rolling average sees no cut at all.
VISUALISER_TURN_DEG = 90.0
VISUALISER_CHROMA = 70.0  # CbCr radius: strongly coloured, and inside the RGB gamut at this luma


def _visualiser(index_in_shot: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: frame `index_in_shot` of a visualiser shot."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    dy, dx = yy - height / 2, xx - width / 2
    radius = np.hypot(dy, dx) / min(height, width)  # (H, W), 0 at the centre
    angle = np.arctan2(dy, dx)  # (H, W)
    # Rings and spokes fine enough for the sharpness filter (Laplacian variance ~25 at 256x256).
    luma = 120 + 50 * np.sin(60 * radius - 0.4 * index_in_shot) * np.cos(8 * angle)
    hue = 3 * angle + 8 * radius + math.radians(VISUALISER_TURN_DEG) * index_in_shot
    ycrcb = np.stack([luma, 128 + VISUALISER_CHROMA * np.cos(hue), 128 + VISUALISER_CHROMA * np.sin(hue)], axis=-1)
    return cv2.cvtColor(np.clip(ycrcb, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)  # (H, W, 3)


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
        if shot.kind == "visualiser":
            img = _visualiser(index_in_shot, disp_h, disp_w)  # (H, W, 3) display orientation
        else:
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


class AudioTrack:
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
    # The temp name is this writer's own: two writers of one path (two `make demo`s, two test
    # sessions sharing a folder) would otherwise interleave their bytes in one temp file.
    tmp_path = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        options = MUXER_OPTIONS | ({"movflags": "+faststart"} if spec.faststart else {})
        with av.open(str(tmp_path), "w", options=options) as container:
            video = _add_video_stream(container, spec)
            audio = AudioTrack(container) if spec.audio else None
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
    soft = {k for k in boundaries if spec.shots[k - 1].kind in DARK_END and spec.shots[k].kind in DARK_START}
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
        sha256=file_sha256(path),
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

