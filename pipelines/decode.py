"""Single-pass streaming decode: every source frame is decoded once and converted once per use.

`iter_frames` yields each decoded frame with its time in seconds from the stream start
(VFR safe: time comes from pts, not from a frame counter). `FrameGeometry` holds the sizes and
`FrameConverter` the two conversions the ingest needs, both done by FFmpeg's swscale
(C, no Python per pixel):

* detect frame: BGR24 at `scenes.detect_width` (PySceneDetect's frame format), not rotated;
  cut scores do not depend on orientation.
* clip frame: RGB24 resized so it covers `clips.size` after the display rotation, then
  rotated and center cropped to exactly `clips.size` (H, W, 3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameGeometry:
    """Sizes for one source: coded size, display rotation and the two target sizes."""

    source_width: int
    source_height: int
    rotation: int  # counter-clockwise degrees to display the coded frame (VideoFrame.rotation), one of 0/90/180/270
    clip_width: int
    clip_height: int
    detect_width: int

    @property
    def display_size(self) -> tuple[int, int]:
        if self.rotation in (90, 270):
            return self.source_height, self.source_width
        return self.source_width, self.source_height

    @property
    def detect_size(self) -> tuple[int, int]:
        """(w, h) of the detect frame: the coded frame scaled to detect_width, never upscaled."""
        if self.source_width <= self.detect_width:
            return self.source_width, self.source_height
        scale = self.detect_width / self.source_width
        return self.detect_width, max(1, round(self.source_height * scale))

    @property
    def resize_size(self) -> tuple[int, int]:
        """(w, h) to reformat the *coded* frame to, so that after rotation it covers the clip size
        with the aspect ratio kept (the excess is center-cropped)."""
        display_w, display_h = self.display_size
        scale = max(self.clip_width / display_w, self.clip_height / display_h)
        resized_w = max(self.clip_width, math.ceil(display_w * scale - 1e-6))
        resized_h = max(self.clip_height, math.ceil(display_h * scale - 1e-6))
        if self.rotation in (90, 270):
            return resized_h, resized_w
        return resized_w, resized_h

class FrameConverter:
    """Converts decoded frames of one source to the detect and clip frames of its FrameGeometry.

    Two swscale steps per target, each with its own kept context: first scale in the source's
    own pixel format (YUV scaling has SIMD paths), then convert colours at the small size.
    Measured per 1080p frame: 0.8 ms, against 2.0 ms for scaling straight into RGB and 10 ms for
    full-size RGB plus cv2.resize. Kept contexts matter as much: `VideoFrame.reformat` builds
    a new swscale context on every call (2 ms each at 568x320, more than decoding the frame).
    One swscale thread: Ray runs one worker per CPU, and slice threads on 256-px frames cost
    more in hand-offs than they save (measured 0.6 ms vs 0.9-4 ms per 568x320 frame under load).
    """

    def __init__(self, geometry: FrameGeometry):
        self.geometry = geometry
        self._detect_scale, self._detect_rgb = VideoReformatter(), VideoReformatter()
        self._clip_scale, self._clip_rgb = VideoReformatter(), VideoReformatter()

    def detect_frame(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.geometry.detect_size
        # FAST_BILINEAR (no prefilter) scores frames like PySceneDetect's cv2.resize(INTER_LINEAR):
        # with swscale's filtered BILINEAR a fade-through-black cut moved by 3 frames. It is also the cheapest.
        small = self._detect_scale.reformat(frame, width, height, interpolation="FAST_BILINEAR", threads=1)
        return self._detect_rgb.reformat(small, format="bgr24", threads=1).to_ndarray()  # (h, w, 3)

    def clip_frame(self, frame: av.VideoFrame) -> np.ndarray:
        geometry = self.geometry
        width, height = geometry.resize_size
        small = self._clip_scale.reformat(frame, width, height, interpolation="AREA", threads=1)
        rgb = self._clip_rgb.reformat(small, format="rgb24", threads=1).to_ndarray()  # (h, w, 3)
        if geometry.rotation:
            # np.rot90 turns counter-clockwise, the same sense as VideoFrame.rotation.
            rgb = np.rot90(rgb, k=geometry.rotation // 90)  # (H', W', 3) display orientation
        top = (rgb.shape[0] - geometry.clip_height) // 2
        left = (rgb.shape[1] - geometry.clip_width) // 2
        return np.ascontiguousarray(rgb[top : top + geometry.clip_height, left : left + geometry.clip_width])  # (H, W, 3)


def normalize_rotation(degrees: int | None) -> int:
    """VideoFrame.rotation is in [-180, 180]; snap to 0/90/180/270 (odd angles do not occur in
    phone footage, and a non-right angle would need a resampling rotate we do not do)."""
    return (round((degrees or 0) / 90) * 90) % 360


def iter_frames(container: av.container.InputContainer, fps_hint: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time_s from stream start, frame) for every decodable frame of the first video stream.

    Decoding errors propagate (av.error.FFmpegError) so the caller can record where they happened.
    """
    stream = container.streams.video[0]
    # One decoding thread: a Ray ingest actor holds 1 CPU and runs beside one actor per other CPU, so
    # throughput is CPU time per frame, and FFmpeg's frame threads (AUTO: CPUs + 1 threads) cost
    # more of it: SourceProcessor CPU ms per source frame 2.27 vs 2.15 (540p), 1.81 vs 1.70 (360p),
    # equal at 1080p (docs/benchmarks.md). A lone long source loses wall time; many sources do not.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    start_pts = stream.start_time or 0
    time_base = stream.time_base
    index = 0
    last_time = -math.inf
    for frame in container.decode(stream):
        if frame.pts is not None and time_base:
            time_s = float((frame.pts - start_pts) * time_base)
        else:
            time_s = index / fps_hint  # raw streams without timestamps
        if time_s <= last_time:
            # Duplicate or out-of-order timestamps (broken muxers): keep time strictly increasing
            # so scene cuts and clip spans stay ordered.
            time_s = last_time + 1e-6
        last_time = time_s
        index += 1
        yield time_s, frame
