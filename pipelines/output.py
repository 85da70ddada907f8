"""The ingest output folder: its layout, how files get into it, which run may write it, and the
config it was made with.

Layout of `--out` (docs/data-format.md is the reference):

    shard-000000.tar ...   WebDataset samples {id}.json / {id}.mp4 / {id}.txt
    manifest.parquet       one row per kept clip: its metadata + `shard` + `source_key`
    rejects.parquet        one row per rejected source or clip: uri, id, stage, reason, score, threshold, ...
    sources.parquet        one row per finished source; THE commit record (see below)
    stats.json, report.html, _SUCCESS (written last)
    _work/lease.json       the run that may write this folder now (fencing, below)
    _work/config.json      ingest-relevant config of this output, recorded with its first result
    _work/<key>.tar        kept clips of one source ({id}.mp4), written by the worker
    _work/<key>.parquet    that source's clip rows + source facts; its existence = source done
    _work/report-samples.parquet  the bounded thumbnail sample report.html shows

Crash safety, and why reruns are byte-identical:

1. Workers write each source's result to temp names and rename (tar first, parquet last), so a
   source is either absent or complete. A SIGKILL loses at most the sources in flight
   (pipelines/work.py).
2. The driver packs only after every source of the run is done. Packing is a pure function of
   (committed tables, finished work results): clips sorted by (source sha256, uri, start),
   near-duplicates dropped in that order, tar members with fixed metadata (pipelines/pack.py).
3. Tables are rewritten with temp + rename; `sources.parquet` goes last and is the commit point.
   Rows of not-yet-committed sources found in manifest/rejects (an interrupted pack) are
   dropped and repacked, and shard numbering restarts after the last committed shard, so an
   interrupted pack is simply redone with the same bytes. Shard files no committed row names
   are leftovers of such a pack and are deleted (pipelines/pack.py).
4. After the commit, work results of committed sources are deleted (they hold a second copy
   of every clip).

Fencing (docs/reliability.md): a run takes the lease `_work/lease.json` before it writes, and
refuses to start while a live run holds it; workers read it just before they commit a result and
a superseded one commits nothing. Temp names carry the epoch and their writer process, so a sweep
deletes only temp files whose writer is gone. No `flock`, no atomic rename: object stores have neither.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model.errors import one_line
from model.storage import resolve_uri

logger = logging.getLogger(__name__)

WORK_DIR = "_work"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SOURCES = "sources.parquet"
STATS = "stats.json"
REPORT = "report.html"
SUCCESS = "_SUCCESS"
CONFIG = f"{WORK_DIR}/config.json"
LEASE = f"{WORK_DIR}/lease.json"
SAMPLES = f"{WORK_DIR}/report-samples.parquet"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_MARK = ".tmp-"

# A failed storage operation is tried again after each of these pauses (15.5 s in all), then the
# job stops: long enough to ride out a store restart or a dropped connection (each try of an S3
# call that cannot connect already spends ~6 s in the AWS SDK's own retries), short enough that
# a full disk stops the job within a minute instead of hiding it. REELFORGE_STORAGE_RETRY_DELAYS_S
# (comma-separated seconds, read by the driver and every worker) replaces them.
RETRY_DELAYS_S = tuple(float(s) for s in os.environ.get("REELFORGE_STORAGE_RETRY_DELAYS_S", "0.5,1,2,4,8").split(","))
# The driver rewrites its lease this often. A lease whose holder cannot be checked directly (a
# driver on another host) counts as abandoned once it is LEASE_EXPIRY_S old: six missed renewals.
LEASE_RENEW_S = 10.0
LEASE_EXPIRY_S = 60.0
# How long a run waits, before packing, for still-running writers of earlier runs on this host
# (a killed driver's Ray workers live on for a moment) before it leaves their temp files alone.
WRITERS_WAIT_S = 60.0

HOST = socket.gethostname()
HOST_ID = hashlib.sha1(HOST.encode()).hexdigest()[:8]

T = TypeVar("T")


class IngestStopped(RuntimeError):
    """The job stopped before it could finish: another run holds --out, storage failed past its
    retries, no working H.264 encoder, or workers dying past Ray's retries. The message says why
    and what to do next; finished sources stay in --out/_work."""


class StorageError(RuntimeError):
    """Our storage or environment failed, not the source: an I/O error or a permission error on
    --out, a full disk, a vanished temp file, an object store that stops answering, a source's
    store that cannot be read. Never a reject: retried (retry_storage), then the job stops.
    Not an OSError on purpose: decode-error handlers catch OSError, and must not catch this."""


class Superseded(RuntimeError):
    """A newer run took this output's lease; the holder of the old token stops without committing."""


