"""Clip encoding: real H.264 MP4 bytes, decoded back with PyAV."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.config import ClipsConfig
from pipelines.transcode import encode_mp4, jpeg_thumbnail


def _moving_square(num_frames: int, height: int, width: int) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), np.uint8)  # (T, H, W, 3)
    frames[..., 2] = np.linspace(40, 200, width, dtype=np.uint8)[None, None, :]
    for t in range(num_frames):
        x = 4 + 3 * t
        frames[t, 10:30, x : x + 20] = (230, 40, 40)
    return frames


def test_mp4_decodes_to_the_frames_size_and_rate():
    frames = _moving_square(num_frames=18, height=48, width=64)
    data = encode_mp4(frames, fps=12.0, crf=18)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = [f for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 12
        assert container.format.name.startswith("mov,mp4")
    assert len(decoded) == 18
    assert decoded[0].key_frame, "a clip must start on a keyframe"
    assert {(f.width, f.height, f.format.name) for f in decoded} == {(64, 48, "yuv420p")}
    # Lossy but close: the red square is where we drew it.
    rgb = decoded[5].to_ndarray(format="rgb24")
    assert np.abs(rgb.astype(int) - frames[5].astype(int)).mean() < 6
    # faststart: the moov atom precedes the media data.
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_same_frames_give_the_same_bytes():
    frames = _moving_square(num_frames=24, height=32, width=32)
    assert encode_mp4(frames, fps=24.0) == encode_mp4(frames, fps=24.0)
    assert encode_mp4(frames, fps=24.0, crf=30) != encode_mp4(frames, fps=24.0, crf=18)


def test_ntsc_rate_is_kept_exactly():
    data = encode_mp4(_moving_square(6, 32, 32), fps=30000 / 1001)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].average_rate == pytest.approx(30000 / 1001, rel=1e-4)


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), "zero frames"),
        (np.zeros((2, 31, 32, 3), np.uint8), "even width and height"),
        (np.zeros((2, 32, 32), np.uint8), "(T, H, W, 3)"),
    ],
)
def test_bad_frames_fail_with_a_clear_message(frames, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_mp4(frames, fps=24.0)


def test_thumbnail_is_a_small_jpeg():
    data = jpeg_thumbnail(_moving_square(1, 96, 256)[0], width=128)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (128, 48)


def test_the_configured_x264_preset_reaches_the_encoder():
    """x264 writes its settings into the stream (an SEI message): the preset decides them.
    superfast, the default since it saves a quarter of the encode time: subme=1, me=dia."""
    frames = _moving_square(num_frames=12, height=48, width=64)
    assert b"subme=1 " in encode_mp4(frames, fps=12.0, preset="superfast")
    assert b"subme=2 " in encode_mp4(frames, fps=12.0, preset="veryfast")
    assert ClipsConfig().x264_preset == "superfast"
    assert b"subme=1 " in encode_mp4(frames, fps=12.0)
