"""Synthetic footage whose truth is known: the test and demo input of every other part.

Lives in infra/ because no product stage uses it: `reelforge demo-footage` (infra/demo_footage.py),
`make demo`, the tests and the benchmarks do. Three modules, re-exported here: `spec` (the visual
vocabulary, `Shot`, `FootageSpec`, `GeneratedVideo`), `render` (frame timing, drawing, encoding:
`render_frames`, `write_video`) and `suites` (the catalogues, bad and damaged files, truth.json).

Nothing is downloaded. Each file is drawn with numpy and encoded with PyAV, and its
truth (hard-cut times, shot spans, fades, frame times, one caption per shot) is computed
from the same spec that drew it, so tests of scene splitting, clipping, filtering,
captioning and training can check their output against it.

API (all deterministic: the same spec gives the same pixels, and byte-identical files):

    Shot(kind, duration_s, color, shape, direction, background)   one shot between cuts;
        .caption is a true sentence, e.g. "a red circle moving right on a dark blue background"
    FootageSpec(name, container, codec, width, height, fps, shots, pix_fmt=None,
                audio=False, rotation=0, vfr=False, sidecar="none", faststart=False,
                grain=0.0, crf=None)
    varied_shots([(kind, duration_s), ...], offset=0)   shots that change colour/shape/direction/background
    write_video(spec, path) -> GeneratedVideo            encode one file (+ its .srt/.txt sidecar)
    render_frames(spec) -> Iterator[(pts, rgb)]          the drawn frames, without encoding
    standard_specs() / demo_specs() / storm_specs() -> list[FootageSpec] the catalogues, without encoding
    standard_suite(out_dir) / demo_suite(out_dir) / storm_suite(out_dir) -> list[GeneratedVideo]
    bad_files(out_dir) -> dict[str, Path]                empty, truncated, not a video, audio only, zero frames
    damaged_files(out_dir) -> dict[str, Path]            open fine, end early: decode error part way / silent
    write_truth(videos, path, bad=None, damaged=None)    truth.json: every GeneratedVideo as JSON

Visual vocabulary, kept small so a tiny text-to-video model can learn it: a shape
(circle, square, triangle) of one of 4 colours moves left/right/up/down (or stands still)
over a textured, vertically graded background of one of 4 colours. Consecutive shots
change background between a dark and a light one, so the mean frame difference at a
cut is > 30 levels (of 255) and ContentDetector scores it > 70, while inside a shot
they stay under ~9 and ~10: PySceneDetect's ContentDetector finds every hard cut.
Outside that vocabulary, `visualiser` shots (storm_specs) are continuous content whose colours
change on every frame: ContentDetector fires on nearly every frame of them although nothing is
cut, the cut storm that real music-visualiser footage causes.

Conventions:
- `width`/`height` are the coded (stored) size. `rotation` is the display rotation in
  degrees counter-clockwise, as PyAV's `VideoFrame.rotation` and ffprobe's display-matrix
  `rotation` report it (PyAV reads 270 back as -90); a player shows
  `np.rot90(stored, rotation // 90)`. Frames of a rotated file are drawn in display
  orientation, so captions are true for what a viewer sees.
- A boundary between shots is a hard cut unless both sides are dark there (fade_out or
  black followed by fade_in or black). Those dips to black are `soft_cut_*`: no pixel
  jumps there, yet HSV detectors (PySceneDetect's ContentDetector) usually split within
  a frame of them, because hue and saturation of near-black pixels swing wildly.
- VFR files alternate frame durations of 2/3 and 4/3 of 1/fps (so `fps` is the mean rate),
  with timestamps in units of 1/(3·fps) seconds, exact in MP4 and MKV.
"""


from infra.footage.render import render_frames, write_video
from infra.footage.spec import (
    AUDIO_RATE,
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SHOT_KINDS,
    FootageSpec,
    GeneratedVideo,
    Shot,
    ShotKind,
    encoder_available,
)
from infra.footage.suites import (
    DAMAGED_SOURCE,
    bad_files,
    damaged_files,
    demo_specs,
    demo_suite,
    standard_specs,
    standard_suite,
    storm_specs,
    storm_suite,
    varied_shots,
    write_truth,
)

__all__ = [
    "AUDIO_RATE", "BACKGROUNDS", "COLORS", "DAMAGED_SOURCE", "DIRECTIONS", "SHAPES", "SHOT_KINDS", "FootageSpec",
    "GeneratedVideo", "Shot", "ShotKind", "bad_files", "damaged_files", "demo_specs", "demo_suite",
    "encoder_available", "render_frames", "standard_specs", "standard_suite", "storm_specs", "storm_suite",
    "varied_shots", "write_truth",
    "write_video",
]  # fmt: skip
