"""Frames a captioning model sees: N frames of a clip, scaled to a pixel budget, as JPEG.

Captioning models take a handful of frames, not a video: `caption.frames` spread evenly over the
clip (the middle of each of N equal spans, so a 1-frame request sees the middle frame), or with
`caption.frames_fps` one frame every 1/fps seconds, at most `caption.frames`. Each frame is scaled
down (never up) to at most `caption.max_pixels` pixels with its aspect kept, and encoded as JPEG:
the form an OpenAI-compatible endpoint takes as a data URL and a small one to move between Ray
workers (a 448x448 JPEG is ~30 kB; the RGB array 600 kB).

Two callers: the recaption job decodes a shard's MP4 (`frames_from_mp4`), and ingest-time
captioning hands over the clip's frames it already holds (`select_frames` + `encode_frames`), so
no clip is decoded twice.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import av
import cv2
import numpy as np

from pipelines.config import CaptionConfig


def frame_indices(num_frames: int, fps: float | None, cfg: CaptionConfig) -> list[int]:
    """Indices of the frames to show, in order, for a clip of `num_frames` frames at `fps`."""
    if num_frames < 1:
        return []
    count = min(cfg.frames, num_frames)
    if cfg.frames_fps and fps:
        # One frame every 1/frames_fps seconds, centred in the clip, at most `frames` of them.
        step = fps / cfg.frames_fps
        count = min(count, max(1, math.floor(num_frames / step)))
        first = (num_frames - step * (count - 1)) / 2
        positions = [first + step * i for i in range(count)]
    else:
        positions = [(i + 0.5) * num_frames / count for i in range(count)]
    return sorted({min(num_frames - 1, int(p)) for p in positions})


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_pixels` pixels, aspect kept, even sides."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def encode_frames(frames: Sequence[np.ndarray], cfg: CaptionConfig) -> tuple[bytes, ...]:
    """(H, W, 3) uint8 RGB frames -> JPEG bytes, each scaled to the pixel budget."""
    encoded = []
    for rgb in frames:
        height, width = rgb.shape[:2]
        size = fit_pixels(width, height, cfg.max_pixels)
        if size != (width, height):
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise ValueError(f"JPEG encoding failed for a {width}x{height} frame")
        encoded.append(jpeg.tobytes())
    return tuple(encoded)


def select_frames(frames: np.ndarray, fps: float | None, cfg: CaptionConfig) -> list[np.ndarray]:
    """The frames to show out of a clip's (T, H, W, 3) frames."""
    return [frames[i] for i in frame_indices(len(frames), fps, cfg)]


def frames_from_mp4(data: bytes, num_frames: int | None, fps: float | None, cfg: CaptionConfig) -> tuple[bytes, ...]:
    """Decode an MP4 clip and return the JPEG frames to show. `num_frames`/`fps` come from the
    clip's metadata, so only the chosen frames are converted to RGB; a stream shorter than its
    metadata says (a truncated member) is decoded again to choose among the frames it has.
    Raises ValueError for a clip that cannot be decoded or has no frames."""
    picked, count, stream_fps = _decode(data, lambda total, rate: frame_indices(num_frames or total, fps or rate, cfg))
    if count == 0:
        raise ValueError("the clip has no frames")
    if num_frames and count < num_frames:
        picked, count, _ = _decode(data, lambda total, rate: frame_indices(count, fps or rate, cfg))
    return encode_frames([picked[i] for i in sorted(picked)], cfg)


def _decode(data: bytes, choose) -> tuple[dict[int, np.ndarray], int, float | None]:
    """({index: RGB frame} for the indices `choose(stream frames, stream fps)` names, frames decoded, fps)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("the clip has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or None
            wanted = set(choose(stream.frames or 0, rate))
            picked: dict[int, np.ndarray] = {}
            count = 0
            for frame in container.decode(stream):
                if count in wanted:
                    picked[count] = frame.to_ndarray(format="rgb24")
                count += 1
    except (av.FFmpegError, EOFError) as exc:
        raise ValueError(f"cannot decode the clip: {getattr(exc, 'strerror', None) or exc}") from None
    return picked, count, rate
