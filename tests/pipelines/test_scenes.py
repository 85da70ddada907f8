"""Cut detection on our own decoded frames agrees with PySceneDetect and with the footage truth."""

from __future__ import annotations

import av
import pytest
import scenedetect
from scenedetect import AdaptiveDetector, ContentDetector, ThresholdDetector

from pipelines.config import ScenesConfig
from pipelines.decode import FrameConverter, FrameGeometry, iter_frames
from infra.footage import write_video
from pipelines.probe import probe_source
from pipelines.scenes import CutTracker, cut_times, detector_threshold, scene_spans

# Files whose hard cuts the ContentDetector at its default threshold finds (several codecs and
# containers). Not here: the 60 fps and VFR files, where PySceneDetect itself misses a cut.
HARD_CUT_FILES = (
    "cuts_h264_320x240_25fps",
    "fades_mpeg4_320x240_24fps",
    "cinepak_160x120_30fps",
    "vp9_256x144_2997fps",
    "h264_1920x1080_30fps",
    "odd_mpeg4_321x241_25fps",
    "rotated90_h264_320x240_30fps",
)


@pytest.fixture(scope="module")
def videos(standard_footage):
    return {name: standard_footage[name] for name in HARD_CUT_FILES}


def _detect_frames(path) -> tuple[float, list]:
    row = probe_source(str(path))
    # The configured width, so these comparisons cover whatever default the ingest runs with.
    geometry = FrameGeometry(row["width"], row["height"], 0, 64, 64, detect_width=ScenesConfig().detect_width)
    converter = FrameConverter(geometry)
    with av.open(str(path)) as container:
        frames = [(t, converter.detect_frame(f)) for t, f in iter_frames(container, row["fps"])]
    return row["fps"], frames


def _reference_cuts(path, detector) -> list[float]:
    return [start.seconds for start, _ in scenedetect.detect(str(path), detector)[1:]]


@pytest.mark.parametrize("name", HARD_CUT_FILES)
def test_content_cuts_match_pyscenedetect_and_truth(videos, name):
    video = videos[name]
    fps, frames = _detect_frames(video.path)
    # PySceneDetect's ContentDetector() default min_scene_len is 15 frames.
    cfg = ScenesConfig(detector="content", min_scene_seconds=15 / fps)
    ours = cut_times(cfg, fps, frames)
    reference = _reference_cuts(video.path, ContentDetector())
    frame = 1 / fps + 1e-3
    assert len(ours) == len(reference), (ours, reference)
    assert ours == pytest.approx(reference, abs=frame)
    for truth in video.cut_times_s:
        assert min(abs(truth - cut) for cut in ours) <= frame, (truth, ours)


@pytest.mark.parametrize(
    "name, detector, reference",
    [
        ("cuts_h264_320x240_25fps", "adaptive", AdaptiveDetector(min_scene_len=13)),
        ("fades_mpeg4_320x240_24fps", "threshold", ThresholdDetector(min_scene_len=12)),
    ],
)
def test_other_detectors_match_pyscenedetect(videos, name, detector, reference):
    fps, frames = _detect_frames(videos[name].path)
    cfg = ScenesConfig(detector=detector, min_scene_seconds=0.5)
    ours = cut_times(cfg, fps, frames)
    expected = _reference_cuts(videos[name].path, reference)
    assert expected, "the reference must find something for this comparison to mean anything"
    assert ours == pytest.approx(expected, abs=1 / fps + 1e-3)


@pytest.mark.parametrize("detector", ["content", "adaptive", "threshold"])
def test_no_cut_is_reported_before_the_settled_time(videos, detector):
    """The clip builder commits frames older than settled_before(); a later cut must never land there."""
    fps, frames = _detect_frames(videos["fades_mpeg4_320x240_24fps"].path)
    tracker = CutTracker(ScenesConfig(detector=detector, min_scene_seconds=0.5), fps)
    settled = 0.0
    found = []
    for time_s, bgr in frames:
        for cut in tracker.push(time_s, bgr):
            assert cut >= settled, (cut, settled)
            found.append(cut)
        settled = max(settled, tracker.settled_before(time_s))
    for cut in tracker.finish():
        assert cut >= settled
        found.append(cut)
    assert found


def test_thresholds_default_to_the_detectors_own():
    assert detector_threshold(ScenesConfig(detector="content")) == 27.0
    assert detector_threshold(ScenesConfig(detector="adaptive")) == 3.0
    assert detector_threshold(ScenesConfig(detector="threshold")) == 12.0
    assert detector_threshold(ScenesConfig(detector="content", threshold=40)) == 40.0


def test_scene_spans_cover_the_source():
    assert scene_spans([2.0, 5.0, 9.9, 12.0], end_s=10.0) == [(0.0, 2.0), (2.0, 5.0), (5.0, 9.9), (9.9, 10.0)]
    assert scene_spans([], end_s=3.0) == [(0.0, 3.0)]


