"""Per-source work results in `--out/_work`, written by the worker that processed the source.

A source's result is all or nothing: its kept clips stream into `_work/<key>.tar` under a temp
name, renamed into place when the last clip is in; then `_work/<key>.parquet` (every clip row
without its bytes, the source's facts as file metadata) is written the same way, last. The
parquet's existence is what "this source is done" means to a rerun (step 1 of the crash-safety
list in pipelines/output.py); the driver packs these results into shards (pipelines/pack.py).

Attempt markers live here too: they count the workers that died holding a source, so that one
that keeps killing them becomes a reject (pipelines/crash_guard.py decides when).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.output import SAMPLES, TMP_MARK, WORK_DIR, OutputDir, storage_errors

SOURCE_META_KEY = b"reelforge.source"


def work_keys(out: OutputDir) -> set[str]:
    """Keys of sources whose work result is complete (the parquet is renamed into place last)."""
    return {
        name.removeprefix(f"{WORK_DIR}/").removesuffix(".parquet")
        for name in out.list(WORK_DIR)
        if name.endswith(".parquet") and TMP_MARK not in name and name != SAMPLES
    }


def write_source_result(
    out: OutputDir, source: dict[str, Any], clips: Iterable[dict[str, Any]], before_commit: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Stream one source's clip rows into `_work/<key>.tar` (mp4 bytes) and `_work/<key>.parquet`
    (everything else, with `source` as file metadata). Consumes `clips` lazily, so a generator
    keeps only one clip's bytes in memory. Returns a small summary row for progress.

    Both files are written under temp names first; then the lease is checked (a worker of a
    superseded run raises Superseded here), `before_commit` runs, and both are renamed, the parquet
    last. An exception from `clips` (the source's processing) passes through unchanged; a failure
    of our own storage comes out as StorageError. Either way the temp files go and nothing commits.
    `source` is read once `clips` is consumed, so the processing may complete its facts (the
    duration of a bare stream is known when its decode ends)."""
    key = source["source_key"]
    tar_name, table_name = f"{WORK_DIR}/{key}.tar", f"{WORK_DIR}/{key}.parquet"
    tar_temp, table_temp = out.temp_name(tar_name), None
    try:
        rows = _write_tar(out, tar_temp, clips)
        if out.lease is not None:  # which run wrote it: the source facts travel as file metadata
            source = source | {"run_id": out.lease.run_id, "epoch": out.lease.epoch}
        table = rows_to_table(rows) if rows else pa.table({})
        table = table.replace_schema_metadata({SOURCE_META_KEY: json.dumps(source, default=str).encode()})
        table_temp = out.write_table(table_name, table, commit=False)
        out.check_fence()
        if before_commit is not None:
            before_commit()
        out.commit(tar_temp, tar_name)
        out.commit(table_temp, table_name)  # the done marker, last
    except BaseException:
        out.discard(tar_temp, table_temp)
        raise
    return source_summary(source, rows)


