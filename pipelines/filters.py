"""Clip quality scores on frames already in memory, and the thresholds that reject clips.

A filter is one function `(ClipPixels) -> float` plus the `FiltersConfig` fields bounding it,
registered in the FILTERS dict literal below; adding a filter is one function and one entry
(plus its threshold fields in FiltersConfig). Every clip row carries `score_<name>` for every
filter, also when `filters.mode="score"` keeps everything.

Scores work on small grayscale copies where the property survives downscaling (motion,
stillness, brightness) and on the clip-size frames only for sharpness, so scoring costs a
fraction of the encode. The small copies are area-averaged to a fixed width whatever
`clips.size` is, so motion and stillness scores mean the same at 64x64 and at 512x512.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from pipelines.config import FiltersConfig

SMALL_WIDTH = 64  # px; motion and stillness are visible at this size and 16x cheaper than 256
# A small pixel "changed" when its luma moved by more than this (0-255): area averaging at 64 px
# leaves codec noise of a frozen picture at 0-2 levels, while the edge of an object moving
# a quarter of a small pixel changes by a quarter of its contrast (tens of levels).
CHANGE_LEVEL = 8.0
# Two frames are the same picture when under this fraction of small pixels changed (about 8 of
# the 4096 of a 64x64 frame): a moving shape's edges alone change over 0.5% per frame.
STILL_FRACTION = 0.002
# Stillness compares frames this far apart, so that frames repeated by the fps resampler
# (15 -> 24 fps repeats every other frame or so) do not count as frozen picture.
STILL_LAG_S = 0.25
SHARPNESS_SAMPLES = 4  # frames; Laplacian variance is stable across a shot
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601 R, G, B


class ClipPixels:
    """One clip's frames plus lazily computed views the filters share."""

    def __init__(self, rgb: np.ndarray, fps: float | None = None):
        if rgb.ndim != 4 or rgb.shape[0] == 0:
            raise ValueError(f"ClipPixels needs (T, H, W, 3) frames with T >= 1, got shape {rgb.shape}")
        self.rgb = rgb  # (T, H, W, 3) uint8
        # Frames STILL_LAG_S apart (consecutive frames when the rate is unknown).
        self.still_lag = max(1, round(fps * STILL_LAG_S)) if fps else 1

    def gray(self, index: int) -> np.ndarray:
        """(H, W) uint8 luma of one frame (BT.601, as cv2 computes it)."""
        return cv2.cvtColor(self.rgb[index], cv2.COLOR_RGB2GRAY)

    @functools.cached_property
    def gray_small(self) -> np.ndarray:
        """(T, h, SMALL_WIDTH) float32 luma, area-averaged (h keeps the aspect ratio): the same
        picture gives the same small frames at any clip size."""
        width = min(SMALL_WIDTH, self.rgb.shape[2])
        height = max(1, round(self.rgb.shape[1] * width / self.rgb.shape[2]))
        small = [cv2.cvtColor(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for frame in self.rgb]
        return np.stack(small).astype(np.float32)  # (T, h, w)

    @functools.cached_property
    def frame_diffs(self) -> np.ndarray:
        """(T-1,) mean absolute difference between consecutive small gray frames, 0-255."""
        small = self.gray_small
        if len(small) < 2:
            return np.zeros(0, np.float32)
        return np.abs(np.diff(small, axis=0)).mean(axis=(1, 2))

    @functools.cached_property
    def changed_fractions(self) -> np.ndarray:
        """(T-lag,) fraction of small pixels changed by more than CHANGE_LEVEL between frames
        `still_lag` apart; empty when the clip is shorter than the lag."""
        small, lag = self.gray_small, self.still_lag
        if len(small) <= lag:
            return np.zeros(0, np.float32)
        return (np.abs(small[lag:] - small[:-lag]) > CHANGE_LEVEL).mean(axis=(1, 2))

    def sample_indices(self, count: int) -> np.ndarray:
        return np.unique(np.linspace(0, len(self.rgb) - 1, num=min(count, len(self.rgb))).round().astype(int))


def motion_score(pixels: ClipPixels) -> float:
    """Mean absolute luma change between consecutive frames at SMALL_WIDTH (0-255): 0 for a still image."""
    diffs = pixels.frame_diffs
    return float(diffs.mean()) if len(diffs) else 0.0


def brightness_score(pixels: ClipPixels) -> float:
    """Mean luma (0-255)."""
    return float(pixels.gray_small.mean())


def sharpness_score(pixels: ClipPixels) -> float:
    """Variance of the Laplacian at clip size, averaged over a few frames: low means blurred."""
    return float(np.mean([cv2.Laplacian(pixels.gray(i), cv2.CV_64F).var() for i in pixels.sample_indices(SHARPNESS_SAMPLES)]))


def static_score(pixels: ClipPixels) -> float:
    """Fraction of frames (compared STILL_LAG_S ahead) showing the same picture: 1 for frozen
    or still footage, 0 when something moves all the time. Counting changed pixels instead of
    averaging differences keeps a small, slow object (a few percent of the frame) moving."""
    fractions = pixels.changed_fractions
    if not len(fractions):  # shorter than the lag: compare first and last frame
        fractions = (np.abs(pixels.gray_small[-1] - pixels.gray_small[0]) > CHANGE_LEVEL).mean(keepdims=True)
        if len(pixels.gray_small) < 2:
            return 1.0
    return float((fractions < STILL_FRACTION).mean())


# name -> (score function, FiltersConfig field of the lower bound, field of the upper bound)
FILTERS: dict[str, tuple[Callable[[ClipPixels], float], str | None, str | None]] = {
    "motion": (motion_score, "min_motion", "max_motion"),
    "brightness": (brightness_score, "min_brightness", "max_brightness"),
    "sharpness": (sharpness_score, "min_sharpness", None),
    "static": (static_score, None, "max_static_fraction"),
}


@dataclass(frozen=True)
class FilterVerdict:
    scores: dict[str, float]  # filter name -> score
    failed: str | None = None  # first filter (in FILTERS order) out of bounds
    score: float | None = None
    threshold: float | None = None
    reason: str | None = None


def score_clip(pixels: ClipPixels) -> dict[str, float]:
    return {name: function(pixels) for name, (function, _, _) in FILTERS.items()}


def judge(scores: dict[str, float], cfg: FiltersConfig) -> FilterVerdict:
    """The first failed bound, or a pass; in `score` mode always a pass."""
    if cfg.mode == "score":
        return FilterVerdict(scores)
    for name, (_, min_field, max_field) in FILTERS.items():
        score = scores[name]
        low = getattr(cfg, min_field) if min_field else None
        if low is not None and score < low:
            return FilterVerdict(scores, name, score, low, f"{name} {score:.3g} below filters.{min_field} {low:g}")
        high = getattr(cfg, max_field) if max_field else None
        if high is not None and score > high:
            return FilterVerdict(scores, name, score, high, f"{name} {score:.3g} above filters.{max_field} {high:g}")
    return FilterVerdict(scores)


# Perceptual hash layout (see perceptual_hash): per sampled frame a 64-bit luma pHash, then a
# colour layout of the clip. 3 * 64 + 2 * 2 * 3 * 16 = 384 bits = 96 hex digits.
PHASH_FRACTIONS = (0.25, 0.5, 0.75)  # where in the clip the hashed frames are
PHASH_SIZE = 32  # px; the grayscale downscale the DCT runs on
PHASH_DCT = 8  # the lowest 8x8 DCT coefficients make one frame's 64 bits
COLOR_GRID = 2  # colour layout cells per side
COLOR_LEVELS = np.arange(8, 256, 16, dtype=np.float32)  # 16 thermometer thresholds per cell and channel
PHASH_BITS = len(PHASH_FRACTIONS) * PHASH_DCT**2 + COLOR_GRID**2 * 3 * len(COLOR_LEVELS)


def perceptual_hash(pixels: ClipPixels) -> str:
    """384-bit clip hash (96 hex digits) for near-duplicate checks by Hamming distance.

    Two parts, because luma structure alone is colour-blind: a dHash of the mean frame put
    "green circle" and "yellow circle on dark green" shots 1-4 bits apart, since the textured,
    graded background dominates every luma thumbnail.

    * structure: per frame at 1/4, 1/2, 3/4 of the clip, pHash (DCT of a 32x32 luma downscale,
      the lowest 8x8 coefficients against their median; the DC term carries brightness, not
      structure, so its bit is always 0). Robust to rescaling and compression.
    * colour layout: mean Y, Cr, Cb of each cell of a 2x2 grid over the same frames, each
      thermometer-coded with 16 thresholds 16 levels apart (bit k = value > 8 + 16 k). Hamming
      distance between thermometer codes is the number of thresholds between two values, so it
      grows with the colour difference and a re-encode's ±2 levels flip at most one bit per value
      (a binary number would flip up to all of them).

    Measured on every clip of footage.standard_specs + demo_specs (docs/benchmarks.md): the
    same clip re-encoded (crf 18-28, 0.75-1.5x size) differs by a median of 8 bits; distinct
    shots by at least 16, and only shots differing in nothing but circle vs square come that close.
    """
    num_frames = len(pixels.rgb)
    indices = [min(num_frames - 1, int(fraction * num_frames)) for fraction in PHASH_FRACTIONS]
    bits, layouts = [], []
    for index in indices:
        small = cv2.resize(pixels.rgb[index], (PHASH_SIZE, PHASH_SIZE), interpolation=cv2.INTER_AREA)  # (32, 32, 3)
        ycrcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb).astype(np.float32)  # (32, 32, 3)
        dct = cv2.dct(np.ascontiguousarray(ycrcb[..., 0]))[:PHASH_DCT, :PHASH_DCT].reshape(-1)  # (64,)
        frame_bits = dct > np.median(dct[1:])
        frame_bits[0] = False
        bits.append(frame_bits)
        layouts.append(cv2.resize(ycrcb, (COLOR_GRID, COLOR_GRID), interpolation=cv2.INTER_AREA))  # (2, 2, 3)
    layout = np.mean(layouts, axis=0).reshape(-1)  # (12,) mean over the sampled frames
    bits.append((layout[:, None] > COLOR_LEVELS[None, :]).reshape(-1))  # (12 * 16,)
    packed = np.packbits(np.concatenate(bits))  # (48,) uint8
    return packed.tobytes().hex()


def hamming(hash_a: str, hash_b: str) -> int:
    """Bits that differ between two perceptual hashes (0 = same picture)."""
    return (int(hash_a, 16) ^ int(hash_b, 16)).bit_count()
