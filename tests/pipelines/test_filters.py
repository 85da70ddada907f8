"""Filter scores order generated frames the way a person would, and thresholds reject by them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.config import FiltersConfig
from pipelines.filters import FILTERS, ClipPixels, hamming, judge, perceptual_hash, score_clip


def _textured_scene(num_frames: int = 24, speed: int = 4, level: float = 1.0, seed: int = 0) -> np.ndarray:
    """(T, 64, 96, 3) frames: a random texture with a bright square moving `speed` px per frame."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(60, 190, (64, 96, 3)).astype(np.uint8)
    texture = cv2.GaussianBlur(texture, (3, 3), 0)
    frames = np.repeat(texture[None], num_frames, axis=0)  # (T, H, W, 3)
    for t in range(num_frames):
        x = (8 + speed * t) % 70
        frames[t, 20:40, x : x + 20] = (240, 220, 30)
    return np.clip(frames.astype(np.float32) * level, 0, 255).astype(np.uint8)


def _scores(frames: np.ndarray) -> dict[str, float]:
    return score_clip(ClipPixels(frames))


def test_static_scores_below_moving():
    still, moving = _scores(_textured_scene(speed=0)), _scores(_textured_scene(speed=4))
    assert still["motion"] < 0.05 < 1.0 < moving["motion"]
    assert still["static"] == 1.0 and moving["static"] == 0.0


def test_dark_scores_below_bright():
    dark, bright = _scores(_textured_scene(level=0.15)), _scores(_textured_scene(level=1.2))
    assert dark["brightness"] < 30 < 100 < bright["brightness"]


def test_blurred_scores_below_sharp():
    sharp = _textured_scene()
    blurred = np.stack([cv2.GaussianBlur(f, (9, 9), 4) for f in sharp])
    assert _scores(blurred)["sharpness"] * 5 < _scores(sharp)["sharpness"]


def test_frozen_tail_raises_the_static_fraction():
    frames = _textured_scene(num_frames=20)
    frames[10:] = frames[10]  # the picture freezes half-way
    assert _scores(frames)["static"] == pytest.approx(9 / 19)


def test_judge_rejects_on_the_first_failed_bound_and_score_mode_keeps_everything():
    scores = _scores(_textured_scene(speed=0, level=0.05))  # still and nearly black
    verdict = judge(scores, FiltersConfig())
    assert verdict.failed == "motion"
    assert verdict.reason.startswith("motion ") and "below filters.min_motion 0.2" in verdict.reason
    assert verdict.score == scores["motion"] and verdict.threshold == 0.2

    verdict = judge(scores, FiltersConfig(min_motion=None))
    assert verdict.failed == "brightness" and verdict.threshold == 16.0

    assert judge(scores, FiltersConfig(mode="score")).failed is None
    assert judge(_scores(_textured_scene()), FiltersConfig()).failed is None


def test_every_filter_bound_is_a_config_field():
    for name, (_, low, high) in FILTERS.items():
        assert low or high, name
        for field in (low, high):
            assert field is None or field in FiltersConfig.model_fields, field


def test_perceptual_hash_matches_reencodes_and_separates_different_scenes():
    clip = _textured_scene(seed=1)
    noisy = np.clip(clip.astype(int) + np.random.default_rng(5).integers(-6, 7, clip.shape), 0, 255).astype(np.uint8)
    other = _textured_scene(seed=2)
    h_clip, h_noisy, h_other = (perceptual_hash(ClipPixels(c)) for c in (clip, noisy, other))
    assert len(h_clip) == 16 and int(h_clip, 16) >= 0
    assert hamming(h_clip, h_noisy) <= FiltersConfig().dedup_hamming
    assert hamming(h_clip, h_other) > 12
