"""The synthetic footage must be what its truth says: every check decodes the real files with PyAV.

The standard suite is encoded once per module (≈4 s) and each file decoded once (cached).
"""

from __future__ import annotations

import functools
import hashlib
import os
import json
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from infra import demo_footage, footage
from infra.footage import COLORS, FootageSpec, GeneratedVideo, Shot

STANDARD_NAMES = [spec.name for spec in footage.standard_specs()]
# Mean absolute RGB difference between consecutive frames that marks a cut. Inside a shot only
# the shape moves (< ~5 levels, fades included); at a cut the background hue changes (> ~30).
CUT_DIFF = 12.0


@dataclass(frozen=True)
class Decoded:
    frames: np.ndarray  # (T, H', W', 3) uint8, strided down so 1080p stays small
    stride: int
    times_s: np.ndarray  # (T,) presentation times
    width: int
    height: int
    rate: Fraction | None
    rotation: int


@functools.cache
def decode(path: str) -> Decoded:
    with av.open(path) as container:
        stream = container.streams.video[0]
        stride = max(1, stream.width // 160)
        frames, times, rotation = [], [], 0
        for frame in container.decode(stream):
            rotation = frame.rotation
            frames.append(frame.to_ndarray(format="rgb24")[::stride, ::stride])
            times.append(float(frame.time))
        rate = stream.average_rate
        return Decoded(np.stack(frames), stride, np.array(times), stream.width, stream.height, rate, rotation)


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """(T-1,) mean absolute difference between consecutive frames."""
    return np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def standard(standard_footage: dict[str, GeneratedVideo]) -> dict[str, GeneratedVideo]:
    return standard_footage


@pytest.fixture(scope="module")
def bad(bad_footage: dict[str, Path]) -> dict[str, Path]:
    return bad_footage


@pytest.mark.parametrize("name", STANDARD_NAMES)
def test_file_decodes_to_declared_frames_size_and_rate(standard: dict[str, GeneratedVideo], name: str) -> None:
    video = standard[name]
    decoded = decode(str(video.path))
    assert len(decoded.frames) == video.num_frames
    assert (decoded.width, decoded.height) == (video.spec.width, video.spec.height)
    # Every frame is presented when the truth says (WebM stores milliseconds: 1 ms slack).
    np.testing.assert_allclose(decoded.times_s, video.frame_times_s, atol=1.5e-3)
    # The file ends one frame after its last frame starts (up to 4/3 of a mean frame when VFR).
    assert video.frame_times_s[-1] < video.duration_s <= video.frame_times_s[-1] + 1.34 / float(video.spec.fps)
    if not video.spec.vfr:
        assert float(decoded.rate) == pytest.approx(float(video.spec.fps), rel=1e-3)


@pytest.mark.parametrize("name", STANDARD_NAMES)
def test_cuts_in_truth_match_frame_differences(standard: dict[str, GeneratedVideo], name: str) -> None:
    video = standard[name]
    decoded = decode(str(video.path))
    found = np.nonzero(frame_diffs(decoded.frames) > CUT_DIFF)[0] + 1  # first frame of the new shot
    assert len(found) == len(video.cut_frames), f"found cuts at frames {found.tolist()}, truth {video.cut_frames}"
    for frame, truth_frame, truth_time in zip(found, video.cut_frames, video.cut_times_s):
        assert abs(int(frame) - truth_frame) <= 1
        period = float(np.max(np.diff(decoded.times_s)))  # one frame, the longer one for VFR
        assert abs(decoded.times_s[frame] - truth_time) <= period + 1e-6


@pytest.mark.parametrize("name", ["cuts_h264_320x240_25fps", "fades_mpeg4_320x240_24fps", "cinepak_160x120_30fps"])
def test_content_detector_finds_every_hard_cut_and_nothing_inside_fades(
    standard: dict[str, GeneratedVideo], name: str
) -> None:
    """PySceneDetect's ContentDetector at its default threshold finds each hard cut; its only
    other split is at a dip to black (a soft cut), never inside a fade or a moving shot."""
    from scenedetect import ContentDetector, detect

    video = standard[name]
    found = [start.frame_num for start, _ in detect(str(video.path), ContentDetector(), backend="pyav")[1:]]
    for cut in video.cut_frames:
        assert any(abs(f - cut) <= 1 for f in found), f"{name}: missed cut at {cut}; detector found {found}"
    extra = [f for f in found if all(abs(f - cut) > 1 for cut in video.cut_frames)]
    # The black point spans the fade_out's last frame (soft - 1) and the fade_in's first (soft).
    assert all(any(soft - 2 <= f <= soft + 1 for soft in video.soft_cut_frames) for f in extra), (name, found)
    assert len(extra) <= len(video.soft_cut_frames)


def test_moving_shots_move_and_frozen_shots_do_not(standard: dict[str, GeneratedVideo]) -> None:
    for name in ("cuts_h264_320x240_25fps", "fades_mpeg4_320x240_24fps"):
        video = standard[name]
        diffs = frame_diffs(decode(str(video.path)).frames)
        for shot, (first, stop) in zip(video.spec.shots, video.shot_frames):
            inside = diffs[first : stop - 1]  # differences between frames of this shot only
            if shot.kind in ("static", "black"):
                assert inside.max() < 0.5, f"{name}: {shot.kind} shot changes by {inside.max():.2f}"
            else:
                assert inside.min() > 0.2, f"{name}: {shot.kind} shot has a frozen frame pair"
    kinds = {shot.kind for video in standard.values() for shot in video.spec.shots}
    storm_kinds = {shot.kind for spec in footage.storm_specs() for shot in spec.shots}
    assert kinds == set(footage.SHOT_KINDS) - {"visualiser"} and kinds | storm_kinds == set(footage.SHOT_KINDS)


def _shape_centroid(frame: np.ndarray, color: str) -> np.ndarray:
    """(y, x) centre of the pixels within reach of the shape's colour."""
    distance = np.abs(frame.astype(np.int16) - np.array(COLORS[color], np.int16)).sum(axis=-1)
    ys, xs = np.nonzero(distance < 90)
    assert len(ys) > 10, f"no {color} shape found"
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("name", ["cuts_h264_320x240_25fps", "rotated90_h264_320x240_30fps", "vfr_h264_320x240"])
def test_captions_state_the_true_direction_as_displayed(standard: dict[str, GeneratedVideo], name: str) -> None:
    """The shape of each moving shot goes where its caption says, in display orientation
    (stored frames turned by the display rotation read back from the file)."""
    video = standard[name]
    decoded = decode(str(video.path))
    assert decoded.rotation % 360 == video.spec.rotation
    unit = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    for shot, (first, stop) in zip(video.spec.shots, video.shot_frames):
        if shot.kind != "moving":
            continue
        assert f"moving {shot.direction}" in shot.caption and shot.color in shot.caption
        start = np.rot90(decoded.frames[first], decoded.rotation // 90)  # player's view
        end = np.rot90(decoded.frames[stop - 1], decoded.rotation // 90)
        moved = _shape_centroid(end, shot.color) - _shape_centroid(start, shot.color)  # (dy, dx) pixels
        along = moved @ np.array(unit[shot.direction])
        assert along > 0.3 * max(start.shape[:2]) and abs(along) > 3 * abs(moved @ np.array(unit[shot.direction][::-1]))


@pytest.mark.parametrize("rotation", [180, 270])
def test_other_rotations_read_back_and_keep_captions_true(tmp_path: Path, rotation: int) -> None:
    shot = Shot("moving", 1.0, color="yellow", shape="square", direction="right", background="dark blue")
    spec = FootageSpec(f"rot{rotation}", "mp4", "libx264", 160, 96, 12, (shot,), rotation=rotation)
    decoded = decode(str(footage.write_video(spec, tmp_path / spec.filename).path))
    assert decoded.rotation % 360 == rotation and (decoded.width, decoded.height) == (160, 96)
    start, end = (np.rot90(decoded.frames[i], rotation // 90) for i in (0, -1))  # player's view
    dy, dx = _shape_centroid(end, "yellow") - _shape_centroid(start, "yellow")
    assert dx > 0.3 * start.shape[1] and abs(dy) < 2


def test_vfr_file_has_irregular_frame_durations(standard: dict[str, GeneratedVideo]) -> None:
    video = standard["vfr_h264_320x240"]
    durations = np.diff(decode(str(video.path)).times_s)
    distinct = np.unique(np.round(durations, 4))
    assert len(distinct) == 2 and distinct[1] == pytest.approx(2 * distinct[0], rel=1e-3)
    assert np.all(np.abs(np.diff(durations)) > 1e-3)  # strictly alternating, never two alike in a row
    assert video.num_frames / video.duration_s == pytest.approx(float(video.spec.fps), rel=0.02)


def test_audio_file_has_a_tone_as_long_as_the_video(standard: dict[str, GeneratedVideo]) -> None:
    video = standard["audio_h264_aac_320x240_30fps"]
    with av.open(str(video.path)) as container:
        assert len(container.streams.audio) == 1 and len(container.streams.video) == 1
        assert container.streams.audio[0].codec_context.name == "aac"
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert samples.size / footage.AUDIO_RATE == pytest.approx(video.duration_s, abs=0.1)
    assert np.abs(samples).max() > 0.1  # a tone, not silence
    assert all(not standard[n].spec.audio for n in STANDARD_NAMES if n != video.spec.name)


def test_rotation_reads_back_from_display_matrix(standard: dict[str, GeneratedVideo]) -> None:
    video = standard["rotated90_h264_320x240_30fps"]
    with av.open(str(video.path)) as container:
        frame = next(container.decode(video=0))
    assert frame.rotation == 90 and (frame.width, frame.height) == (320, 240)
    assert video.spec.display_size == (240, 320)
    assert decode(str(standard["cuts_h264_320x240_25fps"].path)).rotation == 0


@pytest.mark.parametrize("name", ["cuts_h264_320x240_25fps", "vp9_256x144_2997fps", "h264_320x180_60fps"])
def test_encoding_is_byte_identical(standard: dict[str, GeneratedVideo], tmp_path: Path, name: str) -> None:
    """H.264 in MP4, and Matroska/WebM (which embed a random UID unless muxed bit-exact)."""
    video = standard[name]
    again = footage.write_video(video.spec, tmp_path / video.path.name)
    assert again.sha256 == video.sha256 == hashlib.sha256(video.path.read_bytes()).hexdigest()
    assert again.to_json() | {"path": ""} == video.to_json() | {"path": ""}


def _video_frames_or_error(path: Path) -> int | Exception:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return 0
            return sum(1 for _ in container.decode(video=0))
    except av.error.FFmpegError as exc:
        return exc


def test_each_bad_copy_fails_to_decode_or_has_no_video_frames(bad: dict[str, Path]) -> None:
    assert set(bad) == {"empty", "truncated", "not_video", "audio_only", "zero_frames"}
    assert bad["empty"].stat().st_size == 0
    for name in ("empty", "truncated", "not_video"):
        assert isinstance(_video_frames_or_error(bad[name]), av.error.FFmpegError), name
    assert bad["truncated"].stat().st_size > 1000  # a real partial file, not an empty one
    with av.open(str(bad["audio_only"])) as container:
        assert not container.streams.video and len(container.streams.audio) == 1
    with av.open(str(bad["zero_frames"])) as container:
        assert len(container.streams.video) == 1  # the header declares a video stream ...
    assert _video_frames_or_error(bad["zero_frames"]) == 0  # ... that holds no frames


def test_damaged_files_open_then_end_early(damaged_footage: dict[str, Path], tmp_path: Path) -> None:
    damaged = damaged_footage
    intact = footage.DAMAGED_SOURCE
    with av.open(str(damaged["cut_data"])) as container:
        assert container.streams.video[0].frames == 50  # the index (moov, first) survived the cut
        decoded = 0
        with pytest.raises(av.error.InvalidDataError):
            for _ in container.decode(video=0):
                decoded += 1
    assert 0 < decoded < 50
    silent = decode(str(damaged["cut_silently"]))
    assert 0 < len(silent.frames) < 50  # no error: only the count shows the loss
    # What survives is the intact file's beginning, frame for frame and timestamp for timestamp.
    whole = footage.write_video(replace(intact, container="mkv"), tmp_path / "intact" / "whole.mkv")
    np.testing.assert_array_equal(silent.frames, decode(str(whole.path)).frames[: len(silent.frames)])
    np.testing.assert_allclose(silent.times_s, whole.frame_times_s[: len(silent.frames)], atol=1e-3)


def _srt_cues(path: Path) -> list[tuple[float, float, str]]:
    cues = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        _, timing, text = block.split("\n")
        start, end = (
            int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
            for h, m, s, ms in re.findall(r"(\d+):(\d+):(\d+),(\d+)", timing)
        )
        cues.append((start, end, text))
    return cues


def test_sidecars_hold_the_shot_captions(standard: dict[str, GeneratedVideo]) -> None:
    video = standard["cuts_h264_320x240_25fps"]
    cues = _srt_cues(video.sidecar)
    assert [text for _, _, text in cues] == [shot.caption for shot in video.spec.shots]
    for (start, end, _), (span_start, span_end) in zip(cues, video.shot_spans_s):
        assert start == pytest.approx(span_start, abs=1e-3) and end == pytest.approx(span_end, abs=1e-3)
    single = standard["audio_h264_aac_320x240_30fps"]
    assert single.sidecar.suffix == ".txt"
    assert single.sidecar.read_text(encoding="utf-8").strip() == single.spec.shots[0].caption
    assert sum(v.sidecar is not None for v in standard.values()) == 2


def test_main_writes_demo_suite_and_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_footage.main([str(tmp_path / "demo"), "--suite", "demo"]) == 0
    truth = json.loads((tmp_path / "demo" / "truth.json").read_text())
    assert len(truth["videos"]) == len(footage.demo_specs()) >= 3
    for entry in truth["videos"]:
        path = tmp_path / "demo" / entry["file"]
        decoded = decode(str(path))
        assert len(decoded.frames) == entry["num_frames"] and decoded.width == entry["width"]
        assert 10 <= entry["duration_s"] <= 20 and 128 <= entry["width"] <= 320 and len(entry["shots"]) >= 4
        cues = _srt_cues(tmp_path / "demo" / entry["sidecar"])
        assert [c[2] for c in cues] == [s["caption"] for s in entry["shots"]]
        found = np.nonzero(frame_diffs(decoded.frames) > CUT_DIFF)[0] + 1
        assert found.tolist() == entry["cut_frames"]
    assert "| demo_a" in capsys.readouterr().out


def test_main_writes_bad_files_into_truth(tmp_path: Path) -> None:
    assert demo_footage.main([str(tmp_path), "--suite", "bad"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["videos"] == []
    assert set(truth["bad"]) == {"empty", "truncated", "not_video", "audio_only", "zero_frames"}
    assert set(truth["damaged"]) == {"cut_data", "cut_silently"}
    assert all((tmp_path / name).exists() for name in [*truth["bad"].values(), *truth["damaged"].values()])


def test_catalogue_covers_containers_codecs_sizes_and_rates() -> None:
    specs = footage.standard_specs()
    assert {"mp4", "avi", "mov", "webm", "mkv"} <= {s.container for s in specs}
    assert {"libx264", "mpeg4", "msmpeg4v2", "cinepak", "libvpx-vp9"} <= {s.codec for s in specs}
    assert {Fraction(r) for r in (15, 24, 25, 30, 60)} | {Fraction(30000, 1001)} <= {s.fps for s in specs}
    assert (160, 120) in {(s.width, s.height) for s in specs} and (1920, 1080) in {(s.width, s.height) for s in specs}
    assert any(s.width % 2 and s.height % 2 for s in specs)
    # Theora appears exactly where this PyAV build can encode it (the wheels here cannot).
    assert any(s.container == "ogv" for s in specs) == footage.encoder_available("libtheora")
    for spec in specs + footage.demo_specs():
        # Each cut goes between a dark and a light background (the ContentDetector signal).
        dark = [sum(footage.BACKGROUNDS[shot.background]) < 300 for shot in spec.shots]
        assert all(a != b for a, b in zip(dark, dark[1:])), spec.name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Shot("moving", 1.0, color="purple"), "'purple'"),
        (lambda: Shot("zoom", 1.0), "'zoom'"),
        (lambda: Shot("moving", 0.0), "0.0"),
        (lambda: FootageSpec("x", "mp4", "libx264", 320, 240, 25, (Shot("moving", 1.0),), rotation=45), "45"),
        (lambda: FootageSpec("x", "mp4", "no_such_encoder", 320, 240, 25, (Shot("moving", 1.0),)), "no_such_encoder"),
        (lambda: FootageSpec("x", "mp4", "libx264", 320, 240, 25, (Shot("moving", 1.0),) * 2, sidecar="txt"), "txt"),
        (lambda: FootageSpec("x", "avi", "mpeg4", 320, 240, 25, (Shot("moving", 1.0),), faststart=True), ".avi"),
        (lambda: FootageSpec("x", "mp4", "libx264", 320, 240, 25, (Shot("moving", 1.0),), grain=-1.0), "-1.0"),
        (lambda: FootageSpec("x", "avi", "mpeg4", 320, 240, 25, (Shot("moving", 1.0),), crf=20), "'mpeg4'"),
    ],
)
def test_bad_specs_fail_with_the_value_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_unencodable_specs_fail_early_without_leaving_a_file(tmp_path: Path) -> None:
    odd = FootageSpec("odd", "mp4", "libx264", 321, 241, 25, (Shot("moving", 0.5),))
    with pytest.raises(ValueError, match="321x241 yuv420p with libx264"):
        footage.write_video(odd, tmp_path / odd.filename)
    assert not (tmp_path / odd.filename).exists()
    too_short = FootageSpec("short", "mp4", "libx264", 320, 240, 10, (Shot("moving", 1.05), Shot("static", 0.03)))
    with pytest.raises(ValueError, match=r"shot 1 \(static, 0.03s\) gets 0 frame"):
        footage.write_video(too_short, tmp_path / too_short.filename)


def test_rewriting_unchanged_footage_keeps_the_file_and_its_mtime(tmp_path: Path) -> None:
    """A rerun of demo-footage must not touch identical files, or incremental ingest would redo them."""
    spec = footage.demo_specs()[0]
    first = footage.write_video(spec, tmp_path / spec.filename)
    os.utime(first.path, ns=(1_000_000_000, 1_000_000_000))  # an old mtime that a rewrite would change
    again = footage.write_video(spec, tmp_path / spec.filename)
    assert again.sha256 == first.sha256
    assert first.path.stat().st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_grain_is_deterministic_noise_that_costs_bits_and_keeps_cuts(tmp_path: Path) -> None:
    """Grainy footage (the benchmark's camera-like input) differs frame to frame even where the
    picture stands still, is the same on every run, and its cuts stay where the truth says."""
    shots = footage.varied_shots([("moving", 1.0), ("static", 1.0)])
    flat = FootageSpec("flat", "mp4", "libx264", 320, 240, 25, shots, crf=20)
    grainy = replace(flat, name="grainy", grain=3.0)
    a, b = list(footage.render_frames(grainy)), list(footage.render_frames(grainy))
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    still = [img.astype(np.int16) for _, img in a[30:34]]  # the static shot: only grain changes
    assert 1.0 < np.abs(still[1] - still[0]).mean() < 8.0
    clean = dict(footage.render_frames(flat))
    assert abs(np.mean([img.mean() - clean[pts].mean() for pts, img in a])) < 2.0  # noise, not a shift
    flat_video = footage.write_video(flat, tmp_path / flat.filename)
    grainy_video = footage.write_video(grainy, tmp_path / grainy.filename)
    assert grainy_video.path.stat().st_size > 3 * flat_video.path.stat().st_size
    assert grainy_video.cut_frames == flat_video.cut_frames == (25,)
    diffs = frame_diffs(decode(str(grainy_video.path)).frames)
    assert int(np.argmax(diffs)) + 1 == 25 and diffs.max() > CUT_DIFF


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GeneratedVideo]:
    return {video.spec.name: video for video in footage.storm_suite(tmp_path_factory.mktemp("storm"))}


def test_visualiser_footage_is_a_cut_storm_without_a_cut(storm: dict[str, GeneratedVideo]) -> None:
    """What real music-visualiser sources did to PySceneDetect: its ContentDetector fires on nearly
    every frame of continuous content, while AdaptiveDetector's rolling average sees no cut."""
    from scenedetect import AdaptiveDetector, ContentDetector, detect

    video = storm["visualiser_cuts_h264_320x180_25fps"]
    assert [shot.kind for shot in video.spec.shots] == ["moving", "visualiser", "moving"]
    assert video.cut_frames == (60, 185) and video.cut_times_s == pytest.approx((2.4, 7.4))
    first, stop = video.shot_frames[1]
    diffs = frame_diffs(decode(str(video.path)).frames)
    assert diffs[first : stop - 1].min() > CUT_DIFF  # every frame of it changes like a cut would
    content = {start.frame_num for start, _ in detect(str(video.path), ContentDetector(min_scene_len=1), backend="pyav")}
    inside = content & set(range(first + 1, stop))
    assert len(inside) >= 0.9 * (stop - first - 1), f"ContentDetector fired on {len(inside)} of {stop - first - 1} frames"
    adaptive = {start.frame_num for start, _ in detect(str(video.path), AdaptiveDetector(min_scene_len=1), backend="pyav")}
    assert not adaptive & set(range(first + 1, stop))
    whole = storm["visualiser_only_h264_320x180_25fps"]
    assert whole.cut_frames == () and whole.captions == ("a swirl of colours changing on every frame",)
    assert whole.to_json()["shots"][0]["color"] is None and (whole.spec.width, whole.spec.height) == (320, 180)


@pytest.mark.parametrize("name", [spec.name for spec in footage.storm_specs()])
def test_visualiser_encoding_is_byte_identical(storm: dict[str, GeneratedVideo], tmp_path: Path, name: str) -> None:
    video = storm[name]
    again = footage.write_video(video.spec, tmp_path / video.path.name)
    assert again.sha256 == video.sha256 == hashlib.sha256(video.path.read_bytes()).hexdigest()
