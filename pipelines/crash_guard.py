"""Workers that die on a source: bounded retries, and a "crash" reject that says how they died.

`CrashGuard` wraps one stage's work on one source (probe, process) in the Ray workers of the
ingest job. The fault log (faulthandler, one file per worker pid) is what lets the attempt after
a crash name the signal and the frame it hit; a SIGKILL (the OOM killer) leaves none, and the
reason says that instead."""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

from pipelines.output import OutputDir, StorageError
from pipelines.work import clear_attempts, read_attempts, record_attempt

logger = logging.getLogger(__name__)

# Where each worker process's faulthandler report goes (one file per pid): a worker killed by
# SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL leaves its Python stack there; SIGKILL leaves nothing.
FAULT_DIR = Path(tempfile.gettempdir()) / "reelforge-faults"
FAULT_LOG_MAX_AGE_S = 7 * 24 * 3600

T = TypeVar("T")


class CrashGuard:
    """Bounds how often Ray may hand one source to a worker that then dies (SIGSEGV inside
    FFmpeg, the OOM killer). Ray Data restarts dead actors and resends their rows without limit
    (max_restarts=-1, max_task_retries=-1); attempt markers in --out (pipelines/work.py) count
    the deaths, and the attempt that finds `max_attempts` of them writes a "crash" reject instead.

    Only deaths that the source can have caused count: markers of workers of this same run
    (epoch) other than the process reading them. A marker of an earlier run is a worker that died
    with its run (a killed driver takes its workers along), which says nothing about the source;
    a marker of this process is a try that ended in an exception (say a storage error, retried)."""

    def __init__(self, out: OutputDir, stage: str, max_attempts: int) -> None:
        self.out, self.stage, self.max_attempts = out, stage, max_attempts
        enable_fault_log()

    def run(self, key: str, work: Callable[[], T], crashed: Callable[[str], T]) -> T:
        """`work()`, recorded as an attempt; or `crashed(reason)` when earlier attempts used them up."""
        markers = read_attempts(self.out, key, self.stage)
        deaths = [marker for marker in markers if self._is_death(marker)]
        if len(deaths) >= self.max_attempts:
            reason = crash_reason(deaths, self.stage)
            logger.error("%s: %s", key, reason)
            result = crashed(reason)
        else:
            mine = [number for number, marker in enumerate(markers, start=1) if _is_this_process(marker)]
            number = mine[0] if mine else len(markers) + 1
            if not mine:
                record_attempt(self.out, key, self.stage, number, self._marker())
            try:
                result = work()
            except BaseException:
                # This process lives: whatever ended the try (a storage error, a superseded run)
                # was no death. Best effort: storage that just failed may fail this too.
                try:
                    clear_attempts(self.out, key, self.stage, first=number)
                except StorageError:
                    pass
                raise
        # The outcome is written: any later run or retry skips the source, so its markers can go.
        clear_attempts(self.out, key, self.stage)
        return result

    def _marker(self) -> dict[str, Any]:
        epoch = self.out.lease.epoch if self.out.lease else None
        return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": round(time.time(), 3), "epoch": epoch}

    def _is_death(self, marker: dict[str, Any]) -> bool:
        epoch = self.out.lease.epoch if self.out.lease else None
        return marker.get("epoch") == epoch and not _is_this_process(marker)


def _is_this_process(marker: dict[str, Any]) -> bool:
    """Written by this very process (not by an earlier one that had the same pid)."""
    import psutil

    return (
        marker["host"] == socket.gethostname()
        and marker["pid"] == os.getpid()
        and marker["started_at"] >= psutil.Process().create_time() - 1.0
    )


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
