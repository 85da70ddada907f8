"""Video and image files <-> tensors, for generation inputs and outputs.

Frames travel as uint8 tensors `(T, H, W, 3)` (RGB) between files and the pipeline, and as
float tensors `(1, 3, T, H, W)` in [-1, 1] inside the model; `to_model` / `from_model` convert
exactly (uint8 -> float -> uint8 is the identity), so conditioning frames survive a round trip.

Decoding and encoding use PyAV (FFmpeg). Resizing goes through FFmpeg's swscale inside
`VideoFrame.reformat`, which is much faster than resizing decoded arrays in Python.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch

logger = logging.getLogger(__name__)

# Times closer than this (seconds) count as equal when resampling frame rates, so a target
# time that lands exactly on a source frame's timestamp picks that frame despite float error.
_TIME_EPS_S = 1e-6


def _open_source(path_or_bytes: str | Path | bytes) -> tuple[str, io.BytesIO | str]:
    """Return (name for messages, what av.open takes); missing files fail here with the path."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return "<bytes>", io.BytesIO(bytes(path_or_bytes))
    path = Path(path_or_bytes)
    if not path.is_file():
        raise ValueError(f"video file not found: {str(path)!r}")
    return repr(str(path)), str(path)


def _cover_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """Smallest size >= (width, height) with the source aspect ratio: scale to cover, then crop,
    so a conditioning frame is never stretched."""
    scale = max(width / src_w, height / src_h)
    return max(width, round(src_w * scale)), max(height, round(src_h * scale))


def _center_crop(array: np.ndarray, width: int, height: int) -> np.ndarray:
    top = (array.shape[0] - height) // 2
    left = (array.shape[1] - width) // 2
    return array[top : top + height, left : left + width]


def _frame_to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    width, height = size
    cover_w, cover_h = _cover_size(frame.width, frame.height, width, height)
    rgb = frame.to_ndarray(format="rgb24", width=cover_w, height=cover_h, interpolation="AREA")
    return _center_crop(rgb, width, height)  # (H, W, 3)


def read_video(
    path_or_bytes: str | Path | bytes,
    *,
    num_frames: int | None = None,
    last_frames: int | None = None,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decode a video into uint8 RGB frames `(T, H, W, 3)`.

    fps: resample to this rate (sample-and-hold: each output time takes the latest source frame
        at or before it), so a 30 fps clip conditions a model trained at 8 fps correctly.
    size: (width, height) of the output; the frame is scaled to cover it and center-cropped.
    num_frames: return exactly the first `num_frames` frames (after resampling); a video with
        fewer frames is an error, never silently padded.
    last_frames: return exactly the last `last_frames` frames; only those are converted to RGB and
        held, so extending a long video does not hold the whole video in memory.
    """
    name, source = _open_source(path_or_bytes)
    for label, value in (("num_frames", num_frames), ("last_frames", last_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if num_frames is not None and last_frames is not None:
        raise ValueError("give num_frames or last_frames, not both")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    try:
        container = av.open(source)
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read video {name}: {exc}") from exc
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {name}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: decoding dominates reading time
        try:
            selected = container.decode(stream)
            if fps is not None:
                selected = _sample_and_hold(selected, fps, _frame_interval_s(stream, fps))
            if num_frames is not None:
                selected = itertools.islice(selected, num_frames)
            if last_frames is not None:
                selected = collections.deque(selected, maxlen=last_frames)  # decoded frames, not yet RGB
            # Upsampling repeats a source frame: convert it once.
            previous, previous_rgb = None, None
            for frame in selected:
                if frame is not previous:
                    previous, previous_rgb = frame, _frame_to_rgb(frame, size)
                frames.append(previous_rgb)
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode video {name}: {exc}") from exc
    if not frames:
        raise ValueError(f"no frames decoded from {name}")
    needed = num_frames or last_frames
    if needed is not None and len(frames) < needed:
        raise ValueError(f"video {name} has {len(frames)} frames, {needed} needed")
    return torch.from_numpy(np.stack(frames))  # (T, H, W, 3)


def _frame_interval_s(stream: av.VideoStream, fps: float) -> float:
    """How long the last frame lasts: one source frame interval (the target's when unknown)."""
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else 1.0 / fps


def _sample_and_hold(
    frames: Iterator[av.VideoFrame], fps: float, last_frame_s: float
) -> Iterator[av.VideoFrame]:
    """Resample decoded frames to `fps`: output time k/fps (from the first frame's time) takes the
    latest source frame at or before it, so a source frame is repeated or skipped, never blended."""
    step_s = 1.0 / fps
    start_s = 0.0
    held: av.VideoFrame | None = None
    held_time_s = 0.0
    emitted = 0
    for frame in frames:
        time_s = frame.time if frame.time is not None else held_time_s + step_s
        if held is None:
            start_s = time_s
        while held is not None and start_s + emitted * step_s < time_s - _TIME_EPS_S:
            yield held
            emitted += 1
        held, held_time_s = frame, time_s
    if held is not None:
        while start_s + emitted * step_s < held_time_s + last_frame_s - _TIME_EPS_S:
            yield held
            emitted += 1


def read_image(path: str | Path, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file into uint8 RGB `(H, W, 3)`; `size` = (width, height), cover + center crop."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None:
                width, height = size
                cover_w, cover_h = _cover_size(image.width, image.height, width, height)
                if (cover_w, cover_h) != image.size:
                    image = image.resize((cover_w, cover_h), Image.Resampling.LANCZOS)
            array = np.array(image)  # a writable copy: torch tensors must own writable memory
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    if size is not None:
        array = _center_crop(array, *size)
    return torch.from_numpy(np.ascontiguousarray(array))  # (H, W, 3)


def to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 `(T, H, W, 3)` (or one image `(H, W, 3)`) -> float `(1, 3, T, H, W)` in [-1, 1]."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)  # (1, H, W, 3)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {tuple(frames.shape)}")
    video = frames.permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W)
    return video.float() / 127.5 - 1.0


def from_model(video: torch.Tensor) -> torch.Tensor:
    """float `(1, 3, T, H, W)` or `(3, T, H, W)` in [-1, 1] -> uint8 `(T, H, W, 3)`.

    Rounds to nearest, so from_model(to_model(x)) == x exactly."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"from_model takes one video, got batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got {tuple(video.shape)}")
    pixels = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(1, 2, 3, 0).contiguous()  # (T, H, W, 3)
