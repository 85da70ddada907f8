"""Scenes → clips: trim, split long scenes, reject short ones. No clip ever spans a cut.

Rules (shared by the pure planner and the streaming assembler):

1. Drop `clips.trim_seconds` at both ends of every scene (fades, dissolves, the frame of a cut).
2. Split what remains into consecutive chunks of exactly `clips.max_seconds` of frames.
3. A scene whose trimmed length is under `clips.min_seconds` is rejected
   ("scene 1.2 s shorter than clips.min_seconds 2.0").
4. The last chunk of a split scene, if shorter than `clips.min_seconds`, is rejected too
   ("remainder 0.8 s of a scene split at clips.max_seconds 10.0 ..."). We reject rather than
   merge because the previous chunk is already at max_seconds (merging would exceed it) and,
   streaming, it has been encoded and its frames freed by the time the scene end is known.

Frames are on the output grid `k / clips.fps` (seconds from the source start); a grid slot is
filled by the first source frame at or after it, so VFR sources and rate changes (60 → 24,
15 → 24) are handled by dropping or repeating frames by timestamp.

`plan_clips` is the pure planner on a scene span (for tests, tools and reasoning).
`ClipAssembler` applies the same rules online to frames as they are decoded, holding only the
current scene's not-yet-emitted frames: memory is bounded by one clip, not by the source.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.config import ClipsConfig

logger = logging.getLogger(__name__)

_EPS = 1e-6  # seconds; absorbs float error in k / fps arithmetic


@dataclass(frozen=True)
class ClipPlan:
    """One clip (or rejected piece) of a scene, on the output frame grid."""

    start_s: float
    end_s: float
    num_frames: int
    reject_reason: str | None = None


@dataclass
class ClipFrames:
    """A finished clip from the assembler: its frames (T, H, W, 3) uint8 RGB, or a rejected piece."""

    start_s: float
    end_s: float
    frames: np.ndarray
    scene_index: int
    reject_reason: str | None = None


def max_frames(cfg: ClipsConfig) -> int:
    return max(1, math.floor(cfg.max_seconds * cfg.fps + _EPS))


def min_frames(cfg: ClipsConfig) -> int:
    return max(1, math.ceil(cfg.min_seconds * cfg.fps - _EPS))


def short_scene_reason(scene_s: float, usable_s: float, cfg: ClipsConfig) -> str:
    if cfg.trim_seconds > 0 and scene_s >= cfg.min_seconds:
        return (
            f"scene {scene_s:.2f} s is {usable_s:.2f} s after clips.trim_seconds {cfg.trim_seconds:g} at each end, "
            f"shorter than clips.min_seconds {cfg.min_seconds:g}"
        )
    return f"scene {scene_s:.2f} s shorter than clips.min_seconds {cfg.min_seconds:g}"


def remainder_reason(remainder_s: float, cfg: ClipsConfig) -> str:
    return (
        f"remainder {remainder_s:.2f} s of a scene split at clips.max_seconds {cfg.max_seconds:g} "
        f"shorter than clips.min_seconds {cfg.min_seconds:g}"
    )


def plan_clips(scene_start_s: float, scene_end_s: float, cfg: ClipsConfig) -> list[ClipPlan]:
    """The clips of one scene [scene_start_s, scene_end_s) on the grid k / cfg.fps."""
    first = math.ceil((scene_start_s + cfg.trim_seconds) * cfg.fps - _EPS)
    stop = math.ceil((scene_end_s - cfg.trim_seconds) * cfg.fps - _EPS)  # exclusive
    usable = max(0, stop - first)
    if usable < min_frames(cfg):
        reason = short_scene_reason(scene_end_s - scene_start_s, usable / cfg.fps, cfg)
        if usable == 0:  # no frame at all: report the scene's own span
            return [ClipPlan(scene_start_s, scene_end_s, 0, reason)]
        return [ClipPlan(first / cfg.fps, stop / cfg.fps, usable, reason)]
    plans = []
    chunk = max_frames(cfg)
    for begin in range(first, stop, chunk):
        count = min(chunk, stop - begin)
        start_s, end_s = begin / cfg.fps, (begin + count) / cfg.fps
        reason = remainder_reason(count / cfg.fps, cfg) if count < min_frames(cfg) else None
        plans.append(ClipPlan(start_s, end_s, count, reason))
    return plans


@dataclass
class _Slot:
    slot_s: float  # grid time k / fps
    source_s: float  # time of the source frame that fills it
    rgb: np.ndarray  # (H, W, 3)


@dataclass
class ClipAssembler:
    """Online form of `plan_clips` over settled frames of one source.

    Call `add` with grid slots in time order (only frames no later cut can move to another
    scene), `cut(t)` when a scene ends at t, `finish(end_s)` after the last frame. Each returns the
    clips it completed.
    """

    cfg: ClipsConfig
    scene_start_s: float = 0.0
    scene_index: int = 0
    _buffer: list[_Slot] = field(default_factory=list)
    _emitted_in_scene: int = 0

    def add(self, slot_s: float, source_s: float, rgb: np.ndarray) -> list[ClipFrames]:
        if source_s < self.scene_start_s + self.cfg.trim_seconds - _EPS:
            return []  # head trim
        self._buffer.append(_Slot(slot_s, source_s, rgb))
        chunk = max_frames(self.cfg)
        # A full chunk can go once its last frame is further than trim_seconds from the newest
        # frame: any later cut comes after the newest frame, so tail trimming cannot reach it.
        if len(self._buffer) >= chunk and self._buffer[chunk - 1].source_s <= source_s - self.cfg.trim_seconds + _EPS:
            return [self._emit(chunk)]
        return []

    def cut(self, cut_s: float) -> list[ClipFrames]:
        """The scene ends at cut_s (the time of the first frame of the next scene)."""
        finished = self._close(cut_s)
        self.scene_start_s = cut_s
        self.scene_index += 1
        self._emitted_in_scene = 0
        return finished

    def finish(self, end_s: float) -> list[ClipFrames]:
        """The source ended at end_s (after the last frame's duration)."""
        return self._close(end_s)

    @property
    def pending_start_s(self) -> float:
        """Start of the frames not yet in a finished clip (where a decode error's reject row begins)."""
        return self._buffer[0].slot_s if self._buffer else self.scene_start_s

    def _close(self, end_s: float) -> list[ClipFrames]:
        self._buffer = [slot for slot in self._buffer if slot.source_s < end_s - self.cfg.trim_seconds - _EPS]
        count = len(self._buffer)
        fps = self.cfg.fps
        if self._emitted_in_scene == 0 and count < min_frames(self.cfg):
            reason = short_scene_reason(end_s - self.scene_start_s, count / fps, self.cfg)
            clip = self._emit(count, reason)
            # An empty rejected scene still gets its span, so the reject row says where it was.
            if count == 0:
                clip.start_s, clip.end_s = self.scene_start_s, end_s
            return [clip]
        if count == 0:
            return []
        reason = remainder_reason(count / fps, self.cfg) if count < min_frames(self.cfg) else None
        return [self._emit(count, reason)]

    def _emit(self, count: int, reason: str | None = None) -> ClipFrames:
        slots, self._buffer = self._buffer[:count], self._buffer[count:]
        if slots:
            frames = np.stack([slot.rgb for slot in slots])  # (T, H, W, 3)
            start_s, end_s = slots[0].slot_s, slots[-1].slot_s + 1 / self.cfg.fps
        else:
            frames = np.zeros((0, self.cfg.height, self.cfg.width, 3), np.uint8)
            start_s = end_s = self.scene_start_s
        self._emitted_in_scene += 1
        return ClipFrames(start_s, end_s, frames, self.scene_index, reason)
