"""The footage catalogues (standard for tests, demo for `make demo`), files ingest must reject or
find damaged, and truth.json."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from infra.footage.render import AudioTrack, write_video
from infra.footage.spec import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    MUXER_OPTIONS,
    SHAPES,
    FootageSpec,
    GeneratedVideo,
    Shot,
    ShotKind,
    encoder_available,
)

# --- catalogues --------------------------------------------------------------------------------


def varied_shots(kinds_and_durations: list[tuple[ShotKind, float]], offset: int = 0) -> tuple[Shot, ...]:
    """Shots whose colour, shape, direction and background change from each to the next.

    Cycling indices at different strides walks through many of the 4×3×4×4 combinations;
    `offset` shifts the walk so different files show different combinations.
    """
    colors, backgrounds = tuple(COLORS), tuple(BACKGROUNDS)
    shots = []
    for j, (kind, duration_s) in enumerate(kinds_and_durations):
        i = j + offset
        shots.append(
            Shot(
                kind=kind,
                duration_s=duration_s,
                color=colors[i % 4],
                shape=SHAPES[i % 3],
                direction=DIRECTIONS[(i + i // 4) % 4],
                # Steps of +1, or +3 every 4 shots: always odd, so dark and light alternate.
                background=backgrounds[(i + 1 + 2 * (i // 4)) % 4],
            )
        )
    return tuple(shots)


def _moving(*durations: float) -> list[tuple[ShotKind, float]]:
    return [("moving", d) for d in durations]


def standard_specs() -> list[FootageSpec]:
    """The test catalogue: containers, codecs, sizes, rates, VFR, odd size, audio, rotation.

    Kept short (≈40 s of video in all, most files 2–8 s) so the whole suite encodes in seconds.
    """
    specs = [
        # Hard cuts between moving shots, a frozen shot, .srt sidecar; the determinism reference.
        FootageSpec("cuts_h264_320x240_25fps", "mp4", "libx264", 320, 240, Fraction(25),
                    varied_shots([("moving", 2.0), ("moving", 1.5), ("static", 1.0), ("moving", 1.5)]),
                    sidecar="srt"),
        # Fade out to black, fade in, and a near-black shot between moving shots.
        FootageSpec("fades_mpeg4_320x240_24fps", "avi", "mpeg4", 320, 240, Fraction(24),
                    varied_shots([("moving", 1.5), ("fade_out", 1.0), ("fade_in", 1.0), ("moving", 1.5),
                                  ("black", 1.0), ("moving", 1.0)], offset=4)),
        FootageSpec("msmpeg4v2_160x120_15fps", "avi", "msmpeg4v2", 160, 120, Fraction(15),
                    varied_shots(_moving(1.5, 1.5, 1.5), offset=10)),
        # Cinepak's vector quantiser is by far the slowest encoder here (~20 ms a 160x120 frame): keep it short.
        FootageSpec("cinepak_160x120_30fps", "mov", "cinepak", 160, 120, Fraction(30),
                    varied_shots(_moving(1.0, 1.0), offset=13)),
        FootageSpec("vp9_256x144_2997fps", "webm", "libvpx-vp9", 256, 144, Fraction(30000, 1001),
                    varied_shots(_moving(1.5, 1.5, 1.0), offset=15)),
        FootageSpec("h264_320x180_60fps", "mkv", "libx264", 320, 180, Fraction(60),
                    varied_shots(_moving(1.0, 1.0, 1.0), offset=18)),
        # Big frames, short file: exercises downscaling without costing CPU.
        FootageSpec("h264_1920x1080_30fps", "mp4", "libx264", 1920, 1080, Fraction(30),
                    varied_shots(_moving(0.75, 0.75), offset=21)),
        # Odd size: x264 refuses odd dims in 4:2:0, MPEG-4 Part 2 accepts them.
        FootageSpec("odd_mpeg4_321x241_25fps", "avi", "mpeg4", 321, 241, Fraction(25),
                    varied_shots(_moving(1.5, 1.5), offset=23)),
        FootageSpec("vfr_h264_320x240", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(1.5, 1.5, 1.0), offset=25), vfr=True),
        # One shot, so a whole-file .txt caption is true.
        FootageSpec("audio_h264_aac_320x240_30fps", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(3.0), offset=28), audio=True, sidecar="txt"),
        # Portrait phone footage: stored 320x240, shown 240x320.
        FootageSpec("rotated90_h264_320x240_30fps", "mp4", "libx264", 320, 240, Fraction(30),
                    varied_shots(_moving(1.5, 1.5), offset=29), rotation=90),
    ]  # fmt: skip
    if encoder_available("libtheora"):  # no Theora encoder in the PyAV wheels; appears where one exists
        specs.append(FootageSpec("theora_320x240_25fps", "ogv", "libtheora", 320, 240, Fraction(25),
                                 varied_shots(_moving(1.5, 1.5), offset=31)))  # fmt: skip
    return specs


def demo_specs() -> list[FootageSpec]:
    """What `make demo` ingests: 4 small files, 12–16 s each, several 2–3 s shots, .srt sidecars.

    Mostly moving shots (the training signal), one frozen shot and one fade pair, so the
    demo also shows the filters and the scene splitter at work.
    """
    return [
        FootageSpec("demo_a_h264_256x144_24fps", "mp4", "libx264", 256, 144, Fraction(24),
                    varied_shots(_moving(2.5, 3.0, 2.5, 3.0, 2.5), offset=0), sidecar="srt"),
        FootageSpec("demo_b_h264_320x240_25fps", "mp4", "libx264", 320, 240, Fraction(25),
                    varied_shots([("moving", 3.0), ("static", 2.0), ("moving", 2.5), ("moving", 3.0),
                                  ("moving", 2.5)], offset=5), sidecar="srt"),
        FootageSpec("demo_c_h264_192x144_30fps", "mkv", "libx264", 192, 144, Fraction(30),
                    varied_shots([("moving", 2.5), ("fade_out", 1.5), ("fade_in", 1.5), ("moving", 3.0),
                                  ("moving", 2.5), ("moving", 2.5)], offset=10), sidecar="srt"),
        FootageSpec("demo_d_mpeg4_160x128_24fps", "avi", "mpeg4", 160, 128, Fraction(24),
                    varied_shots(_moving(3.0, 2.5, 3.0, 2.5, 3.0), offset=16), sidecar="srt"),
    ]  # fmt: skip


def storm_specs() -> list[FootageSpec]:
    """Continuous, fast-changing content (a music visualiser, kind "visualiser") that makes
    PySceneDetect's ContentDetector fire on nearly every frame although nothing is cut, as two
    real 320x180 visualiser sources did: one between ordinary shots (hard cuts at 2.4 s and 7.4 s),
    one that is nothing else."""
    return [
        FootageSpec("visualiser_cuts_h264_320x180_25fps", "mp4", "libx264", 320, 180, Fraction(25),
                    (*varied_shots(_moving(2.4), offset=2), Shot("visualiser", 5.0),
                     *varied_shots(_moving(2.4), offset=5))),
        FootageSpec("visualiser_only_h264_320x180_25fps", "mp4", "libx264", 320, 180, Fraction(25),
                    (Shot("visualiser", 6.0),)),
    ]  # fmt: skip


def _write_all(specs: list[FootageSpec], out_dir: Path, desc: str) -> list[GeneratedVideo]:
    out_dir = Path(out_dir)
    return [write_video(spec, out_dir / spec.filename) for spec in tqdm(specs, desc=desc, unit="file")]


def standard_suite(out_dir: Path) -> list[GeneratedVideo]:
    return _write_all(standard_specs(), out_dir, "encoding standard footage")


def demo_suite(out_dir: Path) -> list[GeneratedVideo]:
    return _write_all(demo_specs(), out_dir, "encoding demo footage")


def storm_suite(out_dir: Path) -> list[GeneratedVideo]:
    return _write_all(storm_specs(), out_dir, "encoding visualiser footage")


def bad_files(out_dir: Path) -> dict[str, Path]:
    """Files ingestion must reject without crashing: name -> path.

    empty (0 bytes), truncated (an H.264 MP4 cut to 40%: its moov atom, written last, is
    gone), not_video (text and random bytes named .mp4), audio_only (AAC in .m4a),
    zero_frames (an AVI whose header declares an MPEG-4 video stream that has no frames).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "empty": out_dir / "bad_empty.mp4",
        "truncated": out_dir / "bad_truncated.mp4",
        "not_video": out_dir / "bad_not_video.mp4",
        "audio_only": out_dir / "bad_audio_only.m4a",
        "zero_frames": out_dir / "bad_zero_frames.avi",
    }
    paths["empty"].write_bytes(b"")

    whole = write_video(
        FootageSpec("whole", "mp4", "libx264", 160, 120, Fraction(25), varied_shots(_moving(1.0, 1.0))),
        out_dir / "bad_truncated.full.mp4",
    )
    data = whole.path.read_bytes()
    whole.path.unlink()
    paths["truncated"].write_bytes(data[: int(len(data) * 0.4)])

    rng = np.random.default_rng(0)
    paths["not_video"].write_bytes(b"this is not a video, just text and noise\n" + rng.bytes(4096))

    with av.open(str(paths["audio_only"]), "w", format="mp4", options=MUXER_OPTIONS) as container:
        track = AudioTrack(container)
        track.encode_until(1.0)
        track.encode_until(None)

    # AVI writes its stream header even with no packets; MP4/MKV/WebM drop an empty track
    # or fail to open, which would not test "a video stream with zero frames".
    with av.open(str(paths["zero_frames"]), "w", options=MUXER_OPTIONS) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        container.start_encoding()
    return paths


