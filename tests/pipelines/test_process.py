"""SourceProcessor end to end on real encoded footage: one decode in, clip rows out."""

from __future__ import annotations

import io
import pickle
import tracemalloc
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from infra.config import load_config
from pipelines.config import CaptionConfig, ClipsConfig, FiltersConfig, ScenesConfig
from pipelines.decode import FrameConverter, FrameGeometry, iter_frames
from pipelines.filters import PHASH_BITS
from infra.footage import FootageSpec, render_frames, varied_shots, write_video
from pipelines.probe import probe_source
from pipelines.process import CLIP_COLUMNS, IngestSettings, SourceProcessor
from pipelines.scenes import cut_times

NAMES = (
    "cuts_h264_320x240_25fps",  # hard cuts, a frozen shot, .srt sidecar
    "fades_mpeg4_320x240_24fps",  # fades and a black shot (AVI, MPEG-4 part 2)
    "vfr_h264_320x240",
    "h264_320x180_60fps",  # MKV, resampled 60 -> 12 fps
    "rotated90_h264_320x240_30fps",
)
SETTINGS = IngestSettings(
    clips=ClipsConfig(min_seconds=0.5, max_seconds=1.0, fps=12, size="64x48", trim_seconds=0.05),
    caption=CaptionConfig(backend="sidecar"),
)


@pytest.fixture(scope="module")
def videos(standard_footage):
    return {name: standard_footage[name] for name in NAMES}


@pytest.fixture(scope="module")
def processor():
    return SourceProcessor(SETTINGS)


@pytest.fixture(scope="module")
def results(videos, processor):
    return {name: processor(probe_source(str(video.path))) for name, video in videos.items()}


def _decode(mp4: bytes) -> tuple[list[np.ndarray], Fraction]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


@pytest.mark.parametrize("name", NAMES)
def test_rows_have_one_schema_and_consistent_status(results, name):
    rows = results[name]
    assert rows and any(r["status"] == "kept" for r in rows)
    for row in rows:
        assert tuple(row) == CLIP_COLUMNS
        assert row["pipeline_version"] == SETTINGS.pipeline_version
        assert (row["scene_detector"], row["scene_threshold"]) == ("content", 27.0)
        if row["status"] == "kept":
            assert isinstance(row["mp4"], bytes) and row["reject_stage"] is None and row["reject_reason"] is None
            assert len(row["phash"]) == PHASH_BITS // 4 and all(row[f"score_{n}"] is not None for n in ("motion", "brightness"))
        else:
            assert row["status"] == "rejected" and row["mp4"] is None and row["reject_reason"]
            assert row["reject_stage"] == "clips" or row["reject_stage"].startswith("filter:")
        if row["num_frames"]:
            assert Image.open(io.BytesIO(row["thumbnail"])).format == "JPEG"


@pytest.mark.parametrize("name", NAMES)
def test_no_clip_spans_a_cut(videos, results, name):
    tolerance = 1 / SETTINGS.clips.fps + 1 / float(videos[name].spec.fps)
    for row in results[name]:
        for cut in videos[name].cut_times_s:
            assert not (row["start_s"] + tolerance < cut < row["end_s"] - tolerance), (row["id"], cut)
        assert row["end_s"] - row["start_s"] <= SETTINGS.clips.max_seconds + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_mp4_members_decode_to_num_frames_at_clip_size_and_rate(results, name):
    for row in results[name]:
        if row["status"] != "kept":
            continue
        frames, rate = _decode(row["mp4"])
        assert len(frames) == row["num_frames"] == round((row["end_s"] - row["start_s"]) * SETTINGS.clips.fps)
        assert frames[0].shape == (48, 64, 3) and (row["width"], row["height"]) == (64, 48)
        assert rate == 12


def test_second_run_gives_the_same_ids_and_bytes(videos, results, processor):
    name = "cuts_h264_320x240_25fps"
    again = processor(probe_source(str(videos[name].path)))
    assert [r["id"] for r in again] == [r["id"] for r in results[name]]
    assert [r["mp4"] for r in again] == [r["mp4"] for r in results[name]]
    sha = videos[name].sha256
    for row in again:
        assert row["id"] == f"{sha[:16]}-{round(row['start_s'] * 1000):08d}-{round(row['end_s'] * 1000):08d}"


