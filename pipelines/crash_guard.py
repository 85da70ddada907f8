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

from pipelines.output import OutputDir
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