DAMAGED_SOURCE = FootageSpec(
    "damaged_source", "mp4", "libx264", 160, 120, Fraction(25), varied_shots(_moving(1.0, 1.0), offset=3)
)


def damaged_files(out_dir: Path) -> dict[str, Path]:
    """Files that open and declare frames but end early: name -> path. Both are cut from
    encodings of `DAMAGED_SOURCE` (50 frames, a cut at frame 25), so the frames that do
    decode match its truth.

    cut_data: a faststart MP4 (index first) cut to 70%: opens, declares 50 frames, then
    decoding raises InvalidDataError part way. cut_silently: an MKV cut to 50%: decoding
    just stops early, without an error, so only a frame count shows the loss.
    """
    out_dir = Path(out_dir)
    paths = {"cut_data": out_dir / "damaged_cut_data.mp4", "cut_silently": out_dir / "damaged_cut_silently.mkv"}
    for (name, path), spec, keep in zip(
        paths.items(),
        (replace(DAMAGED_SOURCE, faststart=True), replace(DAMAGED_SOURCE, container="mkv")),
        (0.7, 0.5),
    ):
        whole = write_video(spec, path.with_suffix(".full" + path.suffix))
        data = whole.path.read_bytes()
        whole.path.unlink()
        path.write_bytes(data[: int(len(data) * keep)])
    return paths


def write_truth(
    videos: list[GeneratedVideo],
    path: Path,
    bad: dict[str, Path] | None = None,
    damaged: dict[str, Path] | None = None,
) -> Path:
    """Write truth.json: {"videos": [GeneratedVideo.to_json(), ...], "bad": {name: file},
    "damaged": {name: file}}."""
    path = Path(path)
    truth = {
        "generator": "infra.footage",
        "videos": [video.to_json() for video in videos],
        "bad": {name: bad_path.name for name, bad_path in (bad or {}).items()},
        "damaged": {name: damaged_path.name for name, damaged_path in (damaged or {}).items()},
    }
    path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return path

