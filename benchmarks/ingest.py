"""Ingestion throughput against the tools it replaces, on the same files in one run.

    python benchmarks/ingest.py [--files 4] [--seconds 60] [--size 1920x1080[,960x540,...]] [--grain 2.5]
    python benchmarks/ingest.py --footage DIR          # any folder of real video files instead
    python benchmarks/ingest.py --long-seconds 3600 --only-long   # memory on a 1-hour source
    python benchmarks/ingest.py --many 1000 --long-seconds 0      # per-source cost: many short small files
    python benchmarks/ingest.py --many 500,1000 --long-seconds 0  # ... and the marginal cost of one more

Methods, each over the same files with the same number of worker processes (`--workers`,
default: CPU count), measured as source seconds per wall second:

  (a) PyAV decode        every frame decoded, nothing else (the floor any pipeline pays)
  (b) PySceneDetect      `scenedetect.detect(path, ContentDetector())`
  (c) (b) + split        `split_video_ffmpeg` to one file per scene (needs the ffmpeg binary)
  (d) reelforge ingest   the real command in a subprocess that starts its own local Ray (cold),
                         `caption.backend=none`, default clips (256x256, 24 fps, 2-10 s), and
                         `filters.mode=score` so every clip is encoded like (c) splits every scene
  (d warm)               the same command against an already running Ray (`ray start --head`,
                         RAY_ADDRESS), as production runs it (`ray job submit` to a cluster),
                         after a 2-file ingest on it (so Ray Data's detached actors exist)
  (d warm net)           (d warm) less what the idle head uses anyway over the same wall time
                         (raylet, GCS, agents; measured for 20 s before the run)
  (d') the warm run's processing phase alone (from its stats.json phase timings)
  (e) pipelines.process.SourceProcessor in the same process pool as (a)-(c): the stage code
                         without Ray, to tell job overhead from per-frame cost

Synthetic footage (default) is H.264 with `--grain` film grain and texture (infra.footage
FootageSpec.grain), so it decodes like camera footage rather than like flat colour (which decodes
~20x faster per pixel than real video and makes every per-clip cost look huge). Files are cached
under ~/.cache/reelforge/bench. One table per `--size`.

`--many N` instead draws N short files like a web video collection's (1-3 s, 160p-360p, H.264, VP9
and MPEG-4 Part 2 in mp4/webm/avi/mkv, grain 2.5) and runs (a), (d), (d warm) and (e) on them: what a
source costs beyond its frames. With it, each ingest row also splits its CPU by process kind (the
driver, raylet, GCS, each kind of Ray worker by its task or actor, Ray's agents), which is where
per-source overhead shows.

Peak RSS is sampled every 50 ms over the whole process tree of each method. (d) is run again on
one long source (`--long-seconds`, drawn at `--long-size` without grain so it encodes quickly), to
show whether memory grows with source length. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.logs import setup_logging  # noqa: E402
from infra.footage import FootageSpec, varied_shots, write_video  # noqa: E402

logger = logging.getLogger("benchmarks.ingest")

# (d): no captions, and score-only filters so every clip is encoded, as (c) writes every scene.
INGEST_SETTINGS = ["caption.backend=none", "filters.mode=score"]
CACHE = Path.home() / ".cache" / "reelforge" / "bench"
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".ogv", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}


# --- footage -----------------------------------------------------------------------------


def _encode(spec: FootageSpec, path: str) -> str:
    logger.info("encoding %s", Path(path).name)
    write_video(spec, Path(path))
    return path


def make_footage(folder: Path, files: int, seconds: float, size: str, fps: int, grain: float = 0.0,
                 crf: int | None = None, workers: int = 1) -> list[Path]:  # fmt: skip
    """Synthetic H.264 files with a cut every 6 s (cached: the same spec is not re-encoded)."""
    width, height = (int(v) for v in size.split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    todo, paths = [], []
    for i in range(files):
        texture = f"_grain{grain:g}_crf{crf}" if grain else ""
        path = folder / f"bench_{i}_{size}_{fps}fps_{seconds:g}s{texture}.mp4"
        if not path.exists():
            shots = varied_shots([("moving", 6.0)] * max(1, round(seconds / 6.0)), offset=3 * i)
            todo.append((FootageSpec(path.stem, "mp4", "libx264", width, height, Fraction(fps), shots, grain=grain, crf=crf), str(path)))
        paths.append(path)
    if todo:  # one file per process: the footage encoder is single-threaded for determinism
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            list(pool.map(_encode, *zip(*todo)))
    return paths


# --many: a web collection's mix, chosen per file by its index (so the same N files every run).
MANY_SIZES = ((160, 120), (256, 144), (320, 180), (480, 270), (640, 360))
MANY_FORMATS = (("mp4", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4"), ("mkv", "libx264"))
MANY_SECONDS = (1.0, 1.5, 2.0, 2.5, 3.0)
MANY_FPS = (24, 25, 30)


def make_many(folder: Path, files: int, workers: int = 1) -> list[Path]:
    """`files` short small files of mixed codecs, one shot each (cached like make_footage): the 2-3 s
    ones make one clip each at the default clip lengths (2-10 s), the shorter ones none."""
    folder = folder / "many"
    folder.mkdir(parents=True, exist_ok=True)
    todo, paths = [], []
    for i in range(files):
        (width, height), (container, codec) = MANY_SIZES[i % 5], MANY_FORMATS[(i // 5) % 4]
        seconds, fps = MANY_SECONDS[(i // 3) % 5], MANY_FPS[i % 3]
        path = folder / f"many_{i:05d}_{width}x{height}_{fps}fps_{seconds:g}s.{container}"
        if not path.exists():
            shot = varied_shots([("moving", seconds)], offset=i)  # one shot, as most short web clips are
            spec = FootageSpec(path.stem, container, codec, width, height, Fraction(fps), shot, grain=2.5)
            todo.append((spec, str(path)))
        paths.append(path)
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_encode, *zip(*todo), chunksize=16))
    return paths


def real_footage(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise SystemExit(f"--footage {str(folder)!r}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return paths


def describe(path: Path) -> dict:
    """Duration (from decoding the container's own numbers), size and bit rate of one file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000
        else:
            seconds = float(stream.frames / stream.average_rate) if stream.frames and stream.average_rate else 0.0
        return {"file": path.name, "seconds": seconds, "width": stream.codec_context.width,
                "height": stream.codec_context.height, "codec": stream.codec_context.name,
                "mbit_s": path.stat().st_size * 8 / 1e6 / seconds if seconds else 0.0}  # fmt: skip


# --- the methods (run in worker processes) -----------------------------------------------


class _Guarded:
    """A method failing on one file (a real folder can hold anything) logs it and returns -1."""

    def __init__(self, function):
        self.function = function

    def __call__(self, path: str, *extra: str) -> int:
        try:
            return self.function(path, *extra)
        except Exception as exc:  # noqa: BLE001 - the table says how many files failed
            logger.warning("%s failed on %s: %s", self.function.__name__, path, exc)
            return -1


def _decode_all(path: str) -> int:
    import av

    frames = 0
    with av.open(path) as container:
        for _ in container.decode(video=0):
            frames += 1
    return frames


def _scenedetect_detect(path: str) -> int:
    from scenedetect import ContentDetector, detect

    return len(detect(path, ContentDetector()))


def _scenedetect_split(path: str, out_dir: str) -> int:
    from scenedetect import ContentDetector, detect, split_video_ffmpeg

    scenes = detect(path, ContentDetector())
    target = Path(out_dir) / Path(path).stem
    target.mkdir(parents=True, exist_ok=True)
    split_video_ffmpeg(path, scenes, output_dir=str(target), show_progress=False)
    return len(scenes)


@functools.cache
def _processor():
    """One SourceProcessor per pool process, as each ingest actor holds one."""
    from infra.config import load_config
    from pipelines.process import IngestSettings, SourceProcessor

    return SourceProcessor(IngestSettings.from_config(load_config(None, INGEST_SETTINGS)))


def _process_source(path: str) -> int:
    """The ingest's per-source stage alone (same settings as (d)), without Ray or the output protocol."""
    from pipelines.probe import probe_source

    return len(_processor()(probe_source(path)))


decode_all = _Guarded(_decode_all)
scenedetect_detect = _Guarded(_scenedetect_detect)
scenedetect_split = _Guarded(_scenedetect_split)
process_source = _Guarded(_process_source)


# --- measurement -------------------------------------------------------------------------


class PeakRss:
    """Samples a process and all its descendants every 50 ms: peak RSS (sum, and largest one) and
    CPU seconds used meanwhile (user + system summed over the processes seen, from each one's
    first sample or the monitor's start; a process's last < 50 ms before it exits are missed).

    CPU seconds matter because the 2 CPUs here are shared: under load the wall time of a method
    says more about the other jobs than about it, while its CPU time barely moves.
    """

    def __init__(self, pid: int, count_root_cpu: bool = True) -> None:
        self.root = psutil.Process(pid)
        self.count_root_cpu = count_root_cpu  # False: the root is this script (its sampling thread is not the method)
        self.peak_total = 0
        self.peak_single = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        # CPU seconds by process kind (process_kind): a Ray worker's kind follows the task or actor it
        # runs at each sample, so its CPU goes to what it was doing.
        self.cpu_by_kind: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(last - self._cpu_start.get(pid, 0.0) for pid, last in self._cpu_last.items()
                   if self.count_root_cpu or pid != self.root.pid)  # fmt: skip

    def merge(self, other: "PeakRss") -> None:
        """Count another, simultaneously sampled tree with this one (distinct processes)."""
        self.peak_total += other.peak_total
        self.peak_single = max(self.peak_single, other.peak_single)
        self._cpu_start |= other._cpu_start
        self._cpu_last |= other._cpu_last
        self.cpu_by_kind.update(other.cpu_by_kind)

    def __enter__(self) -> "PeakRss":
        for proc in self._tree():  # processes already running count from now on
            try:
                times = proc.cpu_times()
                self._cpu_start[proc.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self) -> None:
        sizes = []
        for proc in self._tree():
            try:
                with proc.oneshot():
                    sizes.append(proc.memory_info().rss)
                    times = proc.cpu_times()
                    kind = process_kind(proc)
            except psutil.NoSuchProcess:
                continue
            cpu = times.user + times.system
            if self.count_root_cpu or proc.pid != self.root.pid:
                self.cpu_by_kind[kind] += cpu - self._cpu_last.get(proc.pid, self._cpu_start.get(proc.pid, 0.0))
            self._cpu_last[proc.pid] = cpu
        self.peak_total = max(self.peak_total, sum(sizes))
        self.peak_single = max(self.peak_single, max(sizes, default=0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)


_AGENTS = {"dashboard/agent.py": "dashboard agent", "runtime_env/agent/main.py": "runtime env agent",
           "log_monitor.py": "log monitor", "autoscaler/_private/monitor.py": "autoscaler monitor"}


def process_kind(proc: psutil.Process) -> str:
    """What a process of a method's tree is: a Ray worker by its title (`ray::ProcessSource`,
    `ray::IDLE`, ...), Ray's daemons and agents, the ingest driver, or the executable's name."""
    command = proc.cmdline() or [proc.name()]
    if Path(command[0]).name in ("raylet", "gcs_server"):  # before the agents: the raylet's arguments name them
        return Path(command[0]).name
    if command[0].startswith("ray::"):
        return re.split(r"[.\s]", command[0], maxsplit=1)[0]
    if any(arg.endswith("default_worker.py") for arg in command[:3]):
        return "ray worker, starting (imports)"
    if any(arg.endswith("dashboard/dashboard.py") for arg in command[:3]):
        return "dashboard"
    for script, kind in _AGENTS.items():
        if any(script in arg for arg in command[:3]):
            return kind
    if command[1:4] == ["-m", "infra", "ingest"]:
        return "driver (reelforge ingest)"
    if "start" in command and any(Path(arg).name == "ray" for arg in command[:2]):
        return "ray start"
    return Path(command[0]).name


def run_pool(function, paths: list[Path], workers: int, *extra: str) -> tuple[float, PeakRss, list[int]]:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(decode_all, [str(paths[0])] * workers))  # start the workers outside the timing
        with PeakRss(os.getpid(), count_root_cpu=False) as rss:
            start = time.perf_counter()
            results = list(pool.map(function, [str(p) for p in paths], *[[e] * len(paths) for e in extra]))
            wall = time.perf_counter() - start
    return wall, rss, results


def run_ingest(paths: list[Path], out: Path, workers: int, ray_address: str | None = None) -> tuple[float, PeakRss, dict]:
    """`reelforge ingest` in a subprocess: its own local Ray (cold), or the running one at `ray_address`."""
    sets = [arg for setting in INGEST_SETTINGS for arg in ("--set", setting)]
    command = [sys.executable, "-m", "infra", "ingest", *map(str, paths), "--out", str(out), *sets, "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    if ray_address:
        env |= {"RAY_ADDRESS": ray_address, "RAY_AUTH_MODE": "disabled"}  # as the head (running_ray)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakRss(process.pid) as rss:
        stdout, _ = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"reelforge ingest exited {process.returncode}: {stdout[-2000:]}")
    return wall, rss, json.loads((out / "stats.json").read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_ray(num_cpus: int) -> Iterator[tuple[str, psutil.Process]]:
    """A local Ray head (`ray start --head --block`) in its own temp dir and process group:
    yields (address, the head's process). Stopped by signalling that group only, not with
    `ray stop`, which would also stop any other Ray on the machine."""
    ray_cli = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    command = [str(ray_cli), "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={port}",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=false",
               "--disable-usage-stats"]  # fmt: skip
    # Token auth off: Ray turns it on for `ray start` when ~/.ray/auth_token exists, and the ingest's
    # ray.init() then fails to authenticate; this head listens on 127.0.0.1 only. Workers import pipelines.*.
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    head = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # ready when the GCS port answers; the ingest's ray.init() waits for the rest
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head at {address} did not come up in 120 s") from None
                time.sleep(0.5)
        time.sleep(3)  # raylet registration
        yield address, psutil.Process(head.pid)
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # --block: the CLI stops the node's processes on SIGTERM
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- report ------------------------------------------------------------------------------


def idle_cpu_rate(head: psutil.Process, settle_s: float = 10.0, measure_s: float = 20.0) -> float:
    """CPU seconds per second the head's process tree uses with no job, once its start has settled."""
    time.sleep(settle_s)
    with PeakRss(head.pid) as idle:
        time.sleep(measure_s)
    return idle.cpu_s / measure_s


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 1024**3:.2f}"


def bench_group(label: str, paths: list[Path], workers: int, warm: bool, tools: bool = True, cold: bool = True) -> dict:
    """Every method on `paths` ((b) and (c) only with `tools`); returns {"label", "files", "source_s", "rows"}."""
    info = [describe(p) for p in paths]
    source_s = sum(i["seconds"] for i in info)
    rows: list[dict] = []

    def record(name: str, wall: float, rss: PeakRss, note: str = "", failed: int = 0) -> None:
        if failed:
            note = f"{note}; failed on {failed} file(s)".lstrip("; ")
        rows.append({"method": name, "wall_s": round(wall, 2), "source_s_per_wall_s": round(source_s / wall, 2),
                     "cpu_s": round(rss.cpu_s, 1), "source_s_per_cpu_s": round(source_s / max(rss.cpu_s, 1e-9), 2),
                     "peak_rss_total_bytes": rss.peak_total, "peak_rss_largest_process_bytes": rss.peak_single,
                     "note": note, "cpu_s_by_kind": {k: round(v, 2) for k, v in rss.cpu_by_kind.most_common()}})  # fmt: skip
        logger.info("%s | %s: %.1f s", label, name, wall)

    def phases(stats: dict) -> str:
        run = stats["last_run"]["phase_s"]
        return f"{stats['clips']['kept']} clips; phases s: " + ", ".join(f"{k} {v:.1f}" for k, v in run.items())

    wall, rss, results = run_pool(decode_all, paths, workers)
    record("(a) PyAV decode", wall, rss, failed=results.count(-1))
    if tools:
        wall, rss, results = run_pool(scenedetect_detect, paths, workers)
        record("(b) PySceneDetect detect()", wall, rss, failed=results.count(-1))
    if tools and shutil.which("ffmpeg"):
        with tempfile.TemporaryDirectory() as split_dir:
            wall, rss, results = run_pool(scenedetect_split, paths, workers, split_dir)
        record("(c) PySceneDetect detect + split_video_ffmpeg", wall, rss, failed=results.count(-1))
    elif tools:
        logger.warning("no ffmpeg binary: skipping (c); apt-get install ffmpeg to run it")
    if cold:
        with tempfile.TemporaryDirectory() as out:
            wall, rss, stats = run_ingest(paths, Path(out) / "shards", workers)
        record("(d) reelforge ingest, cold (starts its own Ray)", wall, rss, phases(stats))
    if warm:
        with running_ray(workers) as (address, head), tempfile.TemporaryDirectory() as out:
            # A cluster that has run a job before: Ray Data's detached actors (stats, autoscaling
            # coordinator, actor locations) are started by the first job and stay for the next ones.
            run_ingest(paths[:2], Path(out) / "warm-up", workers, address)
            idle_rate = idle_cpu_rate(head)
            # The head's raylet starts the workers: its tree's RSS counts with the ingest's.
            with PeakRss(head.pid) as head_rss:
                wall, rss, stats = run_ingest(paths, Path(out) / "shards", workers, address)
        rss.merge(head_rss)
        record("(d warm) reelforge ingest, running Ray (RAY_ADDRESS)", wall, rss, phases(stats))
        # What the running head burns anyway (raylet, GCS, agents and prestarted workers polling), a
        # cost of having a cluster rather than of the job: measured before the run, taken off its CPU.
        net = dict(rows[-1], method="(d warm net) the same run less the idle head's CPU over its wall time",
                   note=f"idle head: {idle_rate:.3f} CPU s per s, {idle_rate * wall:.1f} CPU s over the run")  # fmt: skip
        net["cpu_s"] = round(rows[-1]["cpu_s"] - idle_rate * wall, 1)
        net["source_s_per_cpu_s"] = round(source_s / max(net["cpu_s"], 1e-9), 2)
        rows.append(net)
        # Without its fixed costs (interpreter, Ray connect, probe, pack): the rate a long ingest settles at.
        # Its CPU column is the whole warm run's (phases are not separated in CPU time).
        record("(d') warm run, process phase only", stats["last_run"]["phase_s"]["process"], rss, "includes actor start; CPU: whole warm run")
    wall, rss, results = run_pool(process_source, paths, workers)
    record("(e) SourceProcessor in a process pool, no Ray", wall, rss, "the stage code alone", failed=results.count(-1))
    return {"label": label, "files": info, "source_s": round(source_s, 1), "rows": rows}


def print_group(group: dict) -> None:
    info = group["files"]
    sizes = sorted({f"{i['width']}x{i['height']}" for i in info})
    codecs = sorted({i["codec"] for i in info})
    mbit = sum(i["mbit_s"] * i["seconds"] for i in info) / max(group["source_s"], 1e-9)
    print(f"\n### {group['label']}: {len(info)} files, {group['source_s']:.0f} source s, "
          f"{', '.join(sizes[:6])}{' ...' if len(sizes) > 6 else ''}, {', '.join(codecs)}, mean {mbit:.1f} Mbit/s\n")  # fmt: skip
    decode = group["rows"][0]
    print("| method | wall s | source s / wall s | vs (a) | CPU s | source s / CPU s | vs (a), CPU | "
          "peak RSS total GiB | largest process GiB | note |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in group["rows"]:
        print(f"| {row['method']} | {row['wall_s']:.1f} | {row['source_s_per_wall_s']:.1f} | "
              f"{row['source_s_per_wall_s'] / decode['source_s_per_wall_s']:.2f}x | {row['cpu_s']:.1f} | "
              f"{row['source_s_per_cpu_s']:.1f} | {row['source_s_per_cpu_s'] / decode['source_s_per_cpu_s']:.2f}x | "
              f"{gib(row['peak_rss_total_bytes'])} | {gib(row['peak_rss_largest_process_bytes'])} | {row['note']} |")  # fmt: skip
    # Per source: each whole ingest run against the stage code alone, (e), and its CPU by process.
    stage = next((row for row in group["rows"] if row["method"].startswith("(e)")), None)
    print()
    for row in group["rows"]:
        if not row["method"].startswith(("(d)", "(d warm")):
            continue
        beyond = ""
        if stage:
            extra_s = row["cpu_s"] - stage["cpu_s"]
            beyond = f"; beyond (e): {1000 * extra_s / len(info):.1f} ms CPU per source, {100 * extra_s / stage['cpu_s']:.0f}% of (e)"
        kinds = ", ".join(f"{kind} {cpu:.1f}" for kind, cpu in row["cpu_s_by_kind"].items() if cpu >= 0.05)
        print(f"- {row['method']}: {len(info) / row['cpu_s']:.1f} sources per CPU s{beyond}. CPU s by process: {kinds}")
    if stage:
        print(f"- {stage['method']}: {len(info) / stage['cpu_s']:.1f} sources per CPU s; (a) decode: {len(info) / decode['cpu_s']:.1f}")


def print_marginal(groups: list[dict]) -> None:
    """Per source beyond the stage code, between the smallest and the largest `--many` run: what
    each further source costs once the run's fixed costs (driver imports, Ray connect, worker and
    actor start, pack's imports) are paid, which is what a collection of millions pays per file."""
    small, large = groups[0], groups[-1]
    extra = len(large["files"]) - len(small["files"])

    def by_prefix(group: dict, prefix: str) -> dict | None:
        return next((row for row in group["rows"] if row["method"].startswith(prefix)), None)

    stage_s = by_prefix(large, "(e)")["cpu_s"] - by_prefix(small, "(e)")["cpu_s"]
    print(f"\nMarginal cost, {len(small['files'])} → {len(large['files'])} files: the stage code (e) "
          f"{1000 * stage_s / extra:.1f} ms CPU per source")
    for prefix in ("(d)", "(d warm)", "(d warm net)"):
        rows = by_prefix(small, prefix + " "), by_prefix(large, prefix + " ")
        if None in rows:
            continue
        beyond_s = (rows[1]["cpu_s"] - rows[0]["cpu_s"]) - stage_s
        fixed_s = rows[0]["cpu_s"] - by_prefix(small, "(e)")["cpu_s"] - beyond_s * len(small["files"]) / extra
        print(f"- {rows[1]['method']}: {1000 * beyond_s / extra:.1f} ms CPU per source beyond (e) "
              f"({100 * beyond_s / stage_s:.0f}% of it), plus {fixed_s:.1f} CPU s fixed per run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each synthetic file")
    parser.add_argument("--size", default="1920x1080", help="WxH, or several comma-separated: one table each")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--grain", type=float, default=2.5, help="film grain (luma levels) of the synthetic footage; 0: flat colour")
    parser.add_argument("--crf", type=int, default=20, help="x264 crf of grainy synthetic footage")
    parser.add_argument("--footage", type=Path, help="benchmark the video files in this folder instead of synthetic footage")
    parser.add_argument("--many", default="", help="benchmark N short small files of mixed codecs instead (per-source cost); "
                        "several comma-separated counts (500,1000) also give the marginal cost per source")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="skip the (d warm) row")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the (d) cold row")
    parser.add_argument("--long-seconds", type=float, default=600.0, help="length of the long source (0: skip)")
    parser.add_argument("--long-size", default="320x180")
    parser.add_argument("--only-long", action="store_true", help="run only the long-source memory measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=CACHE, help="where synthetic footage is kept between runs")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = parser.parse_args(argv)
    setup_logging()

    groups = []
    if not args.only_long:
        if args.many:
            for count in sorted(int(n) for n in args.many.split(",")):
                paths = make_many(args.cache, count, args.workers)
                groups.append(bench_group(f"{count} short files (1-3 s, 160p-360p, mixed codecs)", paths, args.workers, args.warm, tools=False, cold=args.cold))
        elif args.footage:
            groups.append(bench_group(f"Real footage in {args.footage}", real_footage(args.footage), args.workers, args.warm, cold=args.cold))
        else:
            for size in args.size.split(","):
                paths = make_footage(args.cache, args.files, args.seconds, size, args.fps, args.grain,
                                     args.crf if args.grain else None, args.workers)  # fmt: skip
                label = f"{size}, {args.fps} fps, {'grain ' + format(args.grain, 'g') if args.grain else 'flat colour'}"
                groups.append(bench_group(label, paths, args.workers, args.warm, cold=args.cold))

    long_row = None
    if args.long_seconds > 0:
        (long_path,) = make_footage(args.cache, 1, args.long_seconds, args.long_size, args.fps)
        with tempfile.TemporaryDirectory() as out:
            wall, rss, stats = run_ingest([long_path], Path(out) / "shards", args.workers)
        long_row = {"source": long_path.name, "source_s": round(describe(long_path)["seconds"], 1), "wall_s": round(wall, 2),
                    "cpu_s": round(rss.cpu_s, 1),
                    "peak_rss_total_bytes": rss.peak_total, "peak_rss_largest_process_bytes": rss.peak_single,
                    "clips_kept": stats["clips"]["kept"]}  # fmt: skip

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    # Other jobs on the machine skew every row; the load average says how much.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Ingestion throughput: {args.workers} worker processes, {os.cpu_count()} CPUs ({cpu}), no GPU, "
          f"load average {load} at the end, commit {commit}")  # fmt: skip
    for group in groups:
        print_group(group)
    if args.many and len(groups) > 1:
        print_marginal(groups)
    if long_row:
        print(f"\nLong source ({long_row['source']}, {long_row['source_s']:.0f} s): reelforge ingest (cold) "
              f"{long_row['wall_s']:.1f} s wall, {long_row['cpu_s']:.0f} CPU s, peak RSS total {gib(long_row['peak_rss_total_bytes'])} GiB, "
              f"largest process {gib(long_row['peak_rss_largest_process_bytes'])} GiB, "
              f"{long_row['clips_kept']} clips kept")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit, "cpus": os.cpu_count(), "workers": args.workers, "load_average": os.getloadavg(),
              "argv": sys.argv[1:] if argv is None else argv, "groups": groups, "long_source": long_row}  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
