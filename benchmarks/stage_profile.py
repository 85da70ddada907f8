"""Where the ingest stage code's CPU goes, per component, and what cheaper variants would change (issue #15).

    python benchmarks/stage_profile.py                       # 60 s synthetic 640x360 and 960x540 (cached, as benchmarks/ingest.py draws them)
    python benchmarks/stage_profile.py FILE [FILE ...]       # any video files
    python benchmarks/stage_profile.py --sections paired --repeat 7          # x of the recommended variants, directly
    python benchmarks/stage_profile.py --sections encoder-sweep --sweep-crfs 17,18,19,20
    python benchmarks/stage_profile.py --sections none --suites              # cut/clip equivalence on the footage suites
    python benchmarks/stage_profile.py --cprofile /tmp/stage.prof            # also a cProfile (CPU clock) of one stage run

One process, CPU seconds (`time.process_time`: all threads of this process). The 2 CPUs here are shared
with other jobs that inflate any run by up to ~50%, so every comparison alternates its variants round-robin
over `--repeat` rounds and keeps the least disturbed cost of each piece of identical work:
  segment-min   whole runs: CPU clock marks every 30 decoded frames; sum over segments of each one's fastest run
  per-call-min  the instrumented breakdown: each component call's fastest run, summed
  per-clip-min  encoder tables: each clip's fastest encode, summed
The stage runs with the benchmark's settings (benchmarks/ingest.py INGEST_SETTINGS: caption.backend=none,
filters.mode=score, so every clip is encoded). x = (a) decode CPU / (probe + stage CPU), as benchmarks/ingest.py
row (e) against row (a) (there: 2 worker processes at once; here: one, so x here is not that table's x).

Sections (--sections, comma-separated):
  decode         (a) PyAV decode of every frame as benchmarks/ingest.py (a) does it (PyAV's default threading),
                 (a') as the pipeline does (pipelines.decode.iter_frames: 1 slice thread)
  stage          probe_source + SourceProcessor(row), as benchmarks/ingest.py (e) runs it, and x
  breakdown      the instrumented stage: exclusive CPU per component (decode, detect/clip frame conversion with
                 each swscale call split out, ContentDetector, tracker bookkeeping, clip assembly, filters,
                 phash, RGB->I420, x264 per frame, per-clip encoder overhead, thumbnail, the per-frame rest)
  prototypes     the instrumented stage with one change at a time (monkeypatched here; no pipeline file is
                 edited): the saving in the components it changes (the others do identical work, so their
                 differences are noise), and whether cut times, kept clips, scores, phashes and MP4 bytes stay
                 identical (when MP4 bytes differ: clip PSNR); then x projected from the stage row
  paired         (a) and whole uninstrumented stage runs of baseline and --paired variants alternated: x directly
  encoder        the kept clips' frames (captured from the stage) encoded as pipelines.transcode does (cv2 I420,
                 1 thread, the pipeline's x264-params, faststart) with other presets / tunes / params / crfs:
                 CPU s, bytes, PSNR. PSNR reference: the I420 frames the encoder is given (cv2 RGB->I420 of the
                 clip frames), i.e. exactly what a lossless encode decodes to (the `qp 0` row checks that: inf).
                 Y = luma PSNR, avg = PSNR of the MSE over all Y, U and V samples (x264's "Avg" weighting), both
                 from the MSE pooled over every frame of every clip; worst = the lowest per-clip Y PSNR.
                 `veryslow crf 20` is the slow reference encode.
  encoder-sweep  SWEEP_CANDIDATES x --sweep-crfs, and each candidate's CPU and bytes interpolated to the
                 current encode's PSNR Y (quality per CPU at equal quality)
  --suites       the output-changing prototypes on infra.footage's standard, storm and demo suites and --many
                 cached short files: files whose cut times / kept clips / all rows stay identical

Prints markdown tables; writes JSON (--json).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import math
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import av
import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from infra.config import load_config  # noqa: E402
from pipelines import decode as decode_mod  # noqa: E402
from pipelines import process as process_mod  # noqa: E402
from pipelines import scenes as scenes_mod  # noqa: E402
from pipelines import transcode as transcode_mod  # noqa: E402
from pipelines.probe import probe_source  # noqa: E402
from pipelines.process import IngestSettings, SettlingSlots, SourceProcessor  # noqa: E402
from scenedetect import AdaptiveDetector, ContentDetector  # noqa: E402

INGEST_SETTINGS = ["caption.backend=none", "filters.mode=score"]  # = benchmarks/ingest.py INGEST_SETTINGS
cpu = time.process_time


# --- (a) decode --------------------------------------------------------------------------


# CPU clock marks every SEGMENT_FRAMES decoded frames. The same segment is the same work in every run
# (the stage is deterministic), so the sum over segments of each one's fastest run ("segment-min") finds
# the undisturbed cost even when other jobs on the shared CPUs disturb every whole run somewhere.
SEGMENT_FRAMES = 30


def segments(start: float, marks: list[float], end: float) -> list[float]:
    points = [start, *marks, end]
    return [b - a for a, b in zip(points, points[1:])]


def segment_min(runs: list[list[float]]) -> float:
    """Sum over segments of each segment's minimum over runs (min of totals if runs differ in segments)."""
    if len({len(r) for r in runs}) != 1:
        return min(sum(r) for r in runs)
    return float(np.min(np.array(runs), axis=0).sum())


def decode_default(path: str, marks: list[float] | None = None) -> int:
    """benchmarks/ingest.py (a): PyAV's defaults."""
    frames = 0
    with av.open(path) as container:
        for _ in container.decode(video=0):
            frames += 1
            if marks is not None and frames % SEGMENT_FRAMES == 0:
                marks.append(cpu())
    return frames


def decode_pipeline(path: str, marks: list[float] | None = None) -> int:
    """pipelines.decode.iter_frames: one slice thread, time from pts."""
    frames = 0
    with av.open(path, metadata_errors="ignore") as container:
        rate = container.streams.video[0].average_rate or 30
        for _ in decode_mod.iter_frames(container, float(rate)):
            frames += 1
            if marks is not None and frames % SEGMENT_FRAMES == 0:
                marks.append(cpu())
    return frames


def timed_decode(function: Callable[..., int], path: str) -> tuple[float, list[float], int]:
    """(CPU s, segment CPU s, frames) of one decode."""
    gc.collect()
    marks: list[float] = []
    start = cpu()
    frames = function(path, marks)
    end = cpu()
    return end - start, segments(start, marks, end), frames


# --- the stage ---------------------------------------------------------------------------


def make_processor(overrides: tuple[str, ...] = ()) -> SourceProcessor:
    return SourceProcessor(IngestSettings.from_config(load_config(None, [*INGEST_SETTINGS, *overrides])))


class Capture:
    """Records what a stage run produced: cut times, and (optionally) the frames of each encoded clip."""

    def __init__(self, frames: bool = False) -> None:
        self.keep_frames = frames
        self.cuts: list[float] = []
        self.clip_frames: list[np.ndarray] = []
        self.marks: list[float] = []  # CPU clock every SEGMENT_FRAMES decoded frames

    @contextlib.contextmanager
    def active(self) -> Iterator["Capture"]:
        push, finish, encode = scenes_mod.CutTracker.push, scenes_mod.CutTracker.finish, process_mod.encode_mp4
        iter_frames = process_mod.iter_frames

        def iter_frames_(*args, **kwargs):
            for index, item in enumerate(iter_frames(*args, **kwargs), 1):
                if index % SEGMENT_FRAMES == 0:
                    self.marks.append(cpu())
                yield item

        def push_(tracker, time_s, bgr):
            cuts = push(tracker, time_s, bgr)
            self.cuts += cuts
            return cuts

        def finish_(tracker):
            cuts = finish(tracker)
            self.cuts += cuts
            return cuts

        def encode_(frames, *args, **kwargs):
            if self.keep_frames:
                self.clip_frames.append(frames.copy())
            return encode(frames, *args, **kwargs)

        with mock.patch.object(scenes_mod.CutTracker, "push", push_), mock.patch.object(scenes_mod.CutTracker, "finish", finish_), \
                mock.patch.object(process_mod, "encode_mp4", encode_), mock.patch.object(process_mod, "iter_frames", iter_frames_):  # fmt: skip
            yield self


