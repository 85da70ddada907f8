"""`reelforge ingest SRC... --out DIR`: raw footage → scene-split, filtered, captioned WebDataset shards.

The job only wires stages into a Ray Data plan and sets their resources:

    discover (driver)                         SRC args → sources not yet done in --out
    → from_items → map(probe_row)             size, sha256, stream facts, or a probe/size reject
    → materialize → preflight (driver)        H.264 encoder, undecodable codecs, too-small sources
    → probe/size rejects: work results        recorded so a rerun skips them too
    → map(ProcessSource, actors, 1 CPU each)  scenes → clips → filters → captions → mp4, written
                                              per source to --out/_work (atomic, resumable)
    → pack (driver)                           dedup, shards, manifest/rejects/sources, stats, report, _SUCCESS

Why the processor's clips are written by the actor that made them instead of flowing on as
rows: a source's clips must land all together or not at all (resume after SIGKILL), and only
the task that produced them knows when the last one is out. It also keeps video bytes out of
the object store: what streams back to the driver is one small summary row per source.
See pipelines/shards.py for the commit protocol and docs/data-format.md for the outputs.

A source that kills its worker (SIGSEGV inside FFmpeg, the OOM killer) would be resent by
Ray forever; CrashGuard counts attempts in --out and turns it into a "crash" reject after
--max-attempts deaths, so the rest of the job finishes.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

from infra.config import ReelforgeConfig, add_config_args, config_from_args
from model.errors import one_line
from model.storage import config_hash
from infra.logs import setup_logging
from pipelines.discover import SourceFile, discover_sources
from pipelines.config import ClipsConfig
from pipelines.probe import empty_probe_row, preflight, probe_source, size_reject
from pipelines.process import IngestSettings, SourceProcessor
from pipelines.report import write_report
from pipelines.shards import (
    STATS,
    SUCCESS,
    WORK_DIR,
    OutputDir,
    PackResult,
    check_config,
    clear_attempts,
    clear_success,
    committed_keys,
    mark_success,
    pack,
    read_attempts,
    record_attempt,
    remove_temp_files,
    work_keys,
    work_summary,
    write_source_result,
    write_stats,
)

logger = logging.getLogger(__name__)

# Attempts at one source (per stage) before a worker that keeps dying on it is given up on and
# the source becomes a "crash" reject: one death can be bad luck (a neighbour's memory spike),
# three in a row on the same source is the source.
DEFAULT_MAX_ATTEMPTS = 3
# Where each worker process's faulthandler report goes (one file per pid): a worker killed by
# SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL leaves its Python stack there; SIGKILL leaves nothing.
FAULT_DIR = Path(tempfile.gettempdir()) / "reelforge-faults"
FAULT_LOG_MAX_AGE_S = 7 * 24 * 3600

T = TypeVar("T")


def ingest_settings(cfg: ReelforgeConfig) -> IngestSettings:
    """The sections that decide what a clip is (plus the pipeline version): one output folder
    holds one setting of them. `shards` is not among them: shard size changes packing, never clips."""
    return IngestSettings.from_config(cfg)


# --- stages as Ray sees them --------------------------------------------------------------


def probe_row(
    row: dict[str, Any], clips: ClipsConfig, out: OutputDir, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> dict[str, Any]:
    """Discovery row → probe row (probe facts plus the source key, size and mtime), rejected for
    size when it is smaller than `clips` allows, or a "crash" reject once probing it has killed
    `max_attempts` workers (opening a container runs FFmpeg's demuxer and first decode)."""

    def probe() -> dict[str, Any]:
        try:
            return size_reject(row | probe_source(row["uri"]), clips)
        except Exception as exc:  # probe_source reports bad files itself; this catches its bugs, not the job's end
            logger.exception("probe of %s failed", row["uri"])
            return row | empty_probe_row(row["uri"]) | {"reject_stage": "probe", "reject_reason": one_line(exc, with_type=True)}

    def crashed(reason: str) -> dict[str, Any]:
        return row | empty_probe_row(row["uri"]) | {"reject_stage": "crash", "reject_reason": reason}

    return CrashGuard(out, "probe", max_attempts).run(row["source_key"], probe, crashed)


class ProcessSource:
    """Actor: run SourceProcessor on one probed source and write its work result."""

    def __init__(self, settings: IngestSettings, out: OutputDir, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        setup_logging()
        self.processor = SourceProcessor(settings)
        self.out = out
        self.guard = CrashGuard(out, "process", max_attempts)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        source = dict(row)
        key = source["source_key"]
        if self.out.exists(f"{WORK_DIR}/{key}.parquet"):
            # Ray resent a source whose result was written just before its worker died.
            clear_attempts(self.out, key, "process")
            return work_summary(self.out, key)
        return self.guard.run(key, lambda: self._process(source), lambda reason: self._crashed(source, reason))

    def _process(self, source: dict[str, Any]) -> dict[str, Any]:
        try:
            # A generator: write_source_result streams each clip's MP4 into the work tar as it is
            # finished, so an actor holds one clip's bytes, not a whole source's.
            return write_source_result(self.out, source, self.processor.iter_rows(source))
        except Exception as exc:  # bad input never stops the job: the source becomes a reject row
            logger.exception("reject %s: processing failed", source["uri"])
            return write_source_result(self.out, source | {"reject_stage": "process", "reject_reason": one_line(exc, with_type=True)}, [])

    def _crashed(self, source: dict[str, Any], reason: str) -> dict[str, Any]:
        return write_source_result(self.out, source | {"reject_stage": "crash", "reject_reason": reason}, [])


# --- a source that kills its worker -------------------------------------------------------


class CrashGuard:
    """Bounds how often Ray may hand one source to a worker that then dies (SIGSEGV inside
    FFmpeg, the OOM killer). Ray Data restarts dead actors and resends their rows without limit
    (max_restarts=-1, max_task_retries=-1); attempt markers in --out (pipelines/shards.py) count
    the deaths, and the attempt that finds `max_attempts` of them writes a "crash" reject instead."""

    def __init__(self, out: OutputDir, stage: str, max_attempts: int) -> None:
        self.out, self.stage, self.max_attempts = out, stage, max_attempts
        enable_fault_log()

    def run(self, key: str, work: Callable[[], T], crashed: Callable[[str], T]) -> T:
        """`work()`, recorded as an attempt; or `crashed(reason)` when earlier attempts used them up."""
        earlier = read_attempts(self.out, key, self.stage, self.max_attempts)
        if len(earlier) >= self.max_attempts:
            reason = crash_reason(earlier, self.stage)
            logger.error("%s: %s", key, reason)
            result = crashed(reason)
        else:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": round(time.time(), 3)}
            record_attempt(self.out, key, self.stage, len(earlier) + 1, info)
            result = work()
        # The outcome is written: any later run or retry skips the source, so its markers can go.
        clear_attempts(self.out, key, self.stage, len(earlier) + 1)
        return result


_fault_log: IO[str] | None = None


def enable_fault_log() -> None:
    """In a Ray worker, point faulthandler (which Ray enables on stderr) at FAULT_DIR/<pid>.log,
    once per process, so the attempt after a crash can name the signal and where it hit."""
    global _fault_log
    if _fault_log is not None or not _in_ray_worker():
        return  # a driver or a test keeps its own faulthandler (pytest's, say)
    try:
        FAULT_DIR.mkdir(exist_ok=True)
        _sweep_fault_logs()
        _fault_log = open(FAULT_DIR / f"{os.getpid()}.log", "w")  # noqa: SIM115 (open for the process's life)
    except OSError as exc:  # a read-only or foreign temp dir: crash reasons just say less
        logger.warning("no fault log in %s (%s); crash rejects will not name the signal", FAULT_DIR, exc)
        return
    faulthandler.enable(file=_fault_log, all_threads=True)


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _sweep_fault_logs() -> None:
    """Delete logs of dead processes that recorded nothing, and any older than a week."""
    import psutil

    now = time.time()
    for path in FAULT_DIR.glob("*.log"):
        try:
            info = path.stat()
            pid_gone = not path.stem.isdigit() or not psutil.pid_exists(int(path.stem))
            if pid_gone and (info.st_size == 0 or now - info.st_mtime > FAULT_LOG_MAX_AGE_S):
                path.unlink()
        except OSError:  # another worker swept it first
            continue


def crash_reason(attempts: list[dict[str, Any]], stage: str) -> str:
    """One line for rejects.parquet: how many workers died on the source, and how the last one did."""
    verb = {"probe": "probing", "process": "processing"}.get(stage, stage)
    last, count = attempts[-1], len(attempts)
    return (
        f"worker process died {'once' if count == 1 else f'{count} times'} while {verb} this source "
        f"(last: pid {last['pid']} on {last['host']}, {death_cause(last)})"
    )


def death_cause(attempt: dict[str, Any]) -> str:
    """What killed the worker of `attempt`, as far as this host can tell."""
    if attempt["host"] != socket.gethostname():
        return "cause not visible from this host; see that node's Ray worker logs"
    try:
        report = (FAULT_DIR / f"{attempt['pid']}.log").read_text(errors="replace")
    except OSError:
        report = ""
    fatal = [line for line in report.splitlines() if line.startswith("Fatal Python error:")]
    if not fatal:
        return "no fatal-signal report, so SIGKILL (an out-of-memory kill by the kernel or Ray, kill -9, or its run being killed)"
    # Innermost frames first; a frame of ours says what the worker was doing (decode, encode...).
    frames = [(Path(m[1]), m[2], m[3]) for m in _FRAME_RE.finditer(report)]
    ours = [f for f in frames if "pipelines" in f[0].parts] or frames
    where = f", while in {ours[0][0].name}:{ours[0][1]} {ours[0][2]}()" if ours else ""
    return f"{fatal[-1].removeprefix('Fatal Python error:').strip()}{where}"


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


# --- the job ------------------------------------------------------------------------------


def run_ingest(
    cfg: ReelforgeConfig,
    sources: list[SourceFile],
    out: OutputDir,
    num_workers: int | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> dict[str, Any]:
    """Process every source not yet done in `out`, then pack and commit; returns stats.json.
    A source whose worker dies `max_attempts` times (per stage) becomes a "crash" reject."""
    start = time.monotonic()
    remove_temp_files(out)
    done = committed_keys(out) | work_keys(out)
    todo = [source for source in sources if source.source_key not in done]
    logger.info("%d sources, %d already done in %s, %d to process", len(sources), len(sources) - len(todo), out.uri, len(todo))
    if not todo and not (work_keys(out) - committed_keys(out)) and out.exists(SUCCESS):
        logger.info("nothing new to ingest; %s is unchanged", out.uri)
        return _read_stats(out)
    clear_success(out)
    phase_s: dict[str, float] = {}  # where the wall time went: ray_init, probe, process, pack
    if todo:
        _process(cfg, todo, out, num_workers, max_attempts, phase_s)
        remove_temp_files(out)  # what workers that died (crash rejects, restarts) were writing
    dedup_hamming = cfg.filters.dedup_hamming if cfg.filters.mode == "filter" else None
    started = time.monotonic()
    result: PackResult = pack(out, dedup_hamming, cfg.shards.target_mb)
    phase_s["pack"] = time.monotonic() - started
    logger.info("packed %d clips into %d new shards in %.1f s", result.clips_kept, len(result.shards), phase_s["pack"])
    stats = write_stats(out, result, time.monotonic() - start, phase_s, config_hash(ingest_settings(cfg)), _versions())
    write_report(out, cfg.filters, stats)
    mark_success(out)
    return stats


def _process(
    cfg: ReelforgeConfig,
    todo: list[SourceFile],
    out: OutputDir,
    num_workers: int | None,
    max_attempts: int,
    phase_s: dict[str, float],
) -> None:
    import ray
    from ray.data.expressions import col
    from tqdm import tqdm

    if not ray.is_initialized():
        started = time.monotonic()
        ray.init()  # RAY_ADDRESS, when set, points this at a cluster
        phase_s["ray_init"] = time.monotonic() - started
        logger.info("Ray ready in %.1f s", phase_s["ray_init"])
    workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    alive_nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if alive_nodes > 1 and out.is_local:
        # Actors write work results where they run; the driver packs from its own disk.
        logger.warning("%d Ray nodes but --out %s is a local path: it must be a shared mount on every node", alive_nodes, out.uri)
    # One source per block: sources are the unit of work and of resume.
    items = ray.data.from_items([source.as_row() for source in todo], override_num_blocks=len(todo))
    # Probing reads each file once (sha256) and opens its container: I/O bound, so a fraction of a CPU.
    started = time.monotonic()
    probed = items.map(
        probe_row, fn_kwargs={"clips": cfg.clips, "out": out, "max_attempts": max_attempts}, num_cpus=0.5
    ).materialize()
    phase_s["probe"] = time.monotonic() - started
    logger.info("probed %d sources in %.1f s", len(todo), phase_s["probe"])
    try:
        columns = ["uri", "codec", "width", "height", "rotation", "reject_stage"]
        lines = preflight(probed.select_columns(columns).iter_rows(), cfg.clips)
    except RuntimeError as exc:  # no working H.264 encoder: nothing could be written
        raise SystemExit(f"ingest: {exc}") from None
    for line in lines:
        logger.info("preflight: %s", line)

    for row in probed.filter(expr=col("reject_stage").is_not_null()).iter_rows():
        write_source_result(out, dict(row), [])
    good = probed.filter(expr=col("reject_stage").is_null())
    num_good = good.count()
    if num_good == 0:
        return
    results = good.map(
        ProcessSource,
        fn_constructor_args=(ingest_settings(cfg), out, max_attempts),
        # A fixed pool: the number of sources is known, so start every actor at once instead of
        # letting the autoscaler add them one backlog check at a time.
        compute=ray.data.ActorPoolStrategy(size=min(workers, num_good)),
        num_cpus=1,
        # Left at Ray Data's actor-pool defaults (max_restarts=-1, max_task_retries=-1; passing
        # them is deprecated): a dead actor is restarted and its row resent without limit, and
        # CrashGuard's attempt markers are what bound a source that keeps killing workers.
    )
    started = time.monotonic()
    try:
        for summary in tqdm(results.iter_rows(), total=num_good, desc="processing sources", unit="source"):
            if summary["rejected"]:
                logger.warning("source %s rejected: %s", summary["uri"], summary["reject_reason"])
    except Exception as exc:  # a worker died past Ray's retries (OOM kill, crash inside FFmpeg)
        logger.exception("processing stopped")
        raise SystemExit(
            f"ingest: processing stopped ({one_line(exc, with_type=True)[:300]}); finished sources are kept in "
            f"{out.path('_work')}, rerun the same command to resume"
        ) from None
    phase_s["process"] = time.monotonic() - started
    logger.info("processed %d sources in %.1f s", num_good, phase_s["process"])


def _read_stats(out: OutputDir) -> dict[str, Any]:
    return json.loads(out.read_bytes(STATS))


def _versions() -> dict[str, str]:
    import av
    import pyarrow
    import ray
    import scenedetect
    import webdataset

    from infra import __version__

    return {
        "reelforge": __version__,
        "ray": ray.__version__,
        "av": av.__version__,
        "scenedetect": scenedetect.__version__,
        "pyarrow": pyarrow.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
        "python": sys.version.split()[0],
    }


def summary_table(stats: dict[str, Any]) -> str:
    """The end-of-run markdown table: this run and the whole output folder."""
    run = stats["last_run"]
    rows = [
        ("sources ok / rejected", f"{run['sources'] - run['sources_rejected']} / {run['sources_rejected']}",
         f"{stats['sources']['ok']} / {stats['sources']['rejected']}"),
        ("clips kept", str(run["clips_kept"]), str(stats["clips"]["kept"])),
    ]  # fmt: skip
    clip_stages, source_stages = stats["clips"]["rejected_by_stage"], stats["sources_rejected_by_stage"]
    stages = sorted(set(run["rejected_by_stage"]) | set(clip_stages) | set(source_stages))
    total_by_stage = {s: clip_stages.get(s, 0) + source_stages.get(s, 0) for s in stages}
    for stage in stages:
        rows.append((f"rejected: {stage}", str(run["rejected_by_stage"].get(stage, 0)), str(total_by_stage[stage])))
    rows += [
        ("hours in (source)", f"{run['source_seconds'] / 3600:.3f}", f"{stats['source_seconds'] / 3600:.3f}"),
        ("hours out (clips)", f"{run['clip_seconds'] / 3600:.3f}", f"{stats['clip_seconds'] / 3600:.3f}"),
        ("wall time (s)", f"{run['wall_s']:.1f}", ""),
        ("source s per wall s", str(run["source_seconds_per_wall_s"]), ""),
        ("shards", str(len(run["new_shards"])), str(len(stats["shards"]))),
    ]
    lines = ["| | this run | output total |", "|---|---:|---:|"]
    lines += [f"| {name} | {this} | {total} |" for name, this, total in rows]
    rejected = run.get("rejected_sources") or []
    if rejected:
        # Whole sources lost deserve their reason on screen, not only a count ("size", "crash").
        lines += ["", "| source rejected in this run | stage | reason |", "|---|---|---|"]
        lines += [f"| {r['uri']} | {r['stage']} | {_cell(r['reason'])} |" for r in rejected]
        if run["sources_rejected"] > len(rejected):
            lines.append(f"| ... and {run['sources_rejected'] - len(rejected)} more (rejects.parquet) | | |")
    return "\n".join(lines)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reelforge ingest",
        description="Scene-split, filter, caption and shard raw footage into WebDataset tars.",
    )
    parser.add_argument("src", nargs="+", metavar="SRC", help="files, folders, globs or file:// s3:// gs:// URIs")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder or URI (shards, manifest, report)")
    parser.add_argument(
        "--new-output",
        action="store_true",
        help="delete this command's files in --out first (shards, tables, report, _work/); other files stay",
    )
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="max processing actors (default: cluster CPUs)")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help=f"workers a source may kill (crash, OOM) before it is rejected as 'crash' (default {DEFAULT_MAX_ATTEMPTS})",
    )
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"ingest: --workers must be >= 1, got {args.workers}")
    if args.max_attempts < 1:
        raise SystemExit(f"ingest: --max-attempts must be >= 1, got {args.max_attempts}")
    try:
        sources = discover_sources(args.src)
        out = OutputDir(args.out)
        settings = ingest_settings(cfg)
        check_config(out, settings.model_dump(mode="json"), config_hash(settings), args.new_output)
    except ValueError as exc:
        raise SystemExit(f"ingest: {exc}") from None
    stats = run_ingest(cfg, sources, out, args.workers, args.max_attempts)
    print(summary_table(stats))
    if stats["sources"]["ok"] == 0:
        logger.error("no source was processed successfully; see %s", out.path("rejects.parquet"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
