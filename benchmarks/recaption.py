"""Recaptioning throughput against an endpoint with a fixed latency, next to that endpoint's ceiling.

    python benchmarks/recaption.py [--latency 0.5] [--concurrency 1,4,16] [--workers 1] [--run-seconds 12]
    python benchmarks/recaption.py --workers 1,2          # also 2 captioning actors
    python benchmarks/recaption.py --shards DIR           # an existing ingest output instead

The endpoint is tests/model/chat_server.py's `ChatServer`: a real aiohttp chat-completions server on
loopback that sleeps `--latency` seconds per request (asyncio.sleep, so requests overlap as on a
real server) and answers a fixed ~70-word caption. With W actors, each keeping at most
`caption.concurrency` = c requests in flight, it cannot answer more than W * c / latency clips/s:
the ceiling. Each run is the real `reelforge recaption` command in a subprocess that starts its
own local Ray (`RAY_ADDRESS=local`, every CPU of this machine), on a fresh caption set.

Shards: synthetic footage (benchmarks/ingest.py's `make_footage`: 640x360, 30 fps, film grain 2.5,
a cut every 6 s) through the real `reelforge ingest` with `clips.max_seconds=3` (two clips of
2.8-3 s per shot) at the default clip and shard sizes (256x256 at 24 fps; `--target-mb 256`: all
400 clips in one shard), cached under ~/.cache/reelforge/bench. A run captions the first
min(all, max(ceiling * --run-seconds, 2 batches per actor)) clips of the manifest (a folder linking
those shards with a manifest of those clips), so each lasts about --run-seconds at the ceiling,
whatever the concurrency.

Measured per run, from the server's side (it timestamps every answer):

  captioning clips/s   clips / (last answer - first request's arrival): the job's start-up (interpreter,
                       Ray, actors, first frames) and its finish (report, _SUCCESS, exit) are outside
  mean in flight       requests in flight, averaged over that span (c when the endpoint is never idle)
  command wall s       the whole `reelforge recaption` command, start-up and finish included
  first request at s   from the command's start: fixed start-up plus the wait for the first frames

and, in this process, the CPU ms per clip of frame preparation (`pipelines.recaption.prepare_clip`:
decode the MP4, pick caption.frames frames, scale to caption.max_pixels, JPEG) over the same clips,
at the default caption settings (process CPU time, all threads). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from benchmarks.ingest import CACHE, make_footage  # noqa: E402
from infra.logs import setup_logging  # noqa: E402
from pipelines.config import CaptionConfig  # noqa: E402
from pipelines.recaption import prepare_clip  # noqa: E402
from tests.model.chat_server import ChatServer  # noqa: E402

logger = logging.getLogger("benchmarks.recaption")

# What a dense-caption model answers, about the length the default prompt asks for (~90 tokens).
CAPTION = (
    "A bright red square glides from the left edge of the frame toward the right across a dark blue "
    "background speckled with fine grain. The camera stays fixed at eye level while the square moves at "
    "a steady pace, its edges crisp against the textured backdrop. Soft, even lighting keeps the colours "
    "saturated; no other objects enter the shot, and the motion continues smoothly until the clip ends."
)
INGEST_SETTINGS = ["caption.backend=none", "filters.mode=score", "filters.dedup_hamming=null", "clips.max_seconds=3"]


# --- shards ------------------------------------------------------------------------------


def make_shards(files: int, seconds: float, target_mb: float, workers: int) -> Path:
    """The cached ingest output of `files` synthetic sources of `seconds` each (made on first use)."""
    paths = make_footage(CACHE, files, seconds, "640x360", 30, 2.5, 20, workers)
    out = CACHE / f"recaption_shards_{files}x{seconds:g}s_640x360_max3s_{target_mb:g}mb"
    if (out / "_SUCCESS").is_file():
        return out
    logger.info("ingesting %d sources into %s (once; cached)", files, out)
    sets = [arg for setting in [*INGEST_SETTINGS, f"shards.target_mb={target_mb:g}"] for arg in ("--set", setting)]
    command = [sys.executable, "-m", "infra", "ingest", *map(str, paths), "--out", str(out), *sets, "--new-output"]
    subprocess.run(command, cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return out


def _env() -> dict[str, str]:
    # A new local Ray per command, never one another process started; no usage reporting. Ray's
    # workers import pipelines.* from this checkout, not from wherever the package is installed.
    return os.environ | {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def shard_view(shards: Path, clips: int, folder: Path) -> Path:
    """`folder` as an ingest output holding the first `clips` clips of `shards`: its manifest has
    those rows, its shard files link to the originals (recaption reads only shards that hold them)."""
    manifest = pq.read_table(shards / "manifest.parquet").slice(0, clips)
    folder.mkdir(parents=True)
    for name in sorted(set(manifest.column("shard").to_pylist())):
        (folder / name).symlink_to(shards / name)
    pq.write_table(manifest, folder / "manifest.parquet")
    (folder / "_SUCCESS").write_text("")
    return folder


def samples(shards: Path) -> list[dict]:
    """Every clip of `shards` as the row read_webdataset hands to prepare_clip (raw member bytes)."""
    rows: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                row = rows.setdefault(key, {"__key__": key, "__url__": str(tar_path)})
                row[ext] = tar.extractfile(member).read()
    return list(rows.values())


# --- frame preparation -------------------------------------------------------------------


def bench_prepare(rows: list[dict], cfg: CaptionConfig) -> dict:
    """CPU and wall ms per clip of prepare_clip over `rows`, at `cfg`'s frames and pixel budget."""
    prepare_clip(rows[0], cfg, None)  # codec and JPEG encoder set-up outside the timing
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    out = [prepare_clip(row, cfg, None)[0] for row in rows]
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    failed = sum(1 for r in out if r["error"])
    if failed:
        raise RuntimeError(f"{failed} clips failed frame preparation: {next(r['error'] for r in out if r['error'])}")
    return {
        "frames": cfg.frames,
        "max_pixels": cfg.max_pixels,
        "clips": len(rows),
        "cpu_ms_per_clip": round(1000 * cpu_s / len(rows), 2),
        "wall_ms_per_clip": round(1000 * wall_s / len(rows), 2),
        "jpeg_kb_per_clip": round(sum(len(f) for r in out for f in r["frames"]) / len(rows) / 1024, 1),
        "mp4_kb_per_clip": round(sum(len(r["mp4"]) for r in rows) / len(rows) / 1024, 1),
    }


