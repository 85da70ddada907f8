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

Cut storms. ContentDetector compares each frame with the one before; on continuous, fast-changing
content (a music visualiser, strobing colour) that difference is large on every frame and the
detector "cuts" on most of them: two real 320x180 visualiser sources became 317 and 59 one-frame
scenes, every one rejected as too short, and gave no clip. A one- or two-frame scene happens
(a flash, an inserted frame), but not on half the frames of half a second: such a stretch is a
storm, and its cuts say the picture moves fast, not that the shot changed. `StormCheck` keeps a
storm's edges as cuts (calm frames on one side: a real cut into or out of it, or where the fast
change starts), so the stretch is a scene of its own, and re-checks each cut inside it with
PySceneDetect's AdaptiveDetector, which compares a frame's score with the rolling average of its
neighbours (made for fast motion): a real cut stands out from the storm around it and stays; the
others are dropped. The stretch is continuous content and becomes clips the filters judge like any
other. A storm the re-check confirms just as densely (`scenes.detector=adaptive` storming on its
own) keeps no cut inside. The processor logs each storm: "scenes.detector=content fired on 150 of
150 frames at ...: fast-changing content, kept as continuous (...)".
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

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
        self.storm_check = StormCheck(self.detector, fps)
        # Frames a cut can be reported after it happened: the detector's own delay and the storm
        # check's look at the frames after it (plus one for the frame in hand).
        self.lag_frames = max(self.storm_check.delay_frames, min_scene_frames(cfg, fps), 1) + 1
        self._times: deque[float] = deque()  # times of recent frames, index self._first_index onward
        self._first_index = 0
        self._index = -1

    @property
    def storms(self) -> list[CutStorm]:
        """The cut storms found so far (see the module docstring), in time order."""
        return self.storm_check.storms

    def push(self, time_s: float, bgr: np.ndarray) -> list[float]:
        """Process the next frame ((h, w, 3) uint8 BGR); returns cut times found so far, ascending."""
        self._index += 1
        self._times.append(time_s)
        cuts = self.detector.process_frame(FrameTimecode(self._index, fps=self.fps), bgr)
        kept = self.storm_check.push(self._index, bgr, [cut.frame_num for cut in cuts], self._time_of)
        result = [self._time_of(frame) for frame in kept]
        self._forget_old()
        return sorted(result)

    def finish(self) -> list[float]:
        if self._index < 0:
            return []
        cuts = self.detector.post_process(FrameTimecode(self._index, fps=self.fps))
        kept = self.storm_check.finish(self._index, [cut.frame_num for cut in cuts], self._time_of)
        return sorted(self._time_of(frame) for frame in kept)

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


# --- cut storms (see the module docstring) ---------------------------------------------------

# A storm: in STORM_WINDOW_S centred on a cut, the detector fired on at least STORM_FRACTION of the
# frames. That is shots of two frames or less on average for half a second, which no edit makes.
STORM_WINDOW_S = 0.5
STORM_FRACTION = 0.5
# AdaptiveDetector's own default: a frame's score against the mean of the 2 frames each side.
ADAPTIVE_WINDOW = 2


@dataclass
class CutStorm:
    """A stretch where the detector fired on most frames (first to last cut of the storm)."""

    start_s: float
    end_s: float
    first_frame: int
    last_frame: int
    fired: int = 1  # frames of the stretch the detector cut at
    confirmed: int = 0  # cuts inside it (not at its edges) the AdaptiveDetector re-check confirmed

    @property
    def frames(self) -> int:
        return self.last_frame - self.first_frame + 1

    def describe(self, detector: str) -> str:
        inside = f"{self.confirmed} cut{'s' if self.confirmed != 1 else ''} inside confirmed by AdaptiveDetector"
        return (
            f"scenes.detector={detector} fired on {self.fired} of {self.frames} frames at "
            f"{self.start_s:.2f}-{self.end_s:.2f} s: fast-changing content, kept as continuous ({inside})"
        )