@contextmanager
def storage_errors(what: str, kind: type[StorageError] = StorageError) -> Iterator[None]:
    """OSError inside (pyarrow's I/O and S3 errors are OSError) → `kind` naming `what`."""
    try:
        yield
    except OSError as exc:
        raise kind(f"{what}: {one_line(exc)}") from exc


def retry_storage(what: str, work: Callable[[], T]) -> T:
    """`work()`, tried again after each of RETRY_DELAYS_S while it fails with StorageError or
    OSError; then StorageError saying what failed. `work` must be safe to redo from the start."""
    for tries, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            return work()
        except (StorageError, OSError) as exc:
            if delay is None:
                raise StorageError(f"{what}: {one_line(exc)} (gave up after {tries} tries over {sum(RETRY_DELAYS_S):.1f} s)") from exc
            logger.warning("%s failed (%s); try %d of %d in %.1f s", what, one_line(exc), tries + 1, len(RETRY_DELAYS_S) + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


@dataclass(frozen=True)
class LeaseToken:
    """What a run's workers carry to prove they still belong to the run that holds --out."""

    run_id: str
    epoch: int


class OutputDir:
    """`--out` as (pyarrow filesystem, root); picklable by its uri and lease token, so workers
    rebuild it. Every filesystem error comes out as StorageError naming the path."""

    def __init__(self, uri: str, lease: LeaseToken | None = None) -> None:
        self.uri = uri
        self.lease = lease
        self.fs, root = resolve_uri(uri)
        self.root = root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self) -> tuple[type, tuple[str, LeaseToken | None]]:
        return (OutputDir, (self.uri, self.lease))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        with storage_errors(f"cannot stat {self.path(name)}"):
            return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to root) of the files directly in `folder`."""
        base = self.path(folder) if folder else self.root
        with storage_errors(f"cannot list {base}"):
            if self.fs.get_file_info(base).type != pafs.FileType.Directory:
                return []
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        prefix = f"{folder}/" if folder else ""
        return sorted(prefix + info.base_name for info in infos if info.type == pafs.FileType.File)

    def delete(self, name: str) -> None:
        with storage_errors(f"cannot delete {self.path(name)}"):
            try:
                self.fs.delete_file(self.path(name))
            except FileNotFoundError:
                pass

    def discard(self, *names: str | None) -> None:
        """Delete temp files of a write that failed; never raises (the failure is what matters)."""
        for name in filter(None, names):
            try:
                self.delete(name)
            except StorageError as exc:
                logger.debug("could not remove %s: %s", name, exc)

    def temp_name(self, name: str) -> str:
        epoch = self.lease.epoch if self.lease else 0
        return f"{name}{TMP_MARK}{epoch}-{_writer_tag(os.getpid())}-{uuid.uuid4().hex[:6]}"

    def commit(self, temp: str, name: str) -> None:
        """Rename a finished temp file into place (atomic on POSIX; copy + delete on object stores)."""
        with storage_errors(f"cannot rename {self.path(temp)} to {name}"):
            self.fs.move(self.path(temp), self.path(name))

    def open_output(self, name: str) -> pa.NativeFile:
        with storage_errors(f"cannot create {self.path(name)}"):
            return self.fs.open_output_stream(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        temp = self.temp_name(name)
        try:
            with storage_errors(f"cannot write {self.path(temp)}"), self.fs.open_output_stream(self.path(temp)) as stream:
                stream.write(data)
            self.commit(temp, name)
        except BaseException:
            self.discard(temp)
            raise

    def read_bytes(self, name: str) -> bytes:
        with storage_errors(f"cannot read {self.path(name)}"), self.fs.open_input_stream(self.path(name)) as stream:
            return stream.read()

    def write_table(self, name: str, table: pa.Table, commit: bool = True) -> str:
        """Write `table` under a temp name and rename it into place; with `commit=False`, leave it
        under the temp name (returned) for the caller to commit."""
        temp = self.temp_name(name)
        try:
            with storage_errors(f"cannot write {self.path(temp)}"):
                pq.write_table(table, self.path(temp), filesystem=self.fs)
            if commit:
                self.commit(temp, name)
        except BaseException:
            self.discard(temp)
            raise
        return temp

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        if not self.exists(name):
            return None
        with storage_errors(f"cannot read {self.path(name)}"):
            return pq.read_table(self.path(name), filesystem=self.fs, columns=columns)

    def make_dirs(self) -> None:
        with storage_errors(f"cannot create {self.path(WORK_DIR)}"):
            self.fs.create_dir(self.path(WORK_DIR), recursive=True)

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON file `name`, or None when there is none: one read, no existence check first."""
        try:
            return json.loads(self.read_bytes(name))
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise

    def check_fence(self) -> None:
        """Raise Superseded unless this output's lease is still the one this object carries (no
        lease carried: nothing to check, as for a tool or test writing a work result itself)."""
        if self.lease is None:
            return
        record = self.read_json(LEASE)
        if record is None or record["run_id"] != self.lease.run_id:
            holder = f"run {record['run_id']} (epoch {record['epoch']})" if record else "nobody (lease deleted)"
            raise Superseded(f"--out {self.uri} is now held by {holder}; run {self.lease.run_id} (epoch {self.lease.epoch}) stops without committing")


