"""Ingestion throughput against the tools it replaces, on the same files in one run.

    python benchmarks/ingest.py [--files 4] [--seconds 60] [--size 640x360] [--long-seconds 600]

Methods, each over the same synthetic H.264 footage with the same number of worker processes
(`--workers`, default: CPU count), measured as source seconds per wall second:

  (a) PyAV decode        every frame decoded, nothing else (the floor any pipeline pays)
  (b) PySceneDetect      `scenedetect.detect(path, ContentDetector())`
  (c) (b) + split        `split_video_ffmpeg` to one file per scene (needs the ffmpeg binary)
  (d) reelforge ingest   the real command in a subprocess (own local Ray; start-up included),
                         `caption.backend=none`, default clips (256x256, 24 fps, 2-10 s), and
                         `filters.mode=score` so every clip is encoded like (c) splits every scene
  (d') the same run's processing phase alone (from its stats.json phase timings)
  (e) pipelines.process.SourceProcessor in the same process pool as (a)-(c): the stage code
                         without Ray, to tell job overhead from per-frame cost

Peak RSS is sampled every 50 ms over the whole process tree of each method. (d) is run
again on one long source (`--long-seconds`, drawn at a small size so it encodes quickly),
to show whether memory grows with source length. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.logs import setup_logging  # noqa: E402
from pipelines.footage import FootageSpec, varied_shots, write_video  # noqa: E402

logger = logging.getLogger("benchmarks.ingest")

# (d): no captions, and score-only filters so every clip is encoded, as (c) writes every scene.
INGEST_SETTINGS = ["caption.backend=none", "filters.mode=score"]


# --- footage -----------------------------------------------------------------------------


def make_footage(folder: Path, files: int, seconds: float, size: str, fps: int) -> list[Path]:
    """Synthetic H.264 files with a cut every 6 s (cached: the same spec is not re-encoded)."""
    width, height = (int(v) for v in size.split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / f"bench_{i}_{size}_{fps}fps_{seconds:g}s.mp4"
        if not path.exists():
            logger.info("encoding %s", path.name)
            shots = varied_shots([("moving", 6.0)] * max(1, round(seconds / 6.0)), offset=3 * i)
            write_video(FootageSpec(path.stem, "mp4", "libx264", width, height, Fraction(fps), shots), path)
        paths.append(path)
    return paths


def duration_s(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


# --- the methods (run in worker processes) -----------------------------------------------


def decode_all(path: str) -> int:
    import av

    frames = 0
    with av.open(path) as container:
        for _ in container.decode(video=0):
            frames += 1
    return frames


def scenedetect_detect(path: str) -> int:
    from scenedetect import ContentDetector, detect

    return len(detect(path, ContentDetector()))


def scenedetect_split(path: str, out_dir: str) -> int:
    from scenedetect import ContentDetector, detect, split_video_ffmpeg

    scenes = detect(path, ContentDetector())
    target = Path(out_dir) / Path(path).stem
    target.mkdir(parents=True, exist_ok=True)
    split_video_ffmpeg(path, scenes, output_dir=str(target), show_progress=False)
    return len(scenes)


def process_source(path: str) -> int:
    """The ingest's per-source stage alone (same settings as (d)), without Ray or the output protocol."""
    from infra.config import load_config
    from pipelines.probe import probe_source
    from pipelines.process import IngestSettings, SourceProcessor

    settings = IngestSettings.from_config(load_config(None, INGEST_SETTINGS))
    return len(SourceProcessor(settings)(probe_source(path)))


# --- measurement -------------------------------------------------------------------------