def summarize(rows: list[dict]) -> list[tuple]:
    """What must not change: each row's id, status, reject stage, scores, phash and MP4 bytes (sha1)."""
    return [
        (
            row["id"], row["status"], row["reject_stage"], row["num_frames"], row["phash"],
            tuple(round(row[k], 6) if isinstance(row[k], float) else row[k] for k in sorted(row) if k.startswith("score_")),
            hashlib.sha1(row["mp4"]).hexdigest() if row["mp4"] else None,
        )  # fmt: skip
        for row in rows
    ]


def run_stage(processor: SourceProcessor, path: str, capture: Capture | None = None) -> tuple[float, float, list[dict], Capture, list[float]]:
    """(probe CPU s, processor CPU s, rows, capture, processor CPU s per segment) of one source."""
    capture = capture or Capture()
    gc.collect()
    start = cpu()
    row = probe_source(path)
    probe_s = cpu() - start
    with capture.active():
        start = cpu()
        rows = processor(row)
        end = cpu()
    return probe_s, end - start, rows, capture, segments(start, capture.marks, end)


# --- breakdown: exclusive CPU per component ------------------------------------------------


ROOT = "stage loop: rest (per-frame Python, generators, deque, row dicts)"


class Profiler:
    """Exclusive CPU seconds per named section, per call; sections nest (a parent's time excludes its children's).
    The root section (ROOT) is split at every decoded frame, so that it too is a list of comparable calls."""

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = defaultdict(list)
        self._stack: list[list] = []  # [name, start, children_s]

    def enter(self, name: str) -> None:
        self._stack.append([name, cpu(), 0.0])

    def leave(self) -> None:
        name, start, children = self._stack.pop()
        elapsed = cpu() - start
        self.durations[name].append(elapsed - children)
        if self._stack:
            self._stack[-1][2] += elapsed

    def split_root(self) -> None:
        if len(self._stack) == 1 and self._stack[0][0] == ROOT:
            self.leave()
            self.enter(ROOT)

    @property
    def exclusive(self) -> dict[str, float]:
        return {name: sum(values) for name, values in self.durations.items()}

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.leave()

        return timed

    def wrap_iter(self, name: str, function: Callable) -> Callable:
        """A generator function whose every next() is timed (and splits the root section)."""

        def timed(*args, **kwargs):
            iterator = iter(function(*args, **kwargs))
            while True:
                self.split_root()
                self.enter(name)
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.leave()
                yield item

        return timed


def per_call_min(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """Per section: the sum over its calls of each call's fastest run (the runs did the same work call by call:
    the stage is deterministic). Sections whose call counts differ between runs get their fastest total."""
    result = {}
    for name in runs[0]:
        lists = [run.get(name, []) for run in runs]
        if len({len(values) for values in lists}) == 1:
            result[name] = float(np.min(np.array(lists), axis=0).sum())
        else:
            result[name] = min(sum(values) for values in lists)
    return result


class _TimedReformatter:
    """Stands in for a FrameConverter's VideoReformatter (a C type whose methods cannot be patched)."""

    def __init__(self, profiler: Profiler, name: str, inner: Any) -> None:
        self.reformat = profiler.wrap(name, inner.reformat)


class _TimedCaptioner:
    def __init__(self, profiler: Profiler, inner: Any) -> None:
        self.model_name = inner.model_name
        self._call = profiler.wrap("caption (backend none)", inner)

    def __call__(self, request: Any) -> str:
        return self._call(request)


def _timed_mp4_encode(p: Profiler) -> Callable:
    """model.mp4._encode, the same steps, with each frame's encode (+ VideoFrame wrap + mux) its own section, so
    that the encoder gets one comparable call per clip frame; the per-clip part (open, x264 init, flush of the
    delayed frames, close) stays in "encode_mp4 rest"."""
    from fractions import Fraction

    def _encode(array, fps, target, encoder, options, to_yuv420, muxer_options):
        rate = Fraction(fps).limit_denominator(1001)
        with av.open(target, mode="w", format="mp4", options=muxer_options) as container:
            stream = container.add_stream(encoder, rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
            stream.codec_context.time_base = 1 / rate
            if "threads" in options:
                stream.codec_context.thread_count = int(options["threads"])
            for index, rgb in enumerate(array):
                p.enter("encode: x264 per frame (+ VideoFrame wrap, mux)")
                if to_yuv420 is None:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                else:
                    frame = av.VideoFrame.from_ndarray(to_yuv420(rgb), format="yuv420p")
                frame.pts = index
                container.mux(stream.encode(frame))
                p.leave()
            container.mux(stream.encode(None))

    return _encode


@contextlib.contextmanager
def instrumented(profiler: Profiler, processor: SourceProcessor) -> Iterator[None]:
    import model.mp4

    p = profiler
    converter_init = decode_mod.FrameConverter.__init__

    def init_(self, geometry):
        converter_init(self, geometry)
        self._detect_scale = _TimedReformatter(p, "convert detect: swscale scale", self._detect_scale)
        self._detect_rgb = _TimedReformatter(p, "convert detect: swscale to bgr24", self._detect_rgb)
        self._clip_scale = _TimedReformatter(p, "convert clip: swscale AREA scale", self._clip_scale)
        self._clip_rgb = _TimedReformatter(p, "convert clip: swscale to rgb24", self._clip_rgb)

    cls = decode_mod.FrameConverter
    patches = [
        (process_mod, "iter_frames", p.wrap_iter("decode (iter_frames)", process_mod.iter_frames)),
        (cls, "__init__", init_),
        (cls, "detect_frame", p.wrap("convert detect: to_ndarray + rest", cls.detect_frame)),
        (cls, "clip_frame", p.wrap("convert clip: to_ndarray, crop, copy", cls.clip_frame)),
        (scenes_mod.CutTracker, "push", p.wrap("scenes: CutTracker/StormCheck bookkeeping", scenes_mod.CutTracker.push)),
        (scenes_mod.CutTracker, "finish", p.wrap("scenes: CutTracker/StormCheck bookkeeping", scenes_mod.CutTracker.finish)),
        (scenes_mod, "FrameTimecode", p.wrap("scenes: FrameTimecode objects", scenes_mod.FrameTimecode)),
        (ContentDetector, "process_frame", p.wrap("scenes: ContentDetector.process_frame", ContentDetector.process_frame)),
        (ContentDetector, "post_process", p.wrap("scenes: ContentDetector.process_frame", ContentDetector.post_process)),
        (AdaptiveDetector, "process_frame", p.wrap("scenes: AdaptiveDetector storm re-check", AdaptiveDetector.process_frame)),
        *[(SettlingSlots, name, p.wrap("clips: slots + assembler (np.stack)", getattr(SettlingSlots, name))) for name in ("push", "settle", "cut", "finish")],
        (SourceProcessor, "_clip_row", p.wrap("clip row: rest (row dict, ClipPixels, judge)", SourceProcessor._clip_row)),
        (process_mod, "score_clip", p.wrap("filters: score_clip", process_mod.score_clip)),
        (process_mod, "perceptual_hash", p.wrap("filters: perceptual_hash", process_mod.perceptual_hash)),
        (process_mod, "encode_mp4", p.wrap("encode: per clip: open, x264 init, flush, faststart (encode_mp4 rest)", process_mod.encode_mp4)),
        (model.mp4, "_encode", _timed_mp4_encode(p)),
        (transcode_mod, "rgb_to_i420", p.wrap("encode: RGB->I420 (cv2)", transcode_mod.rgb_to_i420)),
        (process_mod, "jpeg_thumbnail", p.wrap("thumbnail (JPEG)", process_mod.jpeg_thumbnail)),
        (processor, "captioner", _TimedCaptioner(p, processor.captioner)),
    ]
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(mock.patch.object(target, name, value))
        yield


def instrumented_runs(path: str, variants: dict[str, Callable[[], contextlib.AbstractContextManager]], repeat: int) -> dict[str, dict]:
    """Each variant run `repeat` times, interleaved round-robin, instrumented. Per variant: `components` (CPU s per
    section, per-call-min over runs), `total_s` (their sum), `min_total_s` (fastest whole instrumented run), `outputs`
    (rows summary, cut times, the encoded clips' frames, rows) of the first run."""
    processor = make_processor()
    durations: dict[str, list[dict[str, list[float]]]] = defaultdict(list)
    totals: dict[str, list[float]] = defaultdict(list)
    outputs: dict[str, tuple] = {}
    for rep in range(repeat):
        for name, factory in variants.items():
            profiler = Profiler()
            row = probe_source(path)
            capture = Capture(frames=name not in outputs)
            with factory(), instrumented(profiler, processor), capture.active():
                gc.collect()
                start = cpu()
                profiler.enter(ROOT)
                rows = processor(row)
                profiler.leave()
                totals[name].append(cpu() - start)
            durations[name].append(dict(profiler.durations))
            if name not in outputs:
                outputs[name] = (summarize(rows), sorted(capture.cuts), capture.clip_frames, rows)
        print(f"  round {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    result = {}
    for name in variants:
        components = per_call_min(durations[name])
        calls = {k: len(v) for k, v in durations[name][0].items()}
        result[name] = {"components": components, "calls": calls, "total_s": sum(components.values()),
                        "min_total_s": min(totals[name]), "totals": totals[name], "outputs": outputs[name]}  # fmt: skip
    return result


def cprofile_stage(processor: SourceProcessor, path: str, out: Path) -> str:
    row = probe_source(path)
    profile = cProfile.Profile(cpu)
    profile.enable()
    processor(row)
    profile.disable()
    profile.dump_stats(str(out))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


# --- encoder settings ----------------------------------------------------------------------


_PIPELINE_ENCODER_OPTIONS = transcode_mod.encoder_options  # kept: proto_x264 patches the module's


def x264_options(preset: str, crf: int | None, tune: str | None = None, params: str = "", qp: int | None = None) -> dict[str, str]:
    """pipelines.transcode.encoder_options for libx264 (whatever x264-params the pipeline sets now), with this
    preset and crf (or qp), a tune, and extra x264-params after the pipeline's (a later key wins in x264)."""
    options = dict(_PIPELINE_ENCODER_OPTIONS("libx264", 20 if crf is None else crf, preset))
    if qp is not None:
        options.pop("crf", None)
        options["qp"] = str(qp)
    if tune:
        options["tune"] = tune
    options["x264-params"] = ":".join(filter(None, [options.get("x264-params", ""), params]))
    return options


def encode_clip(frames: np.ndarray, fps: float, options: dict[str, str]) -> bytes:
    """As pipelines.transcode.encode_mp4 does it (cv2 I420, faststart), with these encoder options."""
    from model.mp4 import write_mp4

    return write_mp4(frames, fps, encoder="libx264", options=options, faststart=True, to_yuv420=transcode_mod.rgb_to_i420)


def decode_i420(mp4: bytes) -> np.ndarray:
    """(T, H * 3 / 2, W) uint8 I420 planes of every frame."""
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="yuv420p") for frame in container.decode(video=0)])


