"""Captions per backend: none, sidecar (.txt/.json/.srt slicing, local and pyarrow URIs), metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from infra.config import ConfigError, load_config
from pipelines.captions import CaptionRequest, dominant_colours, make_captioner, parse_srt
from pipelines.config import CaptionConfig
from pipelines.filters import ClipPixels, score_clip

SRT = """1
00:00:00,000 --> 00:00:02,000
A red circle <i>moves</i> right.

2
00:00:02,000 --> 00:00:04,500
A green square
stands still.

3
00:00:04,500 --> 00:00:07,000
A blue triangle moves up.
"""


def _request(uri: str, start_s: float = 0.0, end_s: float = 2.0, rgb=None, width: int = 320, height: int = 240):
    frames = np.repeat((rgb if rgb is not None else np.full((32, 32, 3), 100, np.uint8))[None], 4, axis=0)
    pixels = ClipPixels(frames)
    return CaptionRequest(uri, start_s, end_s, width, height, pixels, score_clip(pixels))


def test_none_gives_an_empty_caption(tmp_path):
    captioner = make_captioner(CaptionConfig(backend="none"))
    assert captioner(_request(str(tmp_path / "a.mp4"))) == "" and captioner.model_name == "none"


def test_srt_sidecar_gives_the_subtitles_overlapping_the_clip(tmp_path):
    (tmp_path / "film.srt").write_text(SRT)
    captioner = make_captioner(CaptionConfig(backend="sidecar"))
    uri = str(tmp_path / "film.mp4")
    assert captioner(_request(uri, 0.2, 1.8)) == "A red circle moves right."
    assert captioner(_request(uri, 1.5, 3.0)) == "A red circle moves right. A green square stands still."
    assert captioner(_request(uri, 5.0, 6.0)) == "A blue triangle moves up."
    assert captioner(_request(uri, 8.0, 9.0)) == ""
    assert captioner.model_name == "sidecar"


def test_txt_and_json_sidecars_give_their_text(tmp_path):
    (tmp_path / "a.txt").write_text("  a slow pan over\n  the harbour  \n")
    (tmp_path / "b.json").write_text(json.dumps({"caption": "a dog runs on a beach", "other": 1}))
    (tmp_path / "c.json").write_text(json.dumps({"title": "no caption key"}))
    captioner = make_captioner(CaptionConfig(backend="sidecar"))
    assert captioner(_request(str(tmp_path / "a.mov"))) == "a slow pan over the harbour"
    assert captioner(_request(str(tmp_path / "b.mp4"))) == "a dog runs on a beach"
    assert captioner(_request(str(tmp_path / "c.mp4"))) == ""
    assert captioner(_request(str(tmp_path / "missing.mp4"))) == ""


def test_sidecar_lookup_works_through_pyarrow_filesystems(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "film.srt").write_text(SRT)
    by_uri = make_captioner(CaptionConfig(backend="sidecar"))
    assert by_uri(_request((tmp_path / "clips" / "film.mp4").as_uri(), 2.5, 3.0)) == "A green square stands still."
    subtree = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    by_fs = make_captioner(CaptionConfig(backend="sidecar"), filesystem=subtree)
    assert by_fs(_request("clips/film.mp4", 2.5, 3.0)) == "A green square stands still."


def test_metadata_caption_describes_what_was_measured(tmp_path):
    captioner = make_captioner(CaptionConfig(backend="metadata"))
    red = np.zeros((32, 32, 3), np.uint8)
    red[:, :] = (205, 35, 30)
    red[:, 24:] = (40, 70, 200)  # a quarter blue
    caption = captioner(_request("x.mp4", 1.0, 4.5, rgb=red, width=240, height=320))
    assert caption.startswith("A 3.5-second portrait video clip, evenly lit, with almost no motion")
    assert caption.endswith("dominant colours: red and blue.")
    bright = captioner(_request("x.mp4", rgb=np.full((32, 32, 3), 235, np.uint8), width=640, height=360))
    assert "landscape" in bright and "bright" in bright and "white" in bright
    dark = captioner(_request("x.mp4", rgb=np.full((32, 32, 3), 20, np.uint8), width=100, height=100))
    assert "square" in dark and ", dark," in dark and "black" in dark
    assert captioner.model_name.startswith("metadata")


def test_dominant_colours_ignores_small_patches():
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[:, :] = (40, 160, 50)
    frame[:4, :4] = (200, 30, 30)  # 1.6 % red
    assert dominant_colours(frame) == ["green"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["caption.backend=vlm"], "caption.backend: Input should be 'none', 'sidecar', 'metadata', 'hf' or 'openai'"),
        (["caption.backend=hf"], "caption.model is required for caption.backend=hf"),
        (["caption.backend=openai", "caption.model=m"], "caption.endpoint is required for caption.backend=openai"),
        (["caption.backend=openai", "caption.model=m", "caption.endpoint=gpu:8000"], "caption.endpoint must be an http(s) URL"),
        (["caption.prompt=describe {clip}"], "caption.prompt may use only {frames} and {seconds}"),
        (["caption.frames=0"], "caption.frames"),
    ],
)
def test_caption_config_fails_in_one_line_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as failure:
        load_config(None, overrides)
    message = str(failure.value)
    assert "\n" not in message and expected in message, message


def test_parse_srt_skips_malformed_blocks():
    cues = parse_srt("garbage\n\n" + SRT + "\n\n4\nno timing here\n")
    assert [c.start_s for c in cues] == [0.0, 2.0, 4.5] and cues[1].text == "A green square stands still."


def test_missing_sidecars_are_warned_about_once(tmp_path, caplog):
    """`--config ingest/demo` (sidecar captions) on real footage without sidecars gave 88 of 88
    clips an empty caption and printed nothing; now the first source without one is named."""
    (tmp_path / "has.txt").write_text("a caption")
    captioner = make_captioner(CaptionConfig(backend="sidecar"))
    with caplog.at_level("DEBUG", logger="pipelines.captions"):
        assert captioner(_request(str(tmp_path / "has.mp4"))) == "a caption"
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert captioner(_request(str(tmp_path / "vtest.avi"))) == ""
        assert captioner(_request(str(tmp_path / "tree.avi"))) == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "vtest.srt/vtest.txt/vtest.json" in warnings[0] and str(tmp_path / "vtest.avi") in warnings[0]
    assert any("tree.avi" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
