"""model/video_io.py on real files written by PyAV and PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.mp4 import write_mp4
from model.video_io import from_model, read_image, read_video, to_model


def _moving_square(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    """A bright square stepping right 2 px per frame on a gradient: each frame is distinct."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
    for t in range(num_frames):
        frames[t, 8:20, 2 * t : 2 * t + 12, :2] = 230
    return frames


def test_mp4_round_trip_keeps_frames_and_size(tmp_path):
    frames = _moving_square(12)
    path = tmp_path / "clip.mp4"
    assert write_mp4(frames, 8, path) is None
    decoded = read_video(path)
    assert decoded.dtype == torch.uint8
    assert tuple(decoded.shape) == (12, 32, 48, 3)
    # H.264 at crf 18 is lossy but close.
    assert (decoded.float() - torch.from_numpy(frames).float()).abs().mean() < 6

    data = write_mp4(torch.from_numpy(frames), 8)
    assert isinstance(data, bytes) and data[4:8] == b"ftyp"
    assert tuple(read_video(data, num_frames=5).shape) == (5, 32, 48, 3)


def test_resample_fps_and_resize(tmp_path):
    frames = _moving_square(16)
    path = tmp_path / "clip.mp4"
    write_mp4(frames, 16, path)
    # 16 frames at 16 fps = 1 s; at 4 fps: frames 0, 4, 8, 12.
    slow = read_video(path, fps=4)
    assert slow.shape[0] == 4
    full = read_video(path)
    for k in range(4):
        assert torch.equal(slow[k], full[4 * k])
    # Upsampling holds each frame: 32 fps doubles every frame.
    fast = read_video(path, fps=32)
    assert fast.shape[0] == 32 and torch.equal(fast[2], full[1]) and torch.equal(fast[3], full[1])
    small = read_video(path, size=(16, 16), num_frames=3)
    assert tuple(small.shape) == (3, 16, 16, 3)
    assert torch.equal(read_video(path, last_frames=3), full[-3:])
    assert torch.equal(read_video(path, fps=4, last_frames=2), slow[-2:])
    assert torch.equal(read_video(path, fps=32, last_frames=3), fast[-3:])


def test_bad_video_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not found.*missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="cannot read video.*junk.mp4"):
        read_video(junk)
    path = tmp_path / "short.mp4"
    write_mp4(_moving_square(4), 8, path)
    with pytest.raises(ValueError, match="has 4 frames, 10 needed"):
        read_video(path, num_frames=10)
    with pytest.raises(ValueError, match="has 4 frames, 5 needed"):
        read_video(path, last_frames=5)
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(np.zeros((2, 15, 16, 3), np.uint8), 8, None)


def test_read_image_cover_crop_and_errors(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "wide.png")
    exact = read_image(tmp_path / "wide.png")
    assert torch.equal(exact, torch.from_numpy(array))
    # 40x20 -> cover 32x16 then crop the center 16x16: no stretching.
    cropped = read_image(tmp_path / "wide.png", size=(16, 16))
    assert tuple(cropped.shape) == (16, 16, 3)
    # size equal to the image's own size returns it unchanged.
    assert torch.equal(read_image(tmp_path / "wide.png", size=(40, 20)), exact)
    with pytest.raises(ValueError, match="image file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image.*bad.png"):
        read_image(tmp_path / "bad.png")


def test_to_model_from_model_exact():
    frames = torch.randint(0, 256, (5, 8, 12, 3), dtype=torch.uint8)
    video = to_model(frames)
    assert tuple(video.shape) == (1, 3, 5, 8, 12)
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(from_model(video), frames)
    assert torch.equal(from_model(video[0]), frames)
    image = to_model(frames[0])
    assert tuple(image.shape) == (1, 3, 1, 8, 12)