def reference_i420(frames: np.ndarray) -> np.ndarray:
    return np.stack([transcode_mod.rgb_to_i420(frame) for frame in frames])


def plane_sse(reference: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(sum of squared errors of Y, U, V as (3,) float64, Y samples, chroma samples per plane)."""
    if reference.shape != decoded.shape:
        raise ValueError(f"decoded {decoded.shape} != reference {reference.shape}")
    height = reference.shape[1] * 2 // 3
    quarter = height // 4
    diff = reference.astype(np.int32) - decoded.astype(np.int32)
    squared = diff * diff
    y = squared[:, :height].sum(dtype=np.float64)
    u = squared[:, height : height + quarter].sum(dtype=np.float64)
    v = squared[:, height + quarter :].sum(dtype=np.float64)
    return np.array([y, u, v]), squared[:, :height].size, squared[:, height : height + quarter].size


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def clip_quality(references: list[np.ndarray], mp4s: list[bytes]) -> dict:
    """Pooled Y and avg PSNR over all clips, and the worst clip's Y PSNR."""
    total, y_count, c_count, worst = np.zeros(3), 0, 0, math.inf
    for reference, mp4 in zip(references, mp4s):
        sse, ys, cs = plane_sse(reference, decode_i420(mp4))
        total += sse
        y_count += ys
        c_count += cs
        worst = min(worst, psnr(sse[0] / ys))
    return {
        "psnr_y": psnr(total[0] / y_count),
        "psnr_u": psnr(total[1] / c_count),
        "psnr_v": psnr(total[2] / c_count),
        "psnr_avg": psnr(total.sum() / (y_count + 2 * c_count)),
        "psnr_y_worst_clip": worst,
    }


# (label, preset, crf, tune, extra x264-params, qp)
ENCODER_CONFIGS: list[tuple[str, str, int | None, str | None, str, int | None]] = [
    ("veryslow crf 20 (slow reference encode)", "veryslow", 20, None, "", None),
    ("ultrafast qp 0 (lossless check)", "ultrafast", None, None, "", 0),
    ("ultrafast crf 20", "ultrafast", 20, None, "", None),
    ("superfast crf 20 (current)", "superfast", 20, None, "", None),
    ("veryfast crf 20", "veryfast", 20, None, "", None),
    ("faster crf 20", "faster", 20, None, "", None),
    ("superfast crf 20 tune fastdecode", "superfast", 20, "fastdecode", "", None),
    ("superfast crf 20 tune zerolatency", "superfast", 20, "zerolatency", "", None),
    ("veryfast crf 20 tune zerolatency", "veryfast", 20, "zerolatency", "", None),
    ("superfast crf 20 bframes=0", "superfast", 20, None, "bframes=0", None),
    ("superfast crf 20 aq-mode=0", "superfast", 20, None, "aq-mode=0", None),
    ("superfast crf 20 weightp=0", "superfast", 20, None, "weightp=0", None),
    ("superfast crf 20 partitions=none", "superfast", 20, None, "partitions=none", None),
    ("superfast crf 20 subme=0", "superfast", 20, None, "subme=0", None),
    ("superfast crf 20 no-8x8dct", "superfast", 20, None, "8x8dct=0", None),
    ("superfast crf 20 no-deblock", "superfast", 20, None, "no-deblock=1", None),
    ("superfast crf 20 rc-lookahead=0 b-adapt=0 scenecut=0", "superfast", 20, None, "b-adapt=0:scenecut=0", None),
    ("ultrafast crf 18", "ultrafast", 18, None, "", None),
    ("ultrafast crf 22", "ultrafast", 22, None, "", None),
    ("ultrafast+cabac crf 20 (cabac=1)", "ultrafast", 20, None, "cabac=1", None),
    ("ultrafast+cabac+deblock crf 20", "ultrafast", 20, None, "cabac=1:deblock=1", None),
    ("ultrafast+cabac+deblock+bframes=3 crf 17", "ultrafast", 17, None, "cabac=1:deblock=1:bframes=3", None),
    ("ultrafast+cabac+deblock+bframes=3 crf 18 (recommended)", "ultrafast", 18, None, "cabac=1:deblock=1:bframes=3", None),
    ("ultrafast+cabac+deblock+bframes=3 crf 19", "ultrafast", 19, None, "cabac=1:deblock=1:bframes=3", None),
    ("superfast crf 19", "superfast", 19, None, "", None),
    ("superfast crf 21", "superfast", 21, None, "", None),
    ("veryfast crf 21", "veryfast", 21, None, "", None),
    ("veryfast crf 22", "veryfast", 22, None, "", None),
]


# Candidates swept over crf, to compare CPU and bytes at the current encode's PSNR (x264-params on top of mbtree=0).
SWEEP_CANDIDATES: list[tuple[str, str, str | None, str]] = [
    ("superfast (current)", "superfast", None, ""),
    ("superfast partitions=none", "superfast", None, "partitions=none"),
    ("superfast 8x8dct=0", "superfast", None, "8x8dct=0"),
    ("superfast weightp=0:scenecut=0:b-adapt=0", "superfast", None, "weightp=0:scenecut=0:b-adapt=0"),
    ("superfast partitions=none:weightp=0:scenecut=0:b-adapt=0", "superfast", None, "partitions=none:weightp=0:scenecut=0:b-adapt=0"),
    ("superfast 8x8dct=0:weightp=0:scenecut=0:b-adapt=0", "superfast", None, "8x8dct=0:weightp=0:scenecut=0:b-adapt=0"),
    ("superfast aq-mode=0", "superfast", None, "aq-mode=0"),
    ("ultrafast", "ultrafast", None, ""),
    ("ultrafast cabac=1:deblock=1", "ultrafast", None, "cabac=1:deblock=1"),
    ("ultrafast cabac=1:deblock=1:bframes=3", "ultrafast", None, "cabac=1:deblock=1:bframes=3"),
    ("veryfast", "veryfast", None, ""),
]
SWEEP_CRFS = (18, 19, 20, 21, 22)  # --sweep-crfs


def encoder_sweep(clips: list[np.ndarray], fps: float, repeat: int, target_psnr_y: float | None = None, crfs=SWEEP_CRFS,
                  candidates: list[tuple[str, str, str | None, str]] | None = None) -> dict:
    """Each candidate at SWEEP_CRFS; then, by linear interpolation between the two crfs around it, CPU s and
    bytes at `target_psnr_y` (default: the current encode's PSNR Y at crf 20)."""
    candidates = candidates or SWEEP_CANDIDATES
    configs = [(f"{name} crf {crf}", preset, crf, tune, params, None) for name, preset, tune, params in candidates for crf in crfs]
    if target_psnr_y is None and not any(name == "superfast (current)" and 20 in crfs for name, *_ in candidates):
        configs.append(("superfast (current) crf 20", "superfast", 20, None, "", None))
    rows = encoder_table(clips, fps, repeat, configs)
    if target_psnr_y is None:
        target_psnr_y = next(r["psnr_y"] for r in rows if r["config"] == "superfast (current) crf 20")
    matched = []
    for name, *_ in candidates:
        points = sorted(((r["psnr_y"], r["cpu_s"], r["bytes"], r["psnr_avg"]) for r in rows if r["config"].startswith(name + " crf")), key=lambda p: p[0])
        at = None
        for lo, hi in zip(points, points[1:]):
            if lo[0] <= target_psnr_y <= hi[0] and hi[0] > lo[0]:
                w = (target_psnr_y - lo[0]) / (hi[0] - lo[0])
                at = {"cpu_s": lo[1] + w * (hi[1] - lo[1]), "bytes": math.exp(math.log(lo[2]) + w * (math.log(hi[2]) - math.log(lo[2]))),
                      "psnr_avg": lo[3] + w * (hi[3] - lo[3])}  # fmt: skip
        matched.append({"candidate": name, "at_target": at})
    return {"target_psnr_y": target_psnr_y, "rows": rows, "matched": matched}


def encoder_table(clips: list[np.ndarray], fps: float, repeat: int, configs=ENCODER_CONFIGS) -> list[dict]:
    """One row per config; repeats interleaved round-robin over the configs (load changes hit all alike); CPU s =
    the sum over clips of each clip's minimum."""
    references = [reference_i420(frames) for frames in clips]
    frames_total = sum(len(c) for c in clips)
    cpu_runs: dict[str, list[float]] = defaultdict(list)
    outputs: dict[str, list[bytes]] = {}
    for rep in range(repeat):
        for label, preset, crf, tune, params, qp in configs:
            if rep and preset in ("veryslow", "slower", "slow"):
                continue  # once is enough for the slow reference
            options = x264_options(preset, crf, tune, params, qp)
            gc.collect()
            mp4s, times = [], []
            for frames in clips:
                start = cpu()
                mp4s.append(encode_clip(frames, fps, options))
                times.append(cpu() - start)
            outputs[label] = mp4s
            cpu_runs[label].append(times)
    rows = []
    for label, preset, crf, tune, params, qp in configs:
        # Sum over clips of each clip's fastest run: contention comes in bursts of seconds, so per-clip minima
        # (~0.1 s each) find undisturbed runs far more often than whole-set minima do.
        best = float(np.min(np.array(cpu_runs[label]), axis=0).sum())
        cpu_runs[label] = [sum(times) for times in cpu_runs[label]]
        mp4s = outputs[label]
        row = {"config": label, "options": x264_options(preset, crf, tune, params, qp), "cpu_s": best, "cpu_runs": cpu_runs[label],
               "cpu_ms_per_frame": 1000 * best / frames_total, "bytes": sum(len(m) for m in mp4s), **clip_quality(references, mp4s)}  # fmt: skip
        rows.append(row)
        print(f"  {label}: {best:.2f} CPU s, {row['bytes']} B, Y {row['psnr_y']:.2f} dB", file=sys.stderr, flush=True)
    return rows


# --- prototypes (one change each, monkeypatched) ------------------------------------------


def proto_detect_one_step() -> contextlib.AbstractContextManager:
    """Detect frame in one swscale call (scale + BGR24 together) instead of two."""

    def detect_frame(self, frame):
        width, height = self.geometry.detect_size
        return self._detect_scale.reformat(frame, width, height, format="bgr24", interpolation="FAST_BILINEAR", threads=1).to_ndarray()

    return mock.patch.object(decode_mod.FrameConverter, "detect_frame", detect_frame)


def _shared_small(self, frame):
    """The clip-size YUV frame (AREA, as clip_frame makes it), once per decoded frame."""
    if getattr(self, "_small_for", None) is not frame:
        width, height = self.geometry.resize_size
        self._small = self._clip_scale.reformat(frame, width, height, interpolation="AREA", threads=1)
        self._small_for = frame
    return self._small


def proto_detect_from_clip_scale() -> contextlib.ExitStack:
    """Detection on frames already downscaled for the clips: every decoded frame is AREA-scaled once to
    the clip resize size (YUV); the detect frame is FAST_BILINEAR from that, the clip frame its RGB crop."""
    cls = decode_mod.FrameConverter
    original_clip = cls.clip_frame

    def detect_frame(self, frame):
        small = _shared_small(self, frame)
        width, height = self.geometry.detect_size
        if (small.width, small.height) != (width, height):
            small = self._detect_scale.reformat(small, width, height, interpolation="FAST_BILINEAR", threads=1)
        return self._detect_rgb.reformat(small, format="bgr24", threads=1).to_ndarray()

    def clip_frame(self, frame):
        small = _shared_small(self, frame)
        geometry = self.geometry
        rgb = self._clip_rgb.reformat(small, format="rgb24", threads=1).to_ndarray()
        if geometry.rotation:
            rgb = np.rot90(rgb, k=geometry.rotation // 90)
        top = (rgb.shape[0] - geometry.clip_height) // 2
        left = (rgb.shape[1] - geometry.clip_width) // 2
        return np.ascontiguousarray(rgb[top : top + geometry.clip_height, left : left + geometry.clip_width])

    assert original_clip  # the original is replaced for the duration of the context
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(cls, "detect_frame", detect_frame))
    stack.enter_context(mock.patch.object(cls, "clip_frame", clip_frame))
    return stack


def proto_detect_width(width: int) -> Callable[[], contextlib.AbstractContextManager]:
    """scenes.detect_width smaller than the default 160 (a config change)."""

    def detect_size(self):
        if self.source_width <= width:
            return self.source_width, self.source_height
        return width, max(1, round(self.source_height * width / self.source_width))

    return lambda: mock.patch.object(decode_mod.FrameGeometry, "detect_size", property(detect_size))


class FastContentDetector(ContentDetector):
    """ContentDetector with the same score computed by fewer, bigger cv2 calls: one |HSV - last HSV|
    (cv2.absdiff, exact for uint8) summed per channel (cv2.sumElems: float64, exact for integer sums
    under 2**53) instead of cv2.split + three int32 numpy round trips. Edges off (weights 0, no stats),
    as in the pipeline. Same floats in the same order, so the same cuts."""

    def _calculate_frame_score(self, timecode, frame_img):
        assert self._weights.delta_edges == 0.0 and self.stats_manager is None
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        last, self._last_hsv = getattr(self, "_last_hsv", None), hsv
        if last is None:
            return 0.0
        sums = cv2.sumElems(cv2.absdiff(hsv, last))  # (hue, sat, lum, 0)
        num_pixels = float(hsv.shape[0] * hsv.shape[1])
        components = ContentDetector.Components(delta_hue=sums[0] / num_pixels, delta_sat=sums[1] / num_pixels,
                                                delta_lum=sums[2] / num_pixels, delta_edges=0.0)  # fmt: skip
        return sum(c * w for c, w in zip(components, self._weights, strict=True)) / sum(abs(w) for w in self._weights)


def proto_fast_content() -> contextlib.AbstractContextManager:
    detectors = dict(scenes_mod.DETECTORS)
    detectors["content"] = (FastContentDetector, "threshold")
    return mock.patch.object(scenes_mod, "DETECTORS", detectors)


def proto_clip_one_step() -> contextlib.AbstractContextManager:
    """Clip frame in one swscale call (AREA scale + RGB24 together)."""

    def clip_frame(self, frame):
        geometry = self.geometry
        width, height = geometry.resize_size
        rgb = self._clip_scale.reformat(frame, width, height, format="rgb24", interpolation="AREA", threads=1).to_ndarray()
        if geometry.rotation:
            rgb = np.rot90(rgb, k=geometry.rotation // 90)
        top = (rgb.shape[0] - geometry.clip_height) // 2
        left = (rgb.shape[1] - geometry.clip_width) // 2
        return np.ascontiguousarray(rgb[top : top + geometry.clip_height, left : left + geometry.clip_width])

    return mock.patch.object(decode_mod.FrameConverter, "clip_frame", clip_frame)


def _gray_small_batched(self) -> np.ndarray:
    """filters.ClipPixels.gray_small with one cv2.resize and one cvtColor for the whole clip: the frames
    stacked as one tall image. With an integer area factor (256 -> 64: 4x4 blocks) no block crosses a
    frame boundary, so every small pixel is the same average as per frame; otherwise the original."""
    from pipelines import filters

    t, h, w, _ = self.rgb.shape
    width = min(filters.SMALL_WIDTH, w)
    height = max(1, round(h * width / w))
    if w % width or h % height or w // width != h // height:
        return _original_gray_small(self)
    tall = cv2.resize(self.rgb.reshape(t * h, w, 3), (width, t * height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(tall, cv2.COLOR_RGB2GRAY).reshape(t, height, width).astype(np.float32)


def _original_gray_small(self) -> np.ndarray:
    from pipelines import filters

    return filters.ClipPixels.__dict__["gray_small"].func(self)


def proto_gray_small_batched() -> contextlib.AbstractContextManager:
    import functools

    from pipelines import filters

    prop = functools.cached_property(_gray_small_batched)
    prop.__set_name__(filters.ClipPixels, "gray_small")
    original = filters.ClipPixels.__dict__["gray_small"]
    globals()["_original_gray_small"] = lambda self: original.func(self)
    return mock.patch.object(filters.ClipPixels, "gray_small", prop)


def proto_x264(preset: str, tune: str | None = None, params: str = "", crf_delta: int = 0) -> Callable[[], contextlib.AbstractContextManager]:
    original = transcode_mod.encoder_options

    def options(encoder, crf, _preset):
        if encoder != "libx264":
            return original(encoder, crf, _preset)
        return x264_options(preset, crf + crf_delta, tune, params)

    return lambda: mock.patch.object(transcode_mod, "encoder_options", options)


def combine(*factories: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], contextlib.ExitStack]:
    def make():
        stack = contextlib.ExitStack()
        for factory in factories:
            stack.enter_context(factory())
        return stack

    return make


SAME_OUTPUT = (proto_fast_content, proto_gray_small_batched)
RECOMMENDED = "recommended: fast ContentDetector + x264 ultrafast cabac=1:deblock=1:bframes=3 crf 18"
DETECT, CLIP, SCENES, FILTERS_, ENCODE = ("convert detect",), ("convert clip",), ("scenes:",), ("filters:",), ("encode:",)
# name -> (patch factory, the component name prefixes it changes: its saving is counted over those only, since the
# other components do the same work as in the baseline and differ only by measurement noise)
PROTOTYPES: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], tuple[str, ...]]] = {
    "baseline": (contextlib.nullcontext, ()),
    "detect frame: one swscale call (scale+bgr24)": (proto_detect_one_step, DETECT),
    "detect from the clip-size AREA frame (decoder-downscaled lead)": (proto_detect_from_clip_scale, DETECT + CLIP),
    "ContentDetector: same score via cv2.absdiff+sumElems": (proto_fast_content, SCENES),
    "scenes.detect_width 128": (proto_detect_width(128), DETECT + SCENES),
    "scenes.detect_width 96": (proto_detect_width(96), DETECT + SCENES),
    "filters: gray_small as one tall-image resize": (proto_gray_small_batched, FILTERS_),
    "clip frame: one swscale call (AREA+rgb24)": (proto_clip_one_step, CLIP),
    "x264 superfast weightp=0:scenecut=0:b-adapt=0 crf 20": (proto_x264("superfast", params="weightp=0:scenecut=0:b-adapt=0"), ENCODE),
    "x264 ultrafast crf 20": (proto_x264("ultrafast"), ENCODE),
    "x264 ultrafast crf 19": (proto_x264("ultrafast", crf_delta=-1), ENCODE),
    "x264 ultrafast cabac=1:deblock=1 crf 19": (proto_x264("ultrafast", params="cabac=1:deblock=1", crf_delta=-1), ENCODE),
    "x264 ultrafast cabac=1:deblock=1:bframes=3 crf 18": (proto_x264("ultrafast", params="cabac=1:deblock=1:bframes=3", crf_delta=-2), ENCODE),
    RECOMMENDED: (combine(proto_fast_content, proto_x264("ultrafast", params="cabac=1:deblock=1:bframes=3", crf_delta=-2)), SCENES + ENCODE),
    RECOMMENDED + " + detect_width 128": (combine(proto_fast_content, proto_x264("ultrafast", params="cabac=1:deblock=1:bframes=3", crf_delta=-2),
                                                  proto_detect_width(128)), SCENES + ENCODE + DETECT),
    "same-output pair (fast ContentDetector + batched gray_small)": (combine(*SAME_OUTPUT), SCENES + FILTERS_),
    "same-output pair + detect_width 128": (combine(*SAME_OUTPUT, proto_detect_width(128)), SCENES + FILTERS_ + DETECT),
    "same-output pair + detect from the clip-size AREA frame": (combine(*SAME_OUTPUT, proto_detect_from_clip_scale), SCENES + FILTERS_ + DETECT + CLIP),
    "same-output pair + x264 superfast weightp=0:scenecut=0:b-adapt=0": (combine(*SAME_OUTPUT, proto_x264("superfast", params="weightp=0:scenecut=0:b-adapt=0")), SCENES + FILTERS_ + ENCODE),
    "same-output pair + x264 ultrafast crf 19": (combine(*SAME_OUTPUT, proto_x264("ultrafast", crf_delta=-1)), SCENES + FILTERS_ + ENCODE),
    "same-output pair + x264 ultrafast cabac=1:deblock=1 crf 19": (combine(*SAME_OUTPUT, proto_x264("ultrafast", params="cabac=1:deblock=1", crf_delta=-1)), SCENES + FILTERS_ + ENCODE),
}