def test_cuts_closer_than_min_scene_seconds_are_all_kept_and_no_clip_spans_one(tmp_path):
    """Real footage (a concatenation whose first source ends in a 0.3 s shot) had a kept clip that
    started with the old shot: PySceneDetect's min_scene_len merged the second of two close cuts away."""
    from pipelines.config import ClipsConfig, FiltersConfig
    from infra.footage import FootageSpec, varied_shots
    from pipelines.process import IngestSettings, SourceProcessor

    spec = FootageSpec("quick_cut_h264_320x240_25fps", "mp4", "libx264", 320, 240, 25,
                       varied_shots([("moving", 2.5), ("moving", 0.32), ("moving", 2.5)], offset=3))  # fmt: skip
    video = write_video(spec, tmp_path / spec.filename)
    assert video.cut_times_s[1] - video.cut_times_s[0] < ScenesConfig().min_scene_seconds

    fps, frames = _detect_frames(video.path)
    ours = cut_times(ScenesConfig(detector="content"), fps, frames)
    assert len(ours) == len(video.cut_times_s), (ours, video.cut_times_s)
    assert ours == pytest.approx(list(video.cut_times_s), abs=1 / fps + 1e-3)

    settings = IngestSettings(
        clips=ClipsConfig(min_seconds=1.0, max_seconds=4.0, fps=10, size="64x64"),
        filters=FiltersConfig(mode="score"),
    )
    rows = SourceProcessor(settings)(probe_source(str(video.path)))
    kept = [row for row in rows if row["status"] == "kept"]
    assert len(kept) == 2, [(r["start_s"], r["end_s"], r["reject_reason"]) for r in rows]
    for row in kept:
        inside = [cut for cut in video.cut_times_s if row["start_s"] < cut < row["end_s"]]
        assert not inside, (row["start_s"], row["end_s"], inside)
    short = [row for row in rows if row["reject_stage"] == "clips"]
    assert len(short) == 1 and short[0]["reject_reason"].startswith("scene 0.3"), short


@pytest.fixture(scope="module")
def storm_footage(tmp_path_factory):
    from infra.footage import storm_suite

    return {video.spec.name: video for video in storm_suite(tmp_path_factory.mktemp("storm"))}


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_a_cut_storm_is_continuous_content_whose_edges_stay_cuts(storm_footage, detector):
    """Two real music-visualiser sources became 317 and 59 one-frame scenes: ContentDetector fires on
    nearly every frame of continuous, fast-changing content. Such a storm is now one stretch with cuts
    at its edges (here the true hard cuts into and out of it), and nothing inside it."""
    video = storm_footage["visualiser_cuts_h264_320x180_25fps"]
    fps, frames = _detect_frames(video.path)
    tracker = CutTracker(ScenesConfig(detector=detector), fps)
    cuts = [cut for time_s, bgr in frames for cut in tracker.push(time_s, bgr)] + tracker.finish()
    if detector == "adaptive":
        # AdaptiveDetector's rolling average sees neither a storm nor, next to one, these two cuts.
        assert cuts == [] and tracker.storms == []
        return
    assert cuts == pytest.approx(list(video.cut_times_s), abs=1 / fps + 1e-3)
    (storm,) = tracker.storms
    first, stop = video.shot_frames[1]
    assert storm.first_frame == pytest.approx(first, abs=1) and storm.last_frame == pytest.approx(stop, abs=1)
    assert storm.fired >= 0.9 * storm.frames and storm.confirmed == 0
    assert storm.describe("content").startswith(f"scenes.detector=content fired on {storm.fired} of {storm.frames} frames at 2.4")


def test_storm_rules_on_a_cut_pattern():
    """StormCheck's three rules on cut frames as a detector would report them (AdaptiveDetector as the
    detector is its own re-check, so no pictures are needed): isolated cuts stand; a storm keeps its
    edges; inside it, cuts the re-check also storms on are dropped; no edge within a window of the start."""
    from scenedetect import AdaptiveDetector

    from pipelines.scenes import StormCheck

    check = StormCheck(AdaptiveDetector(min_scene_len=1), fps=25.0)
    half = check.half_window
    reported = {10, 40, 41, *range(100, 161), 200, *range(1, half)}  # an isolated cut, a flash, a storm, a cut
    kept = []
    for index in range(250):
        kept += check.push(index, None, [index] if index in reported else [], lambda f: f / 25.0)
    kept += check.finish(249, [], lambda f: f / 25.0)
    # The storm right at the start has no calm side to mark an edge; the one at 100-160 keeps both edges.
    assert kept == [10, 40, 41, 100, 160, 200]
    assert [(s.first_frame, s.last_frame, s.fired) for s in check.storms] == [(1, half - 1, half - 1), (100, 160, 61)]