# --- one recaption run -------------------------------------------------------------------


class Stamps:
    """The server's `reply` hook: remembers when each answer left (after the latency sleep)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> str:
        with self._lock:
            self.times.append(time.monotonic())
        return CAPTION


def run_one(shards: Path, work: Path, workers: int, concurrency: int, latency_s: float, run_seconds: float, total: int) -> dict:
    ceiling = workers * concurrency / latency_s
    # At least two batches (caption.part_clips) per actor: an actor gets whole batches, so with
    # fewer some actors would have nothing to do whatever the endpoint could take.
    clips = min(total, max(math.ceil(ceiling * run_seconds), 2 * CaptionConfig().part_clips * workers))
    name = f"bench-w{workers}-c{concurrency}"
    view = shard_view(shards, clips, work / name)
    stamps = Stamps()
    with ChatServer(latency_s=latency_s, reply=stamps) as server:
        sets = [f"caption.endpoint={server.url}", "caption.backend=openai", "caption.model=bench-vlm",
                f"caption.concurrency={concurrency}"]  # fmt: skip
        command = [sys.executable, "-m", "infra", "recaption", str(view), "--caption-set", name, "--workers", str(workers),
                   *(a for s in sets for a in ("--set", s))]  # fmt: skip
        logger.info("recaption: %d actor(s) x concurrency %d, %d clips, ceiling %.1f clips/s", workers, concurrency, clips, ceiling)
        started = time.monotonic()
        result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True)
        ended = time.monotonic()
        max_in_flight = server.max_in_flight
    if result.returncode != 0:
        raise RuntimeError(f"reelforge recaption exited {result.returncode}: {result.stderr[-3000:]}")
    summary = json.loads((view / "captions" / name / "manifest.json").read_text())["summary"]
    if summary["ok"] != clips or len(stamps.times) != clips:
        raise RuntimeError(f"expected {clips} ok captions and requests, got {summary['ok']} and {len(stamps.times)}")
    answers = sorted(stamps.times)
    first_arrival, last_answer = answers[0] - latency_s, answers[-1]
    phase_s = last_answer - first_arrival
    rate = clips / phase_s
    return {
        "workers": workers,
        "concurrency": concurrency,
        "clips": clips,
        "ceiling_clips_per_s": round(ceiling, 2),
        "clips_per_s": round(rate, 2),
        "of_ceiling": round(rate / ceiling, 3),
        "captioning_s": round(phase_s, 2),
        # Little's law: requests in flight on average = answers per second x seconds each.
        "mean_in_flight": round(clips * latency_s / phase_s, 2),
        "max_in_flight": max_in_flight,
        "command_wall_s": round(ended - started, 2),
        # Interpreter, Ray, actors, and the frames of the first batch: all of the first shard's
        # when a shard's frames come as one block (see FRAME_BLOCK_BYTES in pipelines/recaption.py).
        "first_request_s": round(first_arrival - started, 2),
        "finish_s": round(ended - last_answer, 2),
        "frame_ms_per_clip_in_job": round(1000 * summary["frame_s_mean"], 1),  # wall, in the job's CPU tasks
    }


# --- report ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the endpoint takes per request")
    parser.add_argument("--concurrency", default="1,4,16", help="caption.concurrency values, comma-separated")
    parser.add_argument("--workers", default="1", help="captioning actor counts, comma-separated")
    parser.add_argument("--run-seconds", type=float, default=12.0, help="clips per run = ceiling x this (at most all)")
    parser.add_argument("--files", type=int, default=4, help="synthetic sources to ingest")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of each synthetic source (100 clips per 300 s)")
    parser.add_argument("--target-mb", type=float, default=256.0, help="shards.target_mb of the ingest (256: the default)")
    parser.add_argument("--shards", type=Path, help="an existing ingest output to caption instead")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "recaption.json")
    args = parser.parse_args(argv)
    setup_logging()

    shards = args.shards or make_shards(args.files, args.seconds, args.target_mb, os.cpu_count() or 1)
    total = pq.read_metadata(shards / "manifest.parquet").num_rows
    rows = samples(shards)
    prepare = bench_prepare(rows, CaptionConfig())
    runs = []
    with tempfile.TemporaryDirectory(prefix="rf-recaption-bench-") as work:
        for workers in (int(w) for w in args.workers.split(",")):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                runs.append(run_one(shards, Path(work), workers, concurrency, args.latency, args.run_seconds, total))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "pipelines", "model"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    shard_files = len(list(shards.glob("shard-*.tar")))
    print(f"Recaptioning: endpoint latency {args.latency:g} s per request (loopback ChatServer), {total} clips in "
          f"{shard_files} shards ({prepare['mp4_kb_per_clip']:.0f} kB MP4 per clip), {os.cpu_count()} CPUs ({cpu}), no GPU, "
          f"load average {load} at the end, commit {commit}{' + local changes' if dirty else ''}\n")  # fmt: skip
    print("| actors | concurrency | clips | ceiling clips/s | captioning clips/s | of ceiling | mean in flight | "
          "max in flight | command wall s | first request at s | after last answer s | frames wall ms/clip in job |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['workers']} | {r['concurrency']} | {r['clips']} | {r['ceiling_clips_per_s']:.1f} | {r['clips_per_s']:.1f} | "
              f"{r['of_ceiling']:.2f}x | {r['mean_in_flight']:.1f} | {r['max_in_flight']} | {r['command_wall_s']:.1f} | "
              f"{r['first_request_s']:.1f} | {r['finish_s']:.1f} | {r['frame_ms_per_clip_in_job']:.0f} |")  # fmt: skip
    print(f"\nFrame preparation (prepare_clip, in one process, {prepare['clips']} clips, caption.frames={prepare['frames']}, "
          f"max_pixels={prepare['max_pixels']}): {prepare['cpu_ms_per_clip']:.1f} CPU ms per clip "
          f"({prepare['wall_ms_per_clip']:.1f} wall ms), {prepare['jpeg_kb_per_clip']:.0f} kB of JPEG per clip")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit, "local_changes": dirty, "cpus": os.cpu_count(), "cpu": cpu, "load_average": os.getloadavg(),
              "argv": sys.argv[1:] if argv is None else argv, "latency_s": args.latency, "clips": total,
              "shards": shard_files, "prepare": prepare, "runs": runs}  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