def run_prototypes(path: str, repeat: int, names: list[str]) -> list[dict]:
    runs = instrumented_runs(path, {name: PROTOTYPES[name][0] for name in names}, repeat)
    base = runs["baseline"]
    base_summary, base_cuts, base_frames, base_rows = base["outputs"]
    base_refs = [reference_i420(frames) for frames in base_frames]
    base_mp4 = [row["mp4"] for row in base_rows if row["mp4"]]
    results: list[dict] = [{"baseline_quality": clip_quality(base_refs, base_mp4), "baseline_bytes": sum(len(m) for m in base_mp4),
                            "baseline_components": base["components"], "baseline_calls": base["calls"]}]  # fmt: skip
    for name in names:
        run = runs[name]
        summary, cuts, clip_frames, rows = run["outputs"]
        kept = [s[0] for s in summary if s[1] == "kept"]
        same_mp4 = [s[-1] for s in summary] == [s[-1] for s in base_summary]
        deltas = {k: run["components"].get(k, 0.0) - base["components"].get(k, 0.0) for k in set(run["components"]) | set(base["components"])}
        affected = PROTOTYPES[name][1]
        saving = -sum(v for k, v in deltas.items() if k.startswith(affected)) if affected else 0.0
        result = {"prototype": name, "affected": affected, "saving_affected_s": saving,
                  "saving_affected_pct": 100 * saving / base["total_s"], "cpu_s": run["total_s"], "min_total_s": run["min_total_s"], "totals": run["totals"],
                  "saving_s": base["total_s"] - run["total_s"], "saving_pct": 100 * (base["total_s"] - run["total_s"]) / base["total_s"],
                  "component_deltas_s": dict(sorted(deltas.items(), key=lambda kv: kv[1])),
                  "cuts_identical": cuts == base_cuts, "cuts": len(cuts), "cut_diff": sorted(set(cuts) ^ set(base_cuts))[:10],
                  "kept_identical": kept == [s[0] for s in base_summary if s[1] == "kept"], "kept": len(kept),
                  "scores_phash_identical": [s[:-1] for s in summary] == [s[:-1] for s in base_summary], "mp4_identical": same_mp4}  # fmt: skip
        if not same_mp4 and result["kept_identical"]:
            mp4s = [row["mp4"] for row in rows if row["mp4"]]
            # Against this variant's own encoder input, and against the baseline's clip frames (content change).
            result["quality_vs_own_input"] = clip_quality([reference_i420(f) for f in clip_frames], mp4s)
            result["quality_vs_baseline_input"] = clip_quality(base_refs, mp4s)
            result["bytes"] = sum(len(m) for m in mp4s)
        results.append(result)
    for run in runs.values():
        run.pop("outputs")
    return results, runs