def test_frozen_shot_is_rejected_by_a_filter_and_captions_come_from_the_srt(videos, results):
    video = videos["cuts_h264_320x240_25fps"]
    static_shot = next(i for i, shot in enumerate(video.spec.shots) if shot.kind == "static")
    start, end = video.shot_spans_s[static_shot]
    inside = [r for r in results[video.spec.name] if start <= r["start_s"] and r["end_s"] <= end]
    assert inside and all(r["status"] == "rejected" for r in inside)
    assert {r["reject_stage"] for r in inside} <= {"filter:motion", "filter:static"}
    assert all(r["reject_score"] is not None and r["reject_threshold"] is not None for r in inside)
    for row in results[video.spec.name]:
        if row["status"] == "kept":
            shot = next(i for i, (a, b) in enumerate(video.shot_spans_s) if a <= row["start_s"] < b)
            assert row["caption"] == video.captions[shot] and row["caption_model"] == "sidecar"


def test_short_scenes_are_rejected_with_the_setting_named(videos):
    settings = SETTINGS.model_copy(update={"clips": ClipsConfig(min_seconds=1.8, max_seconds=4.0, fps=12, size="64x48")})
    rows = SourceProcessor(settings)(probe_source(str(videos["cuts_h264_320x240_25fps"].path)))
    short = [r for r in rows if r["reject_stage"] == "clips"]
    assert short and all("shorter than clips.min_seconds 1.8" in r["reject_reason"] for r in short)


def test_score_mode_keeps_every_clip_with_scores(videos):
    settings = SETTINGS.model_copy(update={"filters": FiltersConfig(mode="score"), "caption": CaptionConfig(backend="metadata")})
    rows = SourceProcessor(settings)(probe_source(str(videos["fades_mpeg4_320x240_24fps"].path)))
    assert not [r for r in rows if r["reject_stage"] and r["reject_stage"].startswith("filter:")]
    kept = [r for r in rows if r["status"] == "kept"]
    assert kept and all(r["caption"].startswith("A ") and r["caption_model"] == "metadata-v1" for r in kept)
    # The black shot is kept in score mode, with its darkness on record.
    assert min(r["score_brightness"] for r in kept) < 16


