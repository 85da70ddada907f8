"""Scenes → clips: the pure planner and the streaming assembler agree and never cross a cut."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.clips import ClipAssembler, max_frames, plan_clips
from pipelines.config import ClipsConfig


def test_plan_trims_splits_and_rejects_a_short_remainder():
    cfg = ClipsConfig(min_seconds=1.0, max_seconds=2.0, fps=10, trim_seconds=0.2)
    plans = plan_clips(0.0, 5.7, cfg)  # usable 0.2 .. 5.5 = 5.3 s → 2 s, 2 s, 1.3 s
    assert [p.num_frames for p in plans] == [20, 20, 13]
    assert [p.start_s for p in plans] == pytest.approx([0.2, 2.2, 4.2])
    assert [p.end_s for p in plans] == pytest.approx([2.2, 4.2, 5.5])
    assert all(p.reject_reason is None for p in plans)

    plans = plan_clips(0.0, 4.9, cfg)  # usable 0.2 .. 4.7 = 4.5 s → 2, 2, 0.5 (too short)
    assert [p.num_frames for p in plans] == [20, 20, 5]
    assert plans[-1].reject_reason.startswith("remainder 0.50 s")
    assert "clips.min_seconds 1" in plans[-1].reject_reason


def test_plan_rejects_short_scenes_naming_the_setting():
    cfg = ClipsConfig(min_seconds=2.0, max_seconds=10.0, fps=24, trim_seconds=0.0)
    (plan,) = plan_clips(3.0, 4.2, cfg)
    assert plan.reject_reason == "scene 1.20 s shorter than clips.min_seconds 2"
    # Long enough before trimming, too short after: the reason says so.
    (plan,) = plan_clips(0.0, 2.1, ClipsConfig(min_seconds=2.0, max_seconds=10.0, fps=24, trim_seconds=0.1))
    assert "after clips.trim_seconds 0.1" in plan.reject_reason


def _frames_with_cuts(duration_s: float, source_fps: float, cuts: list[float], out_fps: float):
    """(slot_s, source_s, rgb) as the processor produces them, each frame painted with its scene index."""
    slots, next_slot = [], 0
    for i in range(int(round(duration_s * source_fps))):
        t = i / source_fps
        scene = sum(t >= c for c in cuts)
        rgb = np.full((4, 4, 3), scene, np.uint8)
        while next_slot / out_fps <= t + 1e-6:
            slots.append((next_slot / out_fps, t, rgb))
            next_slot += 1
    return slots


@pytest.mark.parametrize("source_fps", [15.0, 30.0, 60.0])
def test_assembler_matches_planner_and_never_crosses_a_cut(source_fps):
    cfg = ClipsConfig(min_seconds=0.5, max_seconds=1.5, fps=12, size="16x16", trim_seconds=0.1)
    cuts, duration = [2.0, 2.4, 5.3], 7.0
    assembler = ClipAssembler(cfg)
    clips, peak_buffer = [], 0
    for slot_s, source_s, rgb in _frames_with_cuts(duration, source_fps, cuts, cfg.fps):
        for cut in [c for c in cuts if c <= source_s and c > assembler.scene_start_s]:
            clips += assembler.cut(cut)
        clips += assembler.add(slot_s, source_s, rgb)
        peak_buffer = max(peak_buffer, len(assembler._buffer))
    clips += assembler.finish(duration)

    # Memory is bounded by one clip (+ the tail that trimming may still drop), not the source.
    assert peak_buffer <= max_frames(cfg) + int(cfg.trim_seconds * cfg.fps) + 2
    bounds = [0.0, *cuts, duration]
    planned = [p for a, b in zip(bounds, bounds[1:]) for p in plan_clips(a, b, cfg)]
    assert len(clips) == len(planned)
    one_frame = 1 / cfg.fps + 1 / source_fps
    for clip, plan in zip(clips, planned):
        assert (clip.reject_reason is None) == (plan.reject_reason is None)
        assert clip.start_s == pytest.approx(plan.start_s, abs=one_frame)
        assert clip.end_s == pytest.approx(plan.end_s, abs=one_frame)
        if len(clip.frames):
            # Every frame of a clip comes from one scene: no clip spans a cut.
            assert len(np.unique(clip.frames)) == 1
            assert int(clip.frames[0, 0, 0, 0]) == clip.scene_index
            assert len(clip.frames) <= max_frames(cfg)
    # The 0.4 s scene between 2.0 and 2.4 is rejected with a reason, not silently dropped.
    assert any(c.scene_index == 1 and c.reject_reason and c.reject_reason.startswith("scene 0.40 s") for c in clips)