class PeakRss:
    """Samples the RSS of a process and all its descendants every 50 ms (sum and largest one)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = []
            for proc in procs:
                try:
                    sizes.append(proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes, default=0))
            time.sleep(0.05)


def run_pool(function, paths: list[Path], workers: int, *extra: str) -> tuple[float, PeakRss]:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(decode_all, [str(paths[0])] * workers))  # start the workers outside the timing
        with PeakRss(os.getpid()) as rss:
            start = time.perf_counter()
            list(pool.map(function, [str(p) for p in paths], *[[e] * len(paths) for e in extra]))
            wall = time.perf_counter() - start
    return wall, rss


def run_ingest(paths: list[Path], out: Path, workers: int) -> tuple[float, PeakRss, dict]:
    sets = [arg for setting in INGEST_SETTINGS for arg in ("--set", setting)]
    command = [sys.executable, "-m", "pipelines.ingest", *map(str, paths), "--out", str(out), *sets, "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakRss(process.pid) as rss:
        stdout, _ = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"reelforge ingest exited {process.returncode}: {stdout[-2000:]}")
    return wall, rss, json.loads((out / "stats.json").read_text())


# --- report ------------------------------------------------------------------------------


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 1024**3:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each file")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--long-seconds", type=float, default=600.0, help="length of the long source (0: skip)")
    parser.add_argument("--long-size", default="320x180")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--footage", type=Path, default=Path(tempfile.gettempdir()) / "reelforge-bench-footage")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = parser.parse_args(argv)
    setup_logging()

    paths = make_footage(args.footage, args.files, args.seconds, args.size, args.fps)
    source_s = sum(duration_s(p) for p in paths)
    rows = []

    def record(name: str, wall: float, rss: PeakRss, note: str = "") -> None:
        rows.append({"method": name, "source_s": round(source_s, 1), "wall_s": round(wall, 2),
                     "source_s_per_wall_s": round(source_s / wall, 2), "peak_rss_total_bytes": rss.peak_total,
                     "peak_rss_largest_process_bytes": rss.peak_single, "note": note})  # fmt: skip
        logger.info("%s: %.1f s", name, wall)

    wall, rss = run_pool(decode_all, paths, args.workers)
    record("(a) PyAV decode", wall, rss)
    wall, rss = run_pool(scenedetect_detect, paths, args.workers)
    record("(b) PySceneDetect detect()", wall, rss)
    if shutil.which("ffmpeg"):
        with tempfile.TemporaryDirectory() as split_dir:
            wall, rss = run_pool(scenedetect_split, paths, args.workers, split_dir)
        record("(c) PySceneDetect detect + split_video_ffmpeg", wall, rss)
    else:
        logger.warning("no ffmpeg binary: skipping (c); apt-get install ffmpeg to run it")
    with tempfile.TemporaryDirectory() as out:
        wall, rss, stats = run_ingest(paths, Path(out) / "shards", args.workers)
    phases = stats["last_run"]["phase_s"]
    record("(d) reelforge ingest (caption none, filters score-only)", wall, rss,
           f"{stats['clips']['kept']} clips kept; phases s: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))  # fmt: skip
    # The same run without its fixed costs (interpreter, Ray start, worker start, probe): the rate a
    # long-running ingest settles at. Labelled as such; the row above is the end-to-end number.
    record("(d') same run, process phase only", phases["process"], rss, "excludes Ray start, probe, pack; includes actor start")
    wall, rss = run_pool(process_source, paths, args.workers)
    record("(e) SourceProcessor in a process pool, no Ray", wall, rss, "the stage code alone: where (d') spends its time")

    long_row = None
    if args.long_seconds > 0:
        (long_path,) = make_footage(args.footage, 1, args.long_seconds, args.long_size, args.fps)
        with tempfile.TemporaryDirectory() as out:
            wall, rss, stats = run_ingest([long_path], Path(out) / "shards", args.workers)
        long_row = {"source": long_path.name, "source_s": round(duration_s(long_path), 1), "wall_s": round(wall, 2),
                    "peak_rss_total_bytes": rss.peak_total, "peak_rss_largest_process_bytes": rss.peak_single,
                    "clips_kept": stats["clips"]["kept"]}  # fmt: skip

    decode_rate = rows[0]["source_s_per_wall_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    # Other jobs on the machine skew every row; the load average says how much.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Ingestion throughput: {args.files} x {args.seconds:g} s H.264 {args.size} @ {args.fps} fps "
          f"({source_s:.0f} source s), {args.workers} worker processes, {os.cpu_count()} CPUs ({cpu}), "
          f"no GPU, load average {load} at the end, commit {commit}\n")  # fmt: skip
    print("| method | wall s | source s / wall s | vs (a) | peak RSS total GiB | largest process GiB | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['method']} | {row['wall_s']:.1f} | {row['source_s_per_wall_s']:.1f} | "
              f"{row['source_s_per_wall_s'] / decode_rate:.2f}x | {gib(row['peak_rss_total_bytes'])} | "
              f"{gib(row['peak_rss_largest_process_bytes'])} | {row['note']} |")  # fmt: skip
    if long_row:
        print(f"\nLong source ({long_row['source']}, {long_row['source_s']:.0f} s): reelforge ingest "
              f"{long_row['wall_s']:.1f} s wall, peak RSS total {gib(long_row['peak_rss_total_bytes'])} GiB, "
              f"largest process {gib(long_row['peak_rss_largest_process_bytes'])} GiB, "
              f"{long_row['clips_kept']} clips kept")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit, "cpus": os.cpu_count(), "workers": args.workers, "load_average": os.getloadavg(),
              "files": [p.name for p in paths], "rows": rows, "long_source": long_row}  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
