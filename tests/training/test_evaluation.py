"""training/evaluation.py: the metric functions on synthetic frames, the held-out clip choice on real
shards, and the gate's comparison rule. (Evaluating registered versions end to end, with the
promotion gate, is tests/infra/test_promote_gate.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.training.conftest import uniform_clips, write_shards
from training.clip_index import eval_rank, is_held_out, read_clip_index
from training.eval_metrics import drift, flicker, flow_accel, psnr, ssim
from training.evaluation import ABSOLUTE_SLACK, EvalSettings, build_plan, held_out_of, regressions, trained_modes, trained_on_plan
from training.tracking import TAG_HELD_OUT, TAG_MANIFEST_SHA256, run_tags

T, H, W = 8, 32, 32


def blob_video(xs: list[float], brightness: list[float] | None = None, size: int = H) -> np.ndarray:
    """uint8 (T, H, W, 3): a soft grey blob centred at x = xs[t] on a dark ground, plus a per-frame
    brightness offset."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.empty((len(xs), size, size, 3), np.uint8)
    for t, x in enumerate(xs):
        value = 60 + 150 * np.exp(-((xx - x) ** 2 + (yy - size / 2) ** 2) / (2 * 4.0**2))
        value = value + (brightness[t] if brightness is not None else 0)
        frames[t] = np.clip(value, 0, 255).astype(np.uint8)[..., None]
    return frames


def test_identical_frames_are_perfect_and_noise_is_not():
    video = blob_video([8 + 2 * t for t in range(T)])
    assert psnr(video, video) == math.inf
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(video.astype(int) + np.random.default_rng(0).integers(-40, 41, video.shape), 0, 255).astype(np.uint8)
    assert 10 < psnr(video, noisy) < 30
    assert ssim(video, noisy) < ssim(video, np.clip(video.astype(int) + 2, 0, 255).astype(np.uint8)) < 1.0
    assert ssim(video[0], video[0]) == pytest.approx(1.0, abs=1e-9)  # one (H, W, 3) image works too