def _write_tar(out: OutputDir, temp: str, clips: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept clips' mp4 bytes into tar `temp`, as `clips` yields them; returns the rows without bytes."""
    rows: list[dict[str, Any]] = []
    what = f"cannot write {out.path(temp)}"
    stream, tar = out.open_output(temp), None
    try:
        # tarfile, not webdataset's TarWriter as for shards: this tar is our own scratch format, and
        # importing webdataset (it imports torch) would cost every actor ~1.5 s of CPU and 180 MB.
        tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
        for row in clips:  # the source's processing runs here; its errors pass through as they are
            mp4 = row.pop("mp4", None)
            if mp4 and row.get("status") == "kept":
                member = tarfile.TarInfo(f"{row['id']}.mp4")  # mtime 0, mode 0644, no owner: fixed
                member.size = len(mp4)
                with storage_errors(what):
                    tar.addfile(member, io.BytesIO(mp4))
            rows.append(row)
        with storage_errors(what):
            tar.close()
            stream.close()  # on an object store, this is where the upload completes
    except BaseException:
        for close in (tar.close if tar is not None else None, stream.close):
            try:
                if close is not None:
                    close()  # tar first: once closed, it will not flush into a closed stream later
            except (OSError, ValueError):
                pass
        raise
    return rows


def read_work(out: OutputDir, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(source facts, clip rows without thumbnails) of one finished work result."""
    # One open and one footer parse per result: the driver reads a result per source when packing.
    with out.fs.open_input_file(out.path(f"{WORK_DIR}/{key}.parquet")) as handle:
        table_file = pq.ParquetFile(handle)
        schema = table_file.schema_arrow
        source = json.loads(schema.metadata[SOURCE_META_KEY])
        columns = [name for name in schema.names if name != "thumbnail"]
        rows = table_file.read(columns=columns).to_pylist() if columns else []
    return source, [row | {"source_key": key} for row in rows]


def delete_work(out: OutputDir, key: str) -> None:
    out.delete(f"{WORK_DIR}/{key}.parquet")  # the done marker first: a tar alone is just garbage
    out.delete(f"{WORK_DIR}/{key}.tar")


def work_summary(out: OutputDir, key: str) -> dict[str, Any]:
    """The summary row write_source_result returned for an already finished work result."""
    source, rows = read_work(out, key)
    return source_summary(source, rows)


def source_summary(source: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = sum(1 for r in rows if r.get("status") == "kept")
    return {
        "source_key": source["source_key"],
        "uri": source["uri"],
        "rejected": source.get("reject_stage") is not None,
        "reject_stage": source.get("reject_stage"),
        "reject_reason": source.get("reject_reason"),
        "codec": source.get("codec"),
        "clips_kept": kept,
        "clips_rejected": len(rows) - kept,
    }


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows → table with the union of their keys (from_pylist alone takes the first row's keys and
    silently drops the rest, e.g. score columns present only on filtered clips)."""
    names = dict.fromkeys(key for row in rows for key in row)
    return pa.table({name: pa.array([row.get(name) for row in rows]) for name in names})


# --- attempts: a source that kills its worker becomes a reject, not an endless retry -------
#
# Ray restarts a dead actor (or reruns a dead task) and sends it the same source again, as often
# as it takes. A source that crashes FFmpeg or exhausts memory would do that forever, so before
# working on a source a worker records an attempt marker `_work/<key>.<stage>-attempt-<n>`
# (its pid, host and the run's epoch), and clears the source's markers once its outcome is
# written. A worker that finds `max_attempts` markers of workers of its own run that died with
# the source in hand writes a "crash" reject (pipelines/crash_guard.py decides).

ATTEMPT_MARK = "-attempt-"
# Markers read per source at most: each run adds at most max_attempts, plus one per killed run.
MAX_MARKERS = 64


def _attempt_name(key: str, stage: str, number: int) -> str:
    return f"{WORK_DIR}/{key}.{stage}{ATTEMPT_MARK}{number}"


def read_attempts(out: OutputDir, key: str, stage: str, limit: int = MAX_MARKERS) -> list[dict[str, Any]]:
    """Markers of earlier attempts at `key` in `stage`, oldest first, at most `limit`. Probes names
    one by one instead of listing _work, which holds a file per source."""
    attempts = []
    while len(attempts) < limit and out.exists(name := _attempt_name(key, stage, len(attempts) + 1)):
        attempts.append(json.loads(out.read_bytes(name)))
    return attempts


def record_attempt(out: OutputDir, key: str, stage: str, number: int, info: dict[str, Any]) -> None:
    out.write_bytes(_attempt_name(key, stage, number), json.dumps(info, sort_keys=True).encode())


def clear_attempts(out: OutputDir, key: str, stage: str, count: int | None = None, first: int = 1) -> None:
    """Delete markers first..count, or, with count None, every marker from `first` on."""
    number = first
    while number <= count if count is not None else out.exists(_attempt_name(key, stage, number)):
        out.delete(_attempt_name(key, stage, number))
        number += 1
