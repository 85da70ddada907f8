"""Probe rows for real encoded files and for every kind of bad file (never an exception)."""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs
import pytest

from pipelines.config import ClipsConfig
from pipelines.probe import PROBE_FIELDS, h264_encoder, probe_notes, probe_source, size_reject, upscale_factor

NAMES = (
    "cuts_h264_320x240_25fps",
    "fades_mpeg4_320x240_24fps",
    "cinepak_160x120_30fps",
    "vp9_256x144_2997fps",
    "audio_h264_aac_320x240_30fps",
    "rotated90_h264_320x240_30fps",
)


@pytest.fixture(scope="module")
def videos(standard_footage):
    return {name: standard_footage[name] for name in NAMES}


@pytest.fixture(scope="module")
def bad(bad_footage):
    return bad_footage


@pytest.mark.parametrize("name", NAMES)
def test_probe_reports_what_was_encoded(videos, name):
    video = videos[name]
    row = probe_source(str(video.path))
    assert tuple(row) == PROBE_FIELDS
    assert row["reject_stage"] is None and row["reject_reason"] is None
    assert row["size_bytes"] == video.path.stat().st_size
    assert row["sha256"] == hashlib.sha256(video.path.read_bytes()).hexdigest() == video.sha256
    assert (row["width"], row["height"]) == (video.spec.width, video.spec.height)
    assert row["fps"] == pytest.approx(float(video.spec.fps), rel=1e-3)
    assert abs(row["num_frames"] - video.num_frames) <= 1
    assert row["duration_s"] == pytest.approx(video.duration_s, abs=2 / float(video.spec.fps))
    assert row["rotation"] == video.spec.rotation
    assert row["has_audio"] == video.spec.audio
    assert row["pix_fmt"] and row["container"]
    expected_codec = {"libx264": "h264", "libvpx-vp9": "vp9"}.get(video.spec.codec, video.spec.codec)
    assert row["codec"] == expected_codec


def test_probe_reads_through_a_pyarrow_filesystem(videos):
    video = videos["cuts_h264_320x240_25fps"]
    local = probe_source(str(video.path))
    via_uri = probe_source(video.path.resolve().as_uri())  # file:///... through pyarrow
    fs = pafs.SubTreeFileSystem(str(video.path.parent), pafs.LocalFileSystem())
    via_fs = probe_source(video.path.name, filesystem=fs)
    for row in (via_uri, via_fs):
        assert {k: v for k, v in row.items() if k != "uri"} == {k: v for k, v in local.items() if k != "uri"}


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty file"),
        ("truncated", "not a video container ("),
        ("not_video", "not a video container ("),
        ("audio_only", "no video stream (audio only)"),
        ("zero_frames", "zero decodable frames"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(bad, kind, reason):
    row = probe_source(str(bad[kind]))
    assert tuple(row) == PROBE_FIELDS
    assert row["reject_stage"] == "probe"
    assert row["reject_reason"].startswith(reason)
    assert "\n" not in row["reject_reason"] and str(bad[kind]) not in row["reject_reason"]


def test_missing_file_and_directory_are_rejected(tmp_path):
    assert probe_source(str(tmp_path / "nope.mp4"))["reject_reason"] == "file not found"
    assert probe_source(str(tmp_path))["reject_reason"].startswith("not a file")


def test_the_encoder_is_x264_and_undecodable_codecs_are_noted(videos):
    assert h264_encoder() == "libx264"  # the PyPI PyAV wheels ship it
    rows = [probe_source(str(video.path)) for video in videos.values()]
    lines = probe_notes(rows + [{"codec": "no_such_codec"}, {"codec": "no_such_codec"}])
    assert lines == ["cannot decode codec no_such_codec here (2 sources rejected)"]


def test_sources_needing_more_upscaling_than_allowed_are_rejected_for_size(videos):
    rows = {name: probe_source(str(video.path)) for name, video in videos.items()}
    default = ClipsConfig()  # 256x256, max_upscale 2.0
    small = size_reject(rows["cinepak_160x120_30fps"], default)
    assert small["reject_stage"] == "size"
    assert small["reject_reason"] == "source 160x120 needs 2.13x upscaling to 256x256; clips.max_upscale is 2.0"
    assert size_reject(rows["vp9_256x144_2997fps"], default)["reject_stage"] is None  # 1.78x is allowed
    assert size_reject(rows["cinepak_160x120_30fps"], ClipsConfig(max_upscale=None))["reject_stage"] is None
    assert size_reject(rows["cinepak_160x120_30fps"], ClipsConfig(size="64x64"))["reject_stage"] is None
    # The limit applies to the displayed picture: 320x240 coded, turned 90 degrees, is 240 wide.
    tall = ClipsConfig(size="512x256")
    assert upscale_factor(rows["cuts_h264_320x240_25fps"], tall) == pytest.approx(1.6)
    rotated = size_reject(rows["rotated90_h264_320x240_30fps"], tall)
    assert rotated["reject_reason"] == "source 240x320 needs 2.13x upscaling to 512x256; clips.max_upscale is 2.0"
    # A probe reject keeps its own stage and reason.
    assert size_reject({"uri": "x", "reject_stage": "probe", "reject_reason": "empty file"}, default)["reject_stage"] == "probe"

    lines = probe_notes([size_reject(row, default) for row in rows.values()], default)
    assert lines == [
        f"1 source smaller than 256x256 beyond clips.max_upscale 2.0 rejected (stage size): "
        f"{videos['cinepak_160x120_30fps'].path} (160x120, 2.13x)"
    ]