# --- equivalence on the footage suites -----------------------------------------------------


SUITES_DIR = Path.home() / ".cache" / "reelforge" / "bench" / "suites"
# The prototypes that may move cuts or change kept clips, checked file by file (the x264 ones change MP4 bytes only).
SUITE_PROTOTYPES = [
    "detect frame: one swscale call (scale+bgr24)",
    "detect from the clip-size AREA frame (decoder-downscaled lead)",
    "ContentDetector: same score via cv2.absdiff+sumElems",
    "scenes.detect_width 128",
    "scenes.detect_width 96",
    "filters: gray_small as one tall-image resize",
]


def suite_files(many: int) -> list[str]:
    """infra.footage's standard, storm and demo suites (encoded once into SUITES_DIR) and `many` of the cached
    --many files of benchmarks/ingest.py (mixed codecs and sizes), if present."""
    from infra.footage.suites import demo_specs, standard_specs, storm_specs

    paths = []
    for name, specs in (("standard", standard_specs()), ("storm", storm_specs()), ("demo", demo_specs())):
        folder = SUITES_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            path = folder / spec.filename
            if not path.exists():
                from infra.footage import write_video

                write_video(spec, path)
            paths.append(str(path))
    many_dir = SUITES_DIR.parent / "many"
    if many and many_dir.is_dir():
        candidates = sorted(many_dir.iterdir())
        paths += [str(p) for p in candidates[:: max(1, len(candidates) // many)][:many]]
    return paths


def suite_check(paths: list[str], names: list[str]) -> list[dict]:
    """Per prototype: on how many files cut times, kept clips and all rows (scores, phash, MP4 bytes) equal the baseline's."""
    processor = make_processor()
    results = {name: {"prototype": name, "files": 0, "cuts_same": 0, "kept_same": 0, "rows_same": 0, "differ": []} for name in names}
    for path in paths:
        row = probe_source(path)
        if row.get("reject_stage"):
            continue
        outputs = {}
        for name in ["baseline", *names]:
            capture = Capture()
            with PROTOTYPES[name][0](), capture.active():
                rows = processor(dict(row))
            outputs[name] = (summarize(rows), sorted(capture.cuts))
        base_summary, base_cuts = outputs["baseline"]
        for name in names:
            summary, cuts = outputs[name]
            r = results[name]
            r["files"] += 1
            r["cuts_same"] += cuts == base_cuts
            r["kept_same"] += [s[0] for s in summary if s[1] == "kept"] == [s[0] for s in base_summary if s[1] == "kept"]
            r["rows_same"] += summary == base_summary
            if cuts != base_cuts or summary != base_summary:
                r["differ"].append({"file": Path(path).name, "cuts": cuts, "baseline_cuts": base_cuts})
    return list(results.values())


# --- report --------------------------------------------------------------------------------


def fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def profile_file(path: str, args: argparse.Namespace) -> dict:
    with av.open(path) as container:
        stream = container.streams.video[0]
        info = {"file": path, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "seconds": float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6,
                "frames": stream.frames}  # fmt: skip
    label = f"{Path(path).name} ({info['width']}x{info['height']}, {info['seconds']:.0f} s)"
    print(f"\n## {label}\n", flush=True)
    result: dict[str, Any] = {"info": info}
    sections = set(args.sections.split(","))
    repeat = args.repeat

    processor = make_processor()
    decode_pipeline(path)  # warm caches (file pages, codec init)

    if "decode" in sections or "stage" in sections:
        # (a), (a') and the stage alternated in each repeat, so that load changes hit all of them alike.
        runs: dict[str, list] = defaultdict(list)
        for _ in range(repeat):
            for name, function in (("a", decode_default), ("a2", decode_pipeline)):
                runs[name].append(timed_decode(function, path))
            if "stage" in sections:
                runs["stage"].append(run_stage(processor, path))
        frames = runs["a"][0][2]
        a_min, a2_min = min(r[0] for r in runs["a"]), min(r[0] for r in runs["a2"])
        a_s, a2_s = segment_min([r[1] for r in runs["a"]]), segment_min([r[1] for r in runs["a2"]])
        result["decode"] = {"default_cpu_s": a_s, "default_min_total_s": a_min, "default_runs": [r[0] for r in runs["a"]],
                            "pipeline_cpu_s": a2_s, "pipeline_min_total_s": a2_min, "pipeline_runs": [r[0] for r in runs["a2"]],
                            "frames": frames}  # fmt: skip
        print(f"(a) decode, PyAV defaults: {a_s:.3f} CPU s segment-min ({1000 * a_s / frames:.3f} ms/frame, {frames} frames; "
              f"min total {a_min:.3f}); (a') pipeline threads (1 slice thread): {a2_s:.3f} (min total {a2_min:.3f})", flush=True)  # fmt: skip

    if "stage" in sections:
        stage_runs = runs["stage"]
        probe_s = min(r[0] for r in stage_runs)
        stage_min = min(r[1] for r in stage_runs)
        stage_s = segment_min([r[4] for r in stage_runs])
        rows = stage_runs[-1][2]
        kept = sum(r["status"] == "kept" for r in rows)
        result["stage"] = {"probe_cpu_s": probe_s, "processor_cpu_s": stage_s, "processor_min_total_s": stage_min,
                           "processor_runs": [r[1] for r in stage_runs], "rows": len(rows), "kept": kept,
                           "cuts": len(stage_runs[-1][3].cuts), "x_vs_default_decode": a_s / (stage_s + probe_s),
                           "x_vs_pipeline_decode": a2_s / (stage_s + probe_s), "x_min_totals": a_min / (stage_min + probe_s)}  # fmt: skip
        print(f"(e) stage: probe {probe_s:.3f} + SourceProcessor {stage_s:.3f} CPU s segment-min (min total {stage_min:.3f}) "
              f"= {1000 * (probe_s + stage_s) / frames:.3f} ms/frame; {len(rows)} rows, {kept} kept; "
              f"x = {a_s / (stage_s + probe_s):.3f} vs (a), {a2_s / (stage_s + probe_s):.3f} vs (a'); "
              f"from min totals {a_min / (stage_min + probe_s):.3f} vs (a)", flush=True)  # fmt: skip

    if "paired" in sections:
        # (a) decode and whole (uninstrumented) stage runs of each variant alternated in every repeat: x directly.
        names = ["baseline", *[n for n in PROTOTYPES if n != "baseline" and any(k in n for k in args.paired.split(","))]]
        decode_runs: list[list[float]] = []
        stage_runs: dict[str, list] = defaultdict(list)
        for _ in range(repeat):
            decode_runs.append(timed_decode(decode_default, path)[1])
            for name in names:
                with PROTOTYPES[name][0]():
                    stage_runs[name].append(run_stage(processor, path, Capture(frames=not stage_runs[name])))
        a_s = segment_min(decode_runs)
        base = stage_runs["baseline"][0]
        base_summary, base_cuts = summarize(base[2]), sorted(base[3].cuts)
        print(f"\nPaired runs ({repeat} rounds of (a) decode + each variant, uninstrumented; segment-min): (a) {a_s:.3f} CPU s\n")
        print("| variant | stage CPU s (probe incl.) | x vs (a) | cuts same | kept same | MP4 bytes | PSNR Y / avg vs own input | worst clip Y |")
        print("|---|---:|---:|---|---|---:|---|---:|")
        paired = []
        for name in names:
            first = stage_runs[name][0]
            stage_s = min(r[0] for r in stage_runs[name]) + segment_min([r[4] for r in stage_runs[name]])
            summary, cuts = summarize(first[2]), sorted(first[3].cuts)
            mp4s = [row["mp4"] for row in first[2] if row["mp4"]]
            quality = clip_quality([reference_i420(f) for f in first[3].clip_frames], mp4s)
            kept_same = [x[0] for x in summary if x[1] == "kept"] == [x[0] for x in base_summary if x[1] == "kept"]
            paired.append({"variant": name, "stage_cpu_s": stage_s, "x": a_s / stage_s, "cuts_identical": cuts == base_cuts,
                           "kept_identical": kept_same, "bytes": sum(len(m) for m in mp4s), **quality,
                           "runs": [r[1] for r in stage_runs[name]]})  # fmt: skip
            print(f"| {name} | {stage_s:.3f} | {a_s / stage_s:.3f} | {'yes' if cuts == base_cuts else 'NO'} | {'yes' if kept_same else 'NO'} | "
                  f"{paired[-1]['bytes']} | {fmt_db(quality['psnr_y'])} / {fmt_db(quality['psnr_avg'])} | {fmt_db(quality['psnr_y_worst_clip'])} |")  # fmt: skip
        result["paired"] = {"decode_cpu_s": a_s, "rows": paired}

    protos = None
    if "prototypes" in sections:
        names = list(PROTOTYPES) if not args.prototypes else ["baseline", *[n for n in PROTOTYPES if any(k in n for k in args.prototypes.split(","))]]
        protos, proto_runs = run_prototypes(path, repeat, names)
    if "breakdown" in sections:
        if protos is not None:  # the prototypes' baseline runs are this breakdown's runs
            run = proto_runs["baseline"]
        else:
            run = instrumented_runs(path, {"baseline": contextlib.nullcontext}, repeat)["baseline"]
        result["breakdown"] = {k: v for k, v in run.items() if k != "outputs"}
        total = run["total_s"]
        frames = run["calls"]["decode (iter_frames)"] - 1
        print(f"\nInstrumented stage: {total:.3f} CPU s as the sum of per-call minima over {repeat} runs "
              f"(fastest whole instrumented run {run['min_total_s']:.3f})\n")  # fmt: skip
        print("| component | CPU s | share | ms per source frame | calls |")
        print("|---|---:|---:|---:|---:|")
        for name, value in sorted(run["components"].items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {value:.3f} | {100 * value / total:.1f}% | {1000 * value / frames:.3f} | {run['calls'][name]} |")
    if args.cprofile:
        out = args.cprofile.with_name(f"{args.cprofile.stem}_{info['width']}x{info['height']}{args.cprofile.suffix}")
        print("\n```\n" + cprofile_stage(processor, path, out) + "```")

    if "encoder" in sections:
        capture = Capture(frames=True)
        run_stage(processor, path, capture)
        clips = capture.clip_frames
        fps = processor.settings.clips.fps
        quick = ("(current)", "(slow reference", "ultrafast crf 20", "veryfast crf 20", "+bframes=3")
        configs = ENCODER_CONFIGS if not args.quick_encoder else [c for c in ENCODER_CONFIGS if any(k in c[0] for k in quick)]
        table = encoder_table(clips, fps, repeat, configs)
        result["encoder"] = {"clips": len(clips), "frames": sum(len(c) for c in clips), "rows": table}
        current = next(r for r in table if "(current)" in r["config"])
        print(f"\nEncoder: {len(clips)} kept clips, {result['encoder']['frames']} frames 256x256 at {fps:g} fps; PSNR against "
              "the encoder's I420 input (= a lossless encode)\n")  # fmt: skip
        print("| x264 | CPU s | ms/frame | vs current | bytes | vs current | PSNR Y | PSNR avg | worst clip Y |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in table:
            print(f"| {r['config']} | {r['cpu_s']:.2f} | {r['cpu_ms_per_frame']:.3f} | {r['cpu_s'] / current['cpu_s']:.2f}x | {r['bytes']} | "
                  f"{r['bytes'] / current['bytes']:.2f}x | {fmt_db(r['psnr_y'])} | {fmt_db(r['psnr_avg'])} | {fmt_db(r['psnr_y_worst_clip'])} |")  # fmt: skip

    if "encoder-sweep" in sections:
        capture = Capture(frames=True)
        run_stage(processor, path, capture)
        crfs = tuple(int(c) for c in args.sweep_crfs.split(",")) if args.sweep_crfs else SWEEP_CRFS
        candidates = [c for c in SWEEP_CANDIDATES if not args.sweep_only or any(k == c[0] for k in args.sweep_only.split(";"))]
        sweep = encoder_sweep(capture.clip_frames, processor.settings.clips.fps, repeat, crfs=crfs, candidates=candidates)
        result["encoder_sweep"] = sweep
        current = next(r for r in sweep["rows"] if r["config"] == "superfast (current) crf 20")
        print(f"\nEncoder crf sweep ({len(capture.clip_frames)} clips); PSNR against the encoder's I420 input\n")
        print("| x264 | CPU s | vs current | bytes | vs current | PSNR Y | PSNR avg | worst clip Y |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sweep["rows"]:
            print(f"| {r['config']} | {r['cpu_s']:.2f} | {r['cpu_s'] / current['cpu_s']:.2f}x | {r['bytes']} | {r['bytes'] / current['bytes']:.2f}x | "
                  f"{fmt_db(r['psnr_y'])} | {fmt_db(r['psnr_avg'])} | {fmt_db(r['psnr_y_worst_clip'])} |")  # fmt: skip
        print(f"\nAt the current encode's PSNR Y {sweep['target_psnr_y']:.2f} dB (interpolated between crfs):\n")
        print("| candidate | CPU s | vs current | bytes | vs current | PSNR avg |")
        print("|---|---:|---:|---:|---:|---:|")
        for m in sweep["matched"]:
            at = m["at_target"]
            if at is None:
                print(f"| {m['candidate']} | (target outside the crf range) | | | | |")
                continue
            print(f"| {m['candidate']} | {at['cpu_s']:.2f} | {at['cpu_s'] / current['cpu_s']:.2f}x | {at['bytes']:.0f} | "
                  f"{at['bytes'] / current['bytes']:.2f}x | {at['psnr_avg']:.2f} |")  # fmt: skip

    if protos is not None:
        result["prototypes"] = protos
        head, rows = protos[0], protos[1:]
        print(f"\nPrototypes: instrumented stage CPU s (sum of per-call minima over {repeat} interleaved runs, probe excluded); "
              f"baseline clips {head['baseline_bytes']} B, Y {fmt_db(head['baseline_quality']['psnr_y'])} dB\n")  # fmt: skip
        print("| prototype | saving in the changed components (of the stage) | stage CPU s, all components (noisy) | component changes >= 0.02 s | cuts same | kept same | scores+phash same | MP4 bytes same | PSNR Y vs own input / vs baseline frames | bytes |")
        print("|---|---:|---:|---|---|---|---|---|---|---:|")
        for r in rows:
            quality = ""
            if "quality_vs_own_input" in r:
                quality = f"{fmt_db(r['quality_vs_own_input']['psnr_y'])} / {fmt_db(r['quality_vs_baseline_input']['psnr_y'])}"
            cut_note = "yes" if r["cuts_identical"] else f"NO ({r['cuts']} cuts; differ: {r['cut_diff']})"
            changes = "; ".join(f"{k.split(' (')[0]} {v:+.3f}" for k, v in r["component_deltas_s"].items() if abs(v) >= 0.02)
            print(f"| {r['prototype']} | {r['saving_affected_s']:+.3f} s ({r['saving_affected_pct']:+.1f}%) | {r['cpu_s']:.3f} ({r['saving_pct']:+.1f}%) | "
                  f"{changes} | {cut_note} | {'yes' if r['kept_identical'] else 'NO'} ({r['kept']}) | "
                  f"{'yes' if r['scores_phash_identical'] else 'NO'} | {'yes' if r['mp4_identical'] else 'NO'} | {quality} | {r.get('bytes', '')} |")  # fmt: skip
        if "stage" in result:
            st, dec = result["stage"], result["decode"]
            print(f"\nProjected x = (a) decode CPU / (probe + stage - saving in the changed components), from the (e) row above "
                  f"({st['probe_cpu_s'] + st['processor_cpu_s']:.3f} s, x {st['x_vs_default_decode']:.3f}):\n")  # fmt: skip
            print("| prototype | projected stage CPU s | projected x vs (a) | vs (a') |")
            print("|---|---:|---:|---:|")
            for r in rows:
                stage = st["probe_cpu_s"] + st["processor_cpu_s"] - r["saving_affected_s"]
                r["projected_x"] = dec["default_cpu_s"] / stage
                print(f"| {r['prototype']} | {stage:.3f} | {dec['default_cpu_s'] / stage:.3f} | {dec['pipeline_cpu_s'] / stage:.3f} |")
    return result


def default_files(seconds: float) -> list[str]:
    from ingest import CACHE, make_footage  # benchmarks/ingest.py: the same cached synthetic footage

    return [str(make_footage(CACHE, 1, seconds, size, 30, 2.5, 20)[0]) for size in ("640x360", "960x540")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="video files (default: 60 s synthetic 640x360 and 960x540, grain 2.5, crf 20)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the default synthetic files")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sections", default="decode,stage,breakdown,prototypes,encoder",
                        help="comma-separated: decode, stage, breakdown, prototypes, encoder, encoder-sweep; none: only --suites")
    parser.add_argument("--prototypes", default="", help="comma-separated substrings of prototype names (default: all)")
    parser.add_argument("--paired", default="recommended,ContentDetector:", help="paired section: substrings of PROTOTYPES names")
    parser.add_argument("--sweep-crfs", default="", help="comma-separated crfs of the encoder-sweep section (default 18-22)")
    parser.add_argument("--sweep-only", default="", help="semicolon-separated SWEEP_CANDIDATES names to sweep (default: all)")
    parser.add_argument("--quick-encoder", action="store_true", help="only the crf 20 preset/tune rows")
    parser.add_argument("--suites", action="store_true", help="also check the output-changing prototypes on the footage suites")
    parser.add_argument("--many", type=int, default=60, help="with --suites: how many cached --many files to add")
    parser.add_argument("--cprofile", type=Path, help="also write a cProfile (CPU clock) of one stage run per file here")
    parser.add_argument("--json", type=Path, default=Path("/tmp/stage_profile.json"))
    args = parser.parse_args(argv)
    files = [] if args.sections == "none" else (args.files or default_files(args.seconds))
    print(f"Stage profile: 1 process, CPU s = time.process_time, {args.repeat} rounds (least disturbed of each piece of work); av {av.__version__}, "
          f"cv2 {cv2.__version__}, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")  # fmt: skip
    results = [profile_file(path, args) for path in files]
    if args.suites:
        paths = suite_files(args.many)
        print(f"\n## Equivalence on {len(paths)} suite files (standard, storm, demo footage; {args.many} --many files)\n", flush=True)
        checks = suite_check(paths, SUITE_PROTOTYPES)
        print("| prototype | files | cut times identical | kept clips identical | all rows identical (scores, phash, MP4) | files that differ |")
        print("|---|---:|---:|---:|---:|---|")
        for c in checks:
            print(f"| {c['prototype']} | {c['files']} | {c['cuts_same']} | {c['kept_same']} | {c['rows_same']} | "
                  f"{', '.join(d['file'] for d in c['differ'][:6])} |")  # fmt: skip
        results.append({"suites": checks})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "files": results}, indent=2, default=str) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