# --- writers: which process wrote a temp file, and whether it still runs ---------------------


@functools.cache
def _writer_tag(pid: int) -> str:
    """`<host id>-<pid>-<process start>`: names one process for good (a reused pid starts later)."""
    return f"{HOST_ID}-{pid}-{_process_start(pid)}"


def _process_start(pid: int) -> str:
    import psutil

    return np.base_repr(round(psutil.Process(pid).create_time() * 100), 36).lower()  # centiseconds, short


_TEMP_RE = re.compile(r"\.tmp-(\d+)-([0-9a-f]{8})-(\d+)-([0-9a-z]+)-[0-9a-f]{6}$")


def process_alive(pid: int, start: str) -> bool:
    """Whether process `pid` of this host still runs and is the one that started at `start`."""
    import psutil

    try:
        return _process_start(pid) == start
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _writer_alive(name: str) -> bool:
    """Whether the process that is writing temp file `name` may still be writing it. Writers on
    other hosts count as gone: whatever they still do is fenced (they commit nothing), so the
    worst a sweep does to them is make a superseded writer fail, which is never a reject."""
    match = _TEMP_RE.search(name)
    if match is None:
        return False  # not our naming: left by an older reelforge, whose writer is long gone
    _, host_id, pid, start = match.groups()
    if host_id != HOST_ID:
        return False
    if int(pid) == os.getpid():
        # This process sweeps only between its own writes, except for the lease renewer's
        # thread, whose temp file is renamed away within milliseconds.
        return name.startswith(f"{LEASE}{TMP_MARK}")
    return process_alive(int(pid), start)


def sweep_temp_files(out: OutputDir, wait_s: float = 0.0) -> None:
    """Delete the temp files whose writer is gone (a killed run's, a dead worker's). With `wait_s`,
    first wait up to that long for live writers on this host (a killed driver's workers) to exit;
    temp files of writers still alive after that are left alone, and logged."""
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        temps = [name for name in out.list() + out.list(WORK_DIR) if TMP_MARK in name]
        live = {name for name in temps if _writer_alive(name)}
        if not live or time.monotonic() >= deadline:
            break
        if not waiting:
            logger.info("waiting for the writers of %d temp files to finish (e.g. %s)", len(live), min(live))
        waiting = True
        time.sleep(0.2)
    for name in temps:
        if name not in live:
            out.delete(name)
    if live:
        logger.warning("left %d temp files whose writers still run after %.0f s (e.g. %s)", len(live), wait_s, min(live))


# --- the lease: one run at a time writes --out --------------------------------------------


def take_lease(out: OutputDir, command: str = "ingest", what: str = "--out") -> LeaseToken:
    """Take `out`'s lease for a new run and carry its token in `out`; IngestStopped in one line
    when a live run holds it. The holder is alive when its driver process still runs (same host),
    or, on another host, while its lease is younger than LEASE_EXPIRY_S."""
    previous = out.read_json(LEASE)
    if previous is not None and not previous.get("released") and _holder_alive(previous):
        age_s = time.time() - previous["renewed_at"]
        expiry = "" if previous["host"] == HOST else f"; if it is dead, its lease expires in {max(0.0, LEASE_EXPIRY_S - age_s):.0f} s"
        raise IngestStopped(
            f"{what} {out.uri} is in use by another {command} run ({previous['run_id']}, pid {previous['pid']} on "
            f"{previous['host']}, lease renewed {age_s:.0f} s ago): wait for it to finish, or use another {what}{expiry}"
        )
    token = LeaseToken(uuid.uuid4().hex[:12], (previous or {}).get("epoch", 0) + 1)
    out.make_dirs()
    out.write_bytes(LEASE, _lease_bytes(token))
    # Two runs that start at the same moment both write; the one that reads back another run's
    # id stops. (Both reading back their own is possible on no filesystem with read-after-write
    # consistency: the later write wins, and the other run's workers are fenced by it.)
    holder = out.read_json(LEASE)
    if holder is None or holder["run_id"] != token.run_id:
        raise IngestStopped(f"{what} {out.uri} was taken by another {command} run at the same moment; use another {what}")
    out.lease = token
    logger.info("took the lease on %s: run %s, epoch %d", out.uri, token.run_id, token.epoch)
    return token


