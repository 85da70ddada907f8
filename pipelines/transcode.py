"""Encode a clip's frames, already at `clips.size`, to H.264 MP4 bytes.

The output is what training reads: yuv420p (every decoder, every browser), a keyframe at
frame 0 (a clip decodes from its first byte), `faststart` (moov atom first, so a reader can
start before the whole member arrives), constant frame rate `clips.fps`.

Deterministic: the same frames give the same bytes. x264 output depends on thread count
(frame threads split rate control), so libx264 runs with one thread (clips are small and a
Ray ingest runs one encoder per CPU anyway) and without mbtree (see `encoder_options`).
RGB→YUV is cv2's, bit-exact. The MP4 muxer writes no wall-clock time unless asked
(`creation_time` is unset), so nothing else varies between runs.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from fractions import Fraction

import av
import cv2
import numpy as np
from PIL import Image

from pipelines.probe import h264_encoder

logger = logging.getLogger(__name__)

_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def encoder_options(encoder: str, crf: int, preset: str) -> dict[str, str]:
    """Quality options per encoder: only libx264 understands crf/preset; the fallbacks get a
    bitrate-free quality knob where they have one."""
    match encoder:
        case "libx264":
            # mbtree off: with it, x264 165 gave different bytes for the same frames at small sizes
            # (64x64, 96x64) depending on what the process had encoded before (it reads memory it did
            # not set). Costs a few percent of size at equal crf; reproducible shards are worth it.
            return {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "mbtree=0"}
        case "h264_nvenc":
            return {"cq": str(crf), "preset": "p4"}
        case "h264_qsv":
            return {"global_quality": str(crf)}
        case _:
            return {}


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    crf: int = 23,
    preset: str = "superfast",
    encoder: str | None = None,
) -> bytes:
    """MP4 bytes of `frames`, (T, H, W, 3) uint8 RGB with even H and W, at constant `fps`."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("cannot encode a clip with zero frames")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 4:2:0 needs even frame sizes, got {width}x{height}")
    encoder = encoder or h264_encoder()
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
    # faststart rewrites the finished file to move the moov atom first, which FFmpeg does by
    # reopening it by name: it cannot work on a BytesIO, so the clip goes through a temp file
    # (in RAM under /dev/shm where that exists).
    with tempfile.TemporaryDirectory(dir=_SCRATCH_DIR, prefix="reelforge-clip-") as scratch:
        path = os.path.join(scratch, "clip.mp4")
        _encode_to(path, frames, rate, encoder, encoder_options(encoder, crf, preset))
        with open(path, "rb") as f:
            return f.read()


def _encode_to(path: str, frames: np.ndarray, rate: Fraction, encoder: str, options: dict[str, str]) -> None:
    num_frames, height, width, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        if encoder == "libx264":
            stream.codec_context.thread_count = 1
        for index in range(num_frames):
            # BT.601 limited range, as swscale's default; cv2 is bit-exact whatever the memory
            # layout, which keeps the bytes reproducible (swscale runs sometimes differed by ±1).
            yuv = cv2.cvtColor(frames[index], cv2.COLOR_RGB2YUV_I420)  # (H * 3 / 2, W): Y, U, V planes
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def jpeg_thumbnail(rgb: np.ndarray, width: int = 128, quality: int = 80) -> bytes:
    """Small JPEG of one (H, W, 3) uint8 RGB frame for report.html."""
    image = Image.fromarray(rgb)
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