class StormCheck:
    """Holds each cut a detector reports until the frames around it are seen, then decides:

    1. A cut outside a storm stands.
    2. A cut at a storm's edge (no cut in the half window before it, or after it) stands.
    3. A cut inside a storm stands only if an AdaptiveDetector re-check confirms it, and that
       re-check does not itself fire on half the window (then nothing inside stands).

    The re-check runs only where a storm may be: an AdaptiveDetector starts on the frames held back
    when a cut follows another within a window, and stops once its ratio for the latest cut is known.
    Isolated cuts and calm footage pay nothing for it.
    """

    def __init__(self, detector: SceneDetector, fps: float) -> None:
        self.fps = fps
        self.half_window = max(2, round(STORM_WINDOW_S * fps / 2))  # frames each side of a cut
        # AdaptiveDetector is its own re-check; any other detector gets one beside it.
        self.self_checked = isinstance(detector, AdaptiveDetector)
        recheck_delay = 0 if self.self_checked else ADAPTIVE_WINDOW
        # A cut is decided once the frames up to half_window after it are in and reported on.
        self.delay_frames = self.half_window + max(detector.event_buffer_length, recheck_delay)
        # The re-check's ratio at frame f needs frames f - ADAPTIVE_WINDOW - 1 to f + ADAPTIVE_WINDOW,
        # and it starts when the next cut comes, up to 2 * half_window later.
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=2 * self.half_window + ADAPTIVE_WINDOW + 2)
        self._adaptive: AdaptiveDetector | None = None
        self._last_cut = -1
        self._cuts: set[int] = set()  # frames the detector cut at (recent ones)
        self._confirmed: set[int] = set()  # frames the re-check cut at
        self._pending: list[int] = []  # cuts not yet decided, ascending
        self.storms: list[CutStorm] = []

    def push(self, index: int, bgr: np.ndarray, cuts: list[int], time_of: Callable[[int], float]) -> list[int]:
        """Frame `index` and the cut frames the detector reported with it; returns decided cuts to keep."""
        self._recent.append((index, bgr))
        previous = self._last_cut
        self._add(cuts)
        self._recheck(index, cuts, previous)
        return self._decide(index, time_of, final=False)

    def finish(self, last_index: int, cuts: list[int], time_of: Callable[[int], float]) -> list[int]:
        """The source ended at frame `last_index`: decide every cut still held."""
        self._add(cuts)
        if self.self_checked:
            self._confirmed.update(cuts)
        return self._decide(last_index, time_of, final=True)

    def _add(self, cuts: list[int]) -> None:
        for frame in cuts:
            self._cuts.add(frame)
            bisect.insort(self._pending, frame)
            self._last_cut = max(self._last_cut, frame)

    def _recheck(self, index: int, cuts: list[int], previous: int) -> None:
        if self.self_checked:
            self._confirmed.update(cuts)
            return
        if self._adaptive is None:
            # A cut in a storm has another within half_window: start when one follows another closely.
            close = [f for f in (*cuts, previous) if 0 <= self._last_cut - f <= 2 * self.half_window]
            if not cuts or len(close) < 2:
                return
            self._adaptive = AdaptiveDetector(min_scene_len=1, window_width=ADAPTIVE_WINDOW)
            frames = [(i, bgr) for i, bgr in self._recent if i >= min(close) - ADAPTIVE_WINDOW - 1]
        else:
            frames = [self._recent[-1]]
        for i, bgr in frames:
            found = self._adaptive.process_frame(FrameTimecode(i, fps=self.fps), bgr)
            self._confirmed.update(cut.frame_num for cut in found)
        if index >= self._last_cut + ADAPTIVE_WINDOW:  # the latest cut's ratio is known
            self._adaptive = None

    def _decide(self, index: int, time_of: Callable[[int], float], final: bool) -> list[int]:
        kept = []
        while self._pending and (final or self._pending[0] + self.delay_frames <= index):
            frame = self._pending.pop(0)
            if self._keep(frame, index, time_of):
                kept.append(frame)
        if len(self._cuts) > 8 * self.half_window:  # forget what no window reaches any more
            oldest = index - self.delay_frames - 2 * self.half_window - 1
            self._cuts = {f for f in self._cuts if f >= oldest}
            self._confirmed = {f for f in self._confirmed if f >= oldest}
        return kept

    def _keep(self, frame: int, last_index: int, time_of: Callable[[int], float]) -> bool:
        """Whether the cut at `frame` stands: rules 1-3 of the class docstring."""
        half = self.half_window
        window = range(max(0, frame - half), min(last_index, frame + half) + 1)
        needed = STORM_FRACTION * len(window)
        if sum(f in self._cuts for f in window) < needed:
            return True  # 1. not in a storm
        before, after = range(frame - half, frame), range(frame + 1, frame + half + 1)
        # 2. An edge of the storm: calm frames on one side, so the content changes character here (a
        # real cut into or out of it, or where the fast change starts). The storm then gets a scene of
        # its own and no clip mixes it with what is around it. Not within a window of the source's
        # start or end, where the piece on the calm side could never be a clip anyway.
        edge = (before.start >= 1 and not any(f in self._cuts for f in before)) or (
            after.stop - 1 <= last_index and not any(f in self._cuts for f in after)
        )
        # 3. Inside the storm: a cut the AdaptiveDetector re-check confirms, unless the re-check storms too.
        confirmed_nearby = sum(f in self._cuts and f in self._confirmed for f in window)
        confirmed = frame in self._confirmed and confirmed_nearby < needed
        self._note_storm(frame, edge, confirmed, time_of)
        return edge or confirmed

    def _note_storm(self, frame: int, edge: bool, confirmed: bool, time_of: Callable[[int], float]) -> None:
        storm = self.storms[-1] if self.storms else None
        if storm is None or frame - storm.last_frame > 2 * self.half_window:
            storm = CutStorm(time_of(frame), time_of(frame), frame, frame)
            self.storms.append(storm)
        else:
            storm.fired += sum(f in self._cuts for f in range(storm.last_frame + 1, frame + 1))
            storm.last_frame, storm.end_s = frame, time_of(frame)
        storm.confirmed += confirmed and not edge


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
