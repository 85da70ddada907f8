"""Frames -> H.264 MP4: the one MP4 writer of reelforge (generated videos, eval samples, ingested clips).

Its own module, apart from model/video_io.py's readers, because it needs no torch: an ingest actor
that encodes clips would otherwise pay torch's import (about 1.5 s of CPU and 180 MB) for nothing.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def write_mp4(
    frames: torch.Tensor | np.ndarray,
    fps: float,
    path: str | Path | None = None,
    *,
    crf: int = 18,
    encoder: str = "libx264",
    options: dict[str, str] | None = None,
    faststart: bool = False,
    to_yuv420: Callable[[np.ndarray], np.ndarray] | None = None,
) -> bytes | None:
    """Encode uint8 RGB frames `(T, H, W, 3)` as H.264 yuv420p MP4 at constant `fps` (plays everywhere):
    the one MP4 writer of reelforge (generated videos, eval samples, ingested clips).

    Writes to `path` and returns None, or returns the MP4 bytes when `path` is None.
    options: the encoder's options; default libx264 at `crf` (18 is visually near-lossless for
        generated frames at modest bitrates), preset medium. A "threads" option also sets the codec
        context's thread count, since x264's output depends on it.
    faststart: put the index (moov atom) first, so a reader can start before the whole file has
        arrived. FFmpeg does that by reopening the finished file by name, so bytes go through a
        temp file (in RAM under /dev/shm where that exists).
    to_yuv420: an RGB (H, W, 3) -> I420 (H * 3 / 2, W) converter; default FFmpeg's swscale. Pass a
        bit-exact one (cv2's) when the same frames must always give the same bytes.
    """
    array = frames.cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames)  # a torch tensor or an array
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {array.dtype} {tuple(array.shape)}")
    num_frames, height, width, _ = array.shape
    if num_frames == 0:
        raise ValueError("cannot write an MP4 with 0 frames")
    if height % 2 or width % 2:
        # yuv420p stores chroma at half resolution in both directions.
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    options = {"crf": str(crf), "preset": "medium"} if options is None else options
    if faststart:
        with tempfile.TemporaryDirectory(dir=_SCRATCH_DIR, prefix="reelforge-mp4-") as scratch:
            scratch_path = os.path.join(scratch, "video.mp4")
            _encode(array, fps, scratch_path, encoder, options, to_yuv420, {"movflags": "+faststart"})
            if path is None:
                with open(scratch_path, "rb") as handle:
                    return handle.read()
            shutil.move(scratch_path, path)
    else:
        target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
        _encode(array, fps, target, encoder, options, to_yuv420, {})
        if path is None:
            return target.getvalue()
    logger.info("wrote %s (%d frames, %dx%d, %.3g fps)", path, num_frames, width, height, fps)
    return None


_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _encode(
    array: np.ndarray,
    fps: float,
    target: io.BytesIO | str,
    encoder: str,
    options: dict[str, str],
    to_yuv420: Callable[[np.ndarray], np.ndarray] | None,
    muxer_options: dict[str, str],
) -> None:
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
    with av.open(target, mode="w", format="mp4", options=muxer_options) as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
        stream.codec_context.time_base = 1 / rate
        if "threads" in options:
            stream.codec_context.thread_count = int(options["threads"])
        for index, rgb in enumerate(array):
            if to_yuv420 is None:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            else:
                frame = av.VideoFrame.from_ndarray(to_yuv420(rgb), format="yuv420p")  # (H * 3 / 2, W): Y, U, V planes
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