def test_flicker_scores_brightness_pumping_not_motion():
    moving = blob_video([8 + 2 * t for t in range(T)])
    pumping = blob_video([8 + 2 * t for t in range(T)], brightness=[0, 30] * (T // 2))
    static = blob_video([16] * T)
    noise = np.random.default_rng(0).integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    assert flicker(static) < 1e-6
    assert flicker(moving) < 0.01  # motion that optical flow explains is not flicker
    assert flicker(pumping) > 10 * flicker(moving)
    assert flicker(noise) > 10 * flicker(moving)
    assert math.isnan(flicker(moving[:1]))


def test_flow_accel_detects_a_jump():
    steady = blob_video([8 + 2 * t for t in range(T)])
    jump = blob_video([8, 10, 12, 14, 22, 24, 26, 28])  # +8 px once, otherwise the same speed
    assert flow_accel(blob_video([16] * T)) < 1e-6
    assert flow_accel(jump) > 5 * flow_accel(steady)
    assert math.isnan(flow_accel(steady[:2]))


def test_drift_compares_the_first_and_last_window():
    steady = blob_video([16] * 12)
    fading = blob_video([16] * 12, brightness=[-5 * t for t in range(12)])
    assert drift(steady, 4) < 1e-6
    assert drift(fading, 4) > 0.1
    assert math.isnan(drift(steady[:4], 4))  # one window: nothing to compare


def test_regressions_need_more_than_the_tolerance_and_the_slack():
    champion = {"flicker": 0.12, "fidelity_psnr": 40.0, "drift": 0.001}
    assert regressions(dict(champion), champion, 0.1) == []
    worse = {"flicker": 0.21, "fidelity_psnr": 30.0, "drift": 0.001 + ABSOLUTE_SLACK["drift"] / 2}
    # drift doubled but stays inside its absolute slack; flicker is worst relative to the champion
    assert regressions(worse, champion, 0.1) == [("flicker", 0.21, 0.12), ("fidelity_psnr", 30.0, 40.0)]
    assert regressions(worse, champion, 1.0) == []  # 100% tolerance lets both through
    assert regressions({"flicker": 0.5}, {"drift": 0.1}, 0.1) == []  # nothing in common, nothing to compare
    with pytest.raises(ValueError, match="tolerance"):
        regressions(worse, champion, -0.1)


def test_plan_takes_the_same_hash_chosen_clips_whatever_the_order(tmp_path):
    shards = write_shards(tmp_path / "a", uniform_clips(6), clips_per_shard=2)
    plan = build_plan(str(shards), EvalSettings(prompts=3, clips=2))
    again = build_plan(str(shards), EvalSettings(prompts=3, clips=2))
    assert [c.id for c in plan.clips] == [c.id for c in again.clips] and len(plan.clips) == 2
    assert plan.prompts[:2] == [c.caption for c in plan.clips] and len(plan.prompts) == 3  # captions first
    assert plan.data_manifest_sha256 is not None
    # one more clip in other shards: the held-out choice is by clip id, so it only adds candidates
    bigger = build_plan(str(write_shards(tmp_path / "b", uniform_clips(8), clips_per_shard=3)), EvalSettings(clips=8))
    chosen = {c.id for c in plan.clips}
    assert chosen <= {c.id for c in bigger.clips}
    text_only = build_plan(None, EvalSettings(prompts=2))
    assert text_only.clips == [] and len(text_only.prompts) == 2 and "text prompts only" in text_only.note


def test_a_version_trained_with_a_split_is_evaluated_on_clips_it_never_saw(tmp_path):
    shards = str(write_shards(tmp_path / "s", uniform_clips(6), clips_per_shard=2))
    ids = read_clip_index(shards).ids
    # a version's tags as training writes them (registration copies the run's reelforge.* tags)
    split = run_tags("feedfacefeedface", shards, 0.25)
    held = sorted((c for c in ids if is_held_out(c, 0.25)), key=eval_rank)
    assert len(held) == 3 and held_out_of(split) == 0.25
    plan = build_plan(shards, EvalSettings(prompts=1, clips=2), held_out_of(split))
    assert [c.id for c in plan.clips] == held[:2] and plan.held_out == 0.25  # the lowest-ranked held-out clips
    assert "data.held_out=0.25" in plan.note and not trained_on_plan(plan, split)
    assert trained_on_plan(plan, split | {TAG_HELD_OUT: "0.1"})  # a version holding out fewer trained on one of them

    # trained before the split existed (no tag) or with 0: the smallest ranks, seen in training, as before
    old = {key: value for key, value in split.items() if key != TAG_HELD_OUT}
    as_before = build_plan(shards, EvalSettings(prompts=1, clips=2), held_out_of(old))
    assert [c.id for c in as_before.clips] == sorted(ids, key=eval_rank)[:2] and as_before.held_out == 0
    assert trained_on_plan(as_before, old) and trained_on_plan(as_before, split | {TAG_HELD_OUT: "0.0"})
    assert not trained_on_plan(as_before, old | {TAG_MANIFEST_SHA256: "0" * 64})  # other shards: not known

    # the gate's plan for fractions 0.25 and 0.1: the clips held out from both
    both = build_plan(shards, EvalSettings(prompts=1, clips=2), min(0.25, 0.1))
    assert [c.id for c in both.clips] == [c for c in held if is_held_out(c, 0.1)] and len(both.clips) == 1
    assert not trained_on_plan(both, split) and not trained_on_plan(both, split | {TAG_HELD_OUT: "0.1"})
    # no clip under the fraction: said in the note, text prompts only
    none = build_plan(shards, EvalSettings(prompts=2, clips=2), 0.05)
    assert none.clips == [] and len(none.prompts) == 2
    assert "no clip of" in none.note and "text prompts only" in none.note
    assert not trained_on_plan(none, split | {TAG_HELD_OUT: "0.05"})


def test_modes_follow_the_card_when_there_is_one():
    assert trained_modes({}) == ["image", "extend"]
    assert trained_modes({"card": {"modes": ["text", "extend"]}}) == ["extend"]
    assert trained_modes({"card": {"modes": ["text"]}}) == []