def _lease_bytes(token: LeaseToken, released: bool = False) -> bytes:
    pid = os.getpid()
    record = {
        "run_id": token.run_id,
        "epoch": token.epoch,
        "host": HOST,
        "pid": pid,
        "process_start": _process_start(pid),
        "renewed_at": round(time.time(), 3),
        "released": released,
    }
    return json.dumps(record, sort_keys=True).encode()


def _holder_alive(record: dict[str, Any]) -> bool:
    if record["host"] != HOST:
        return time.time() - record["renewed_at"] < LEASE_EXPIRY_S
    if record["pid"] == os.getpid():
        return False  # an earlier run in this very process, which ended without releasing
    return process_alive(record["pid"], record["process_start"])


class LeaseKeeper:
    """Renews a run's lease every LEASE_RENEW_S from a thread, and releases it at the end."""

    def __init__(self, out: OutputDir) -> None:
        assert out.lease is not None, "take_lease first"
        self.out, self.token = out, out.lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self.out.check_fence()
                self.out.write_bytes(LEASE, _lease_bytes(self.token))
            except Superseded as exc:
                logger.error("%s", exc)  # our workers hit the same fence and stop the job
                return
            except StorageError as exc:
                logger.warning("could not renew the lease: %s", exc)

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next run starts without checks."""
        self._stop.set()
        self._thread.join()
        try:
            self.out.check_fence()
            self.out.write_bytes(LEASE, _lease_bytes(self.token, released=True))
        except (Superseded, StorageError) as exc:
            logger.warning("could not release the lease on %s: %s", self.out.uri, exc)


# --- config record: one output folder, one ingest config ---------------------------------


def owned_names(out: OutputDir) -> list[str]:
    """The files in `out` that reelforge ingest wrote (what --new-output clears)."""
    ours = {MANIFEST, REJECTS, SOURCES, STATS, REPORT, SUCCESS}
    top = [n for n in out.list() if n.split(TMP_MARK)[0] in ours or SHARD_RE.match(n.split(TMP_MARK)[0])]
    return top + out.list(WORK_DIR)


def check_config(out: OutputDir, sections: dict[str, Any], config_hash: str, new_output: bool) -> None:
    """Refuse (ValueError) to mix another ingest config into `out`, after `new_output` cleared it.

    `--new-output` deletes the files this command owns in `out` (shards, tables, report, _work/
    except the lease of the run doing it) and leaves anything else there alone. Nothing is
    recorded here: `record_config` writes the config with the first result, so a run that fails
    before it has any result leaves no config behind to refuse a corrected rerun."""
    if new_output:
        owned = [name for name in owned_names(out) if name != LEASE and not name.startswith(f"{LEASE}{TMP_MARK}")]
        if owned:
            logger.warning("--new-output: deleting %d reelforge files from %s", len(owned), out.uri)
        for name in owned:
            out.delete(name)
    previous = out.read_json(CONFIG)
    if previous is None:
        if _has_results(out):
            raise ValueError(f"--out {out.uri} holds reelforge results but no {CONFIG}; use another --out or --new-output")
        return
    if previous["config_hash"] != config_hash:
        changed = diff_records(previous["sections"], sections)
        raise ValueError(
            f"--out {out.uri} holds an ingest made with another config (hash {previous['config_hash']}, "
            f"this run {config_hash}; changed: {changed}); use the same config, another --out, or --new-output"
        )


def record_config(out: OutputDir, sections: dict[str, Any], config_hash: str) -> None:
    """Record the config in `out` unless it is there: called before a result is first committed."""
    if not out.exists(CONFIG):
        out.make_dirs()
        out.write_bytes(CONFIG, json.dumps({"config_hash": config_hash, "sections": sections}, indent=2, sort_keys=True).encode())


def _has_results(out: OutputDir) -> bool:
    """Committed files, or a finished work result (attempt markers, temp files and a lease are not)."""
    top = {MANIFEST, REJECTS, SOURCES, STATS, SUCCESS}
    return any(name in top or SHARD_RE.match(name) for name in out.list()) or any(
        name.endswith(".parquet") and TMP_MARK not in name for name in out.list(WORK_DIR)
    )


def diff_records(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """What changed between two nested records, as "a.b 1 -> 2, c 'x' -> 'y'"."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = diff_records(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return ", ".join(changes)


# --- the commit record, the success marker ----------------------------------------------


def committed_keys(out: OutputDir) -> set[str]:
    """Keys of the sources `sources.parquet` records: packed and committed."""
    table = out.read_table(SOURCES, columns=["source_key"])
    return set() if table is None else set(table.column("source_key").to_pylist())


def mark_success(out: OutputDir) -> None:
    out.write_bytes(SUCCESS, b"")


def clear_success(out: OutputDir) -> None:
    out.delete(SUCCESS)
