"""Scene cut detection on frames we already decoded, with PySceneDetect's own detectors.

PySceneDetect normally opens the file itself; ingestion must decode each source once, so we
drive a detector through its frame API instead: `detector.process_frame(timecode, bgr_frame)`
for every frame, `post_process(last)` at the end. Timecodes are frame numbers at the source
rate, as PySceneDetect's OpenCV backend makes them, so detector settings (min_scene_len in
frames, the threshold detector's fade midpoint arithmetic) behave exactly as in
`scenedetect.detect()`.

Every cut the detector sees is kept, however close to the previous one. PySceneDetect's
`min_scene_len` would merge (ContentDetector's flash filter) or suppress (Adaptive, Threshold) a
cut that follows another within that window, so the frames between the two cuts would land in
the next scene and a clip would span a hard cut (real footage: a 0.3 s shot at the end of one
source followed by the next, or a trailer's quick cuts). The detectors therefore run with a
one-frame window; a piece shorter than `clips.min_seconds` between two close cuts (a quick shot,
or a flash) is then rejected by the clip rules ("scene 0.32 s shorter than ..."), and no clip
contains a cut. `scenes.min_scene_seconds` still sets how long the tracker waits before it calls
frames settled.

Detectors report some cuts late: ContentDetector's flash filter (MERGE mode) emits a cut up to
`min_scene_len` frames after it happened, AdaptiveDetector `window_width` frames later, and
ThresholdDetector places a cut in the middle of a dark stretch when the picture comes back.
`CutTracker.settled_before(t)` tells the clip builder up to which time no further cut can
appear, so it never commits a frame that a late cut would have moved to another scene.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections import deque

import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, SceneDetector, ThresholdDetector

from pipelines.config import ScenesConfig

logger = logging.getLogger(__name__)

# scenes.detector -> (detector class, name of its threshold argument)
DETECTORS: dict[str, tuple[type[SceneDetector], str]] = {
    "content": (ContentDetector, "threshold"),
    "adaptive": (AdaptiveDetector, "adaptive_threshold"),
    "threshold": (ThresholdDetector, "threshold"),
}


def detector_threshold(cfg: ScenesConfig) -> float:
    """`scenes.threshold`, or the detector's own default when unset (recorded in every clip row)."""
    if cfg.threshold is not None:
        return float(cfg.threshold)
    detector_cls, argument = DETECTORS[cfg.detector]
    return float(inspect.signature(detector_cls.__init__).parameters[argument].default)


# Detector min_scene_len in frames: 1 reports every cut (see the module docstring for why).
DETECTOR_MIN_SCENE_FRAMES = 1


def min_scene_frames(cfg: ScenesConfig, fps: float) -> int:
    """`scenes.min_scene_seconds` in source frames (PySceneDetect's default 15 frames is 0.5 s at 30 fps)."""
    return max(1, round(cfg.min_scene_seconds * fps))


def make_detector(cfg: ScenesConfig, fps: float) -> SceneDetector:
    detector_cls, argument = DETECTORS[cfg.detector]
    return detector_cls(**{argument: detector_threshold(cfg), "min_scene_len": DETECTOR_MIN_SCENE_FRAMES})


class CutTracker:
    """Feeds one source's frames to a detector and returns cut times in seconds.

    A cut time is the time of the first frame of the new scene.
    """

    def __init__(self, cfg: ScenesConfig, fps: float):
        self.fps = fps
        self.detector = make_detector(cfg, fps)
        # Frames a cut can be reported after it happened (plus one for the frame in hand).
        self.lag_frames = max(self.detector.event_buffer_length, min_scene_frames(cfg, fps), 1) + 1
        self._times: deque[float] = deque()  # times of recent frames, index self._first_index onward
        self._first_index = 0
        self._index = -1

    def push(self, time_s: float, bgr: np.ndarray) -> list[float]:
        """Process the next frame ((h, w, 3) uint8 BGR); returns cut times found so far, ascending."""
        self._index += 1
        self._times.append(time_s)
        cuts = self.detector.process_frame(FrameTimecode(self._index, fps=self.fps), bgr)
        result = [self._time_of(cut.frame_num) for cut in cuts]
        self._forget_old()
        return sorted(result)

    def finish(self) -> list[float]:
        if self._index < 0:
            return []
        cuts = self.detector.post_process(FrameTimecode(self._index, fps=self.fps))
        return sorted(self._time_of(cut.frame_num) for cut in cuts)

    def settled_before(self, now_s: float) -> float:
        """Frames earlier than this time will not be split from their scene by a later cut."""
        if self._in_fade_out():
            # ThresholdDetector puts the cut mid-way through the dark stretch, known only at fade-in.
            return self._fade_start_s()
        if len(self._times) <= self.lag_frames:
            return self._times[0] if self._times else now_s
        return self._times[-1 - self.lag_frames]

    def _in_fade_out(self) -> bool:
        return isinstance(self.detector, ThresholdDetector) and self.detector.last_fade["type"] == "out"

    def _fade_start_s(self) -> float:
        fade = self.detector.last_fade["frame"]
        return self._time_of(fade.frame_num) if fade is not None else 0.0

    def _time_of(self, frame_num: int) -> float:
        offset = frame_num - self._first_index
        if 0 <= offset < len(self._times):
            return self._times[offset]
        # Older than the window we keep (only a very long fade-out): fall back to the nominal rate.
        return frame_num / self.fps

    def _forget_old(self) -> None:
        keep = self.lag_frames + 1
        if self._in_fade_out():
            return  # the fade's midpoint needs the times since it started
        while len(self._times) > keep:
            self._times.popleft()
            self._first_index += 1


def cut_times(cfg: ScenesConfig, fps: float, frames: list[tuple[float, np.ndarray]]) -> list[float]:
    """All cut times for a list of (time_s, bgr) frames: the pure form of CutTracker, for tests and tools."""
    tracker = CutTracker(cfg, fps)
    cuts: list[float] = []
    for time_s, bgr in frames:
        cuts.extend(tracker.push(time_s, bgr))
    cuts.extend(tracker.finish())
    return sorted(set(cuts))


def scene_spans(cuts: list[float], end_s: float) -> list[tuple[float, float]]:
    """[(start_s, end_s)] of the scenes between cuts, from 0 to the source end."""
    bounds = [0.0] + [c for c in sorted(cuts) if 0.0 < c < end_s] + [end_s]
    return [(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


def scene_index(cuts: list[float], time_s: float) -> int:
    """Which scene (0-based) `time_s` falls in, given sorted cut times."""
    return bisect.bisect_right(cuts, time_s)
