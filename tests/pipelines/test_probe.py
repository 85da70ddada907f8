"""Probe rows for real encoded files and for every kind of bad file (never an exception)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.footage import bad_files, standard_specs, write_video
from pipelines.probe import PROBE_FIELDS, h264_encoder, preflight, probe_source

NAMES = (
    "cuts_h264_320x240_25fps",
    "fades_mpeg4_320x240_24fps",
    "cinepak_160x120_30fps",
    "vp9_256x144_2997fps",
    "audio_h264_aac_320x240_30fps",
    "rotated90_h264_320x240_30fps",
)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    specs = {spec.name: spec for spec in standard_specs()}
    return {name: write_video(specs[name], out / specs[name].filename) for name in NAMES}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad"))


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


def test_preflight_names_the_encoder_and_undecodable_codecs(videos):
    rows = [probe_source(str(video.path)) for video in videos.values()]
    lines = preflight(rows + [{"codec": "no_such_codec"}, {"codec": "no_such_codec"}])
    assert lines[0] == f"H.264 encoder: {h264_encoder()}"
    assert h264_encoder() == "libx264"  # the PyPI PyAV wheels ship it
    assert lines[1:] == ["cannot decode codec no_such_codec here (2 sources will be rejected)"]