def test_rotation_is_applied_before_the_crop(videos):
    video = videos["rotated90_h264_320x240_30fps"]
    row = probe_source(str(video.path))
    assert row["rotation"] == 90
    with av.open(str(video.path)) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")  # (240, 320, 3) as stored
    stored = next(render_frames(video.spec))[1]

    def clip_of(rotation: int, width: int, height: int) -> np.ndarray:
        geometry = FrameGeometry(320, 240, rotation, width, height, detect_width=256)
        frame = av.VideoFrame.from_ndarray(decoded, format="rgb24")
        return FrameConverter(geometry).clip_frame(frame).astype(np.float32)

    display = np.rot90(stored, k=1)  # (320, 240, 3): what a player shows
    expected = cv2.resize(display, (48, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    portrait = clip_of(90, 48, 64)  # full display frame, portrait, no crop needed
    assert portrait.shape == (64, 48, 3)
    assert np.abs(portrait - expected).mean() < 8
    # Ignoring the rotation gives a different picture, so the check above can fail.
    sideways = cv2.resize(np.ascontiguousarray(stored[:, 40:280]), (48, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(portrait - sideways.astype(np.float32)).mean() > 2 * np.abs(portrait - expected).mean()


def test_probe_rejects_pass_through_and_bad_files_never_raise(bad_footage, processor):
    for kind, path in bad_footage.items():
        rows = processor(probe_source(str(path)))
        assert len(rows) == 1, kind
        assert tuple(rows[0]) == CLIP_COLUMNS
        assert rows[0]["status"] == "rejected" and rows[0]["reject_stage"] == "probe" and rows[0]["reject_reason"]


def test_corrupt_data_mid_file_keeps_earlier_clips_and_rejects_the_rest(tmp_path, videos, processor):
    data = bytearray(videos["cuts_h264_320x240_25fps"].path.read_bytes())
    n = len(data)
    data[n // 2 : n // 2 + n // 4] = np.random.default_rng(1).bytes(n // 4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    rows = processor(probe_source(str(corrupt)))
    assert rows[-1]["reject_stage"] == "decode"
    assert rows[-1]["reject_reason"].startswith(("decode error at", "decoding stopped at"))
    kept = [r for r in rows if r["status"] == "kept"]
    assert kept and all(r["end_s"] <= rows[-1]["start_s"] + 1e-6 for r in kept)

    # A truncated MKV still probes (duration in the header); the lost tail becomes a reject row.
    whole = videos["h264_320x180_60fps"].path.read_bytes()
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(whole[: len(whole) // 2])
    rows = processor(probe_source(str(truncated)))
    assert rows[-1]["reject_stage"] == "decode" and "of 3.0 s" in rows[-1]["reject_reason"]


def test_memory_is_bounded_by_a_clip_not_the_source(tmp_path):
    """Peak Python/numpy memory while processing 48 s of footage ≈ the same as for 8 s."""
    settings = IngestSettings(
        clips=ClipsConfig(min_seconds=0.5, max_seconds=2.0, fps=12, size="64x48"),
        filters=FiltersConfig(mode="score"),
        caption=CaptionConfig(backend="none"),
    )
    processor = SourceProcessor(settings)
    rows = {}
    for seconds in (8, 48):
        spec = FootageSpec(f"long{seconds}", "mp4", "libx264", 96, 64, Fraction(15), varied_shots([("moving", 4.0)] * (seconds // 4)))
        rows[seconds] = probe_source(str(write_video(spec, tmp_path / spec.filename).path))
    processor(rows[8])  # warm-up: first-call allocations (codec tables, caches) are not per-source
    peaks = {}
    for seconds, row in rows.items():
        tracemalloc.start()
        clips = processor(row)
        peaks[seconds] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sum(r["status"] == "kept" for r in clips) >= seconds // 2 - 1
    # Holding all 48 s of 64x48 frames would take 48 * 12 * 9216 B = 5.3 MB on top; the returned
    # rows do grow with the source (each kept clip's mp4 bytes, a few kB), by design.
    assert peaks[48] < peaks[8] * 1.5 + 300_000, peaks


def test_settings_pickle_and_come_from_the_full_config():
    cfg = load_config(None, ["clips.fps=8", "scenes.detector=adaptive", "caption.backend=none"])
    settings = IngestSettings.from_config(cfg)
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert settings.clips.fps == 8 and settings.scenes == ScenesConfig(detector="adaptive")
    assert SourceProcessor(cfg).settings == settings
    # What an output records: the keys a backend reads, so model-captioner knobs leave other outputs alone.
    assert settings.record()["caption"] == {"backend": "none", "endpoint": None, "model": None,
                                            "sidecar_extensions": [".srt", ".txt", ".json"], "sidecar_json_key": "caption"}  # fmt: skip
    knob = ["clips.fps=8", "scenes.detector=adaptive", "caption.backend=none", "caption.frames=9"]
    assert IngestSettings.from_config(load_config(None, knob)).record() == settings.record()
    model = IngestSettings.from_config(load_config(None, ["caption.backend=openai", "caption.model=m", "caption.endpoint=http://h/v1"]))
    assert model.record()["caption"]["frames"] == 4 and "endpoint" not in model.record()["caption"]


@pytest.mark.parametrize("detector", ["adaptive", "threshold"])
def test_late_reporting_detectors_never_put_a_cut_inside_a_clip(videos, detector):
    """AdaptiveDetector reports cuts frames late and ThresholdDetector only when a fade ends;
    the processor must hold frames until then, so clips still stop at every cut it finds."""
    video = videos["fades_mpeg4_320x240_24fps"]
    scenes = ScenesConfig(detector=detector)
    settings = SETTINGS.model_copy(update={"scenes": scenes, "filters": FiltersConfig(mode="score")})
    row = probe_source(str(video.path))
    rows = SourceProcessor(settings)(row)
    converter = FrameConverter(FrameGeometry(row["width"], row["height"], 0, 64, 48, scenes.detect_width))
    with av.open(str(video.path)) as container:
        cuts = cut_times(scenes, row["fps"], [(t, converter.detect_frame(f)) for t, f in iter_frames(container, row["fps"])])
    assert cuts and {r["scene_detector"] for r in rows} == {detector}
    assert max(r["scene_index"] for r in rows) == len(cuts)
    tolerance = 1 / SETTINGS.clips.fps + 1 / row["fps"]
    for clip in rows:
        assert not any(clip["start_s"] + tolerance < cut < clip["end_s"] - tolerance for cut in cuts), (clip["id"], cuts)


def test_iter_rows_streams_clips_before_the_source_ends(videos, results, processor):
    rows = processor.iter_rows(probe_source(str(videos["cuts_h264_320x240_25fps"].path)))
    first = next(rows)  # the first clip is out while the decoder is still open on the source
    total = probe_source(str(videos["cuts_h264_320x240_25fps"].path))["num_frames"]
    assert 0 < processor.frames_decoded < total / 2, (processor.frames_decoded, total)
    assert first["id"] == results["cuts_h264_320x240_25fps"][0]["id"]
    assert [first["id"], *(r["id"] for r in rows)] == [r["id"] for r in results["cuts_h264_320x240_25fps"]]


@pytest.fixture(scope="module")
def storm_footage(tmp_path_factory):
    from infra.footage import storm_suite

    return {video.spec.name: video for video in storm_suite(tmp_path_factory.mktemp("storm"))}


def test_visualiser_sources_become_clips_not_hundreds_of_one_frame_scenes(storm_footage, caplog):
    """Real 320x180 visualiser sources gave 317 and 59 one-frame "scenes", every one rejected as too
    short, and no clip. With the default settings the storm is one stretch of continuous content."""
    processor = SourceProcessor(IngestSettings())
    whole = storm_footage["visualiser_only_h264_320x180_25fps"]
    with caplog.at_level("INFO", logger="pipelines.process"):
        rows = processor(probe_source(str(whole.path)))
    assert not [r for r in rows if r["reject_stage"] == "clips"], [r["reject_reason"] for r in rows][:5]
    kept = [r for r in rows if r["status"] == "kept"]
    assert sum(r["end_s"] - r["start_s"] for r in kept) >= 0.9 * whole.duration_s
    assert any("fast-changing content, kept as continuous" in r.getMessage() and str(whole.path) in r.getMessage()
               for r in caplog.records)  # fmt: skip

    # Between ordinary shots: the hard cuts into and out of the visualiser still split it off.
    video = storm_footage["visualiser_cuts_h264_320x180_25fps"]
    rows = processor(probe_source(str(video.path)))
    kept = [r for r in rows if r["status"] == "kept"]
    assert [r["scene_index"] for r in kept] == [0, 1, 2] and len(rows) == 3
    tolerance = 1 / processor.settings.clips.fps + 1 / float(video.spec.fps)
    for row in kept:
        assert not any(row["start_s"] + tolerance < cut < row["end_s"] - tolerance for cut in video.cut_times_s), row["id"]


def test_a_piece_too_short_for_a_clip_frame_still_gets_a_thumbnail_of_itself(tmp_path):
    """A one-frame shot (a flash) has no frame on the clip grid after trimming; its reject row used
    to carry no thumbnail, so report.html could not show it."""
    shots = varied_shots([("moving", 2.0), ("moving", 0.04), ("moving", 2.0)], offset=1)
    spec = FootageSpec("flash", "mp4", "libx264", 160, 120, Fraction(25), shots)
    video = write_video(spec, tmp_path / spec.filename)
    rows = SourceProcessor(SETTINGS)(probe_source(str(video.path)))
    (flash,) = [r for r in rows if r["start_s"] <= video.cut_times_s[0] + 1e-6 and r["end_s"] >= video.cut_times_s[1] - 1e-6]
    assert flash["num_frames"] == 0 and flash["reject_stage"] == "clips" and flash["reject_reason"].startswith("scene 0.04 s")
    picture = np.asarray(Image.open(io.BytesIO(flash["thumbnail"])).convert("RGB"), np.float32)
    # It shows the flash, not a neighbour: the mean colour is that of the one-frame shot.
    drawn = {pts: rgb for pts, rgb in render_frames(spec)}
    frame = video.shot_frames[1][0]
    means = {k: np.asarray(drawn[k], np.float32).mean(axis=(0, 1)) for k in (frame - 1, frame, frame + 1)}
    distance = {k: np.abs(picture.mean(axis=(0, 1)) - m).sum() for k, m in means.items()}
    assert min(distance, key=distance.get) == frame, distance
