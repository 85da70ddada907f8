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
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.output import SAMPLES, TMP_MARK, WORK_DIR, OutputDir

SOURCE_META_KEY = b"reelforge.source"


def work_keys(out: OutputDir) -> set[str]:
    """Keys of sources whose work result is complete (the parquet is renamed into place last)."""
    return {
        name.removeprefix(f"{WORK_DIR}/").removesuffix(".parquet")
        for name in out.list(WORK_DIR)
        if name.endswith(".parquet") and TMP_MARK not in name and name != SAMPLES
    }


def write_source_result(out: OutputDir, source: dict[str, Any], clips: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Stream one source's clip rows into `_work/<key>.tar` (mp4 bytes) and `_work/<key>.parquet`
    (everything else, with `source` as file metadata). Consumes `clips` lazily, so a generator
    keeps only one clip's bytes in memory. Returns a small summary row for progress."""
    key = source["source_key"]
    tar_name, table_name = f"{WORK_DIR}/{key}.tar", f"{WORK_DIR}/{key}.parquet"
    tar_temp = out.temp_name(tar_name)
    rows: list[dict[str, Any]] = []
    try:
        # tarfile, not webdataset's TarWriter as for shards: this tar is our own scratch format, and
        # importing webdataset (it imports torch) would cost every actor ~1.5 s of CPU and 180 MB.
        with out.fs.open_output_stream(out.path(tar_temp)) as stream, tarfile.open(
            fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT
        ) as tar:
            for row in clips:
                mp4 = row.pop("mp4", None)
                if mp4 and row.get("status") == "kept":
                    member = tarfile.TarInfo(f"{row['id']}.mp4")  # mtime 0, mode 0644, no owner: fixed
                    member.size = len(mp4)
                    tar.addfile(member, io.BytesIO(mp4))
                rows.append(row)
        out.commit(tar_temp, tar_name)
    except BaseException:
        out.delete(tar_temp)
        raise
    table = rows_to_table(rows) if rows else pa.table({})
    table = table.replace_schema_metadata({SOURCE_META_KEY: json.dumps(source, default=str).encode()})
    out.write_table(table_name, table)
    return _summary(source, rows)


def read_work(out: OutputDir, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(source facts, clip rows without thumbnails) of one finished work result."""
    path = out.path(f"{WORK_DIR}/{key}.parquet")
    schema = pq.read_schema(path, filesystem=out.fs)
    source = json.loads(schema.metadata[SOURCE_META_KEY])
    columns = [name for name in schema.names if name != "thumbnail"]
    rows = pq.read_table(path, filesystem=out.fs, columns=columns).to_pylist() if columns else []
    return source, [row | {"source_key": key} for row in rows]


def delete_work(out: OutputDir, key: str) -> None:
    out.delete(f"{WORK_DIR}/{key}.parquet")  # the done marker first: a tar alone is just garbage
    out.delete(f"{WORK_DIR}/{key}.tar")


def work_summary(out: OutputDir, key: str) -> dict[str, Any]:
    """The summary row write_source_result returned for an already finished work result."""
    source, rows = read_work(out, key)
    return _summary(source, rows)


def _summary(source: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = sum(1 for r in rows if r.get("status") == "kept")
    return {
        "source_key": source["source_key"],
        "uri": source["uri"],
        "rejected": source.get("reject_stage") is not None,
        "reject_stage": source.get("reject_stage"),
        "reject_reason": source.get("reject_reason"),
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
# working on a source a worker records an attempt marker `_work/<key>.<stage>-attempt-<n>`, and
# clears its markers once the source's outcome is written. A worker that finds `max_attempts`
# markers knows every earlier attempt died with the source in hand: it writes a "crash" reject.
# Markers live in --out, so they also count attempts of runs whose driver was killed with them.

ATTEMPT_MARK = "-attempt-"


def _attempt_name(key: str, stage: str, number: int) -> str:
    return f"{WORK_DIR}/{key}.{stage}{ATTEMPT_MARK}{number}"


def read_attempts(out: OutputDir, key: str, stage: str, limit: int) -> list[dict[str, Any]]:
    """Markers of earlier attempts at `key` in `stage`, oldest first, at most `limit`. Probes names
    one by one instead of listing _work, which holds a file per source."""
    attempts = []
    while len(attempts) < limit and out.exists(name := _attempt_name(key, stage, len(attempts) + 1)):
        attempts.append(json.loads(out.read_bytes(name)))
    return attempts


def record_attempt(out: OutputDir, key: str, stage: str, number: int, info: dict[str, Any]) -> None:
    out.write_bytes(_attempt_name(key, stage, number), json.dumps(info, sort_keys=True).encode())


def clear_attempts(out: OutputDir, key: str, stage: str, count: int | None = None) -> None:
    """Delete markers 1..count, or, with count None, every marker there is."""
    number = 1
    while number <= count if count is not None else out.exists(_attempt_name(key, stage, number)):
        out.delete(_attempt_name(key, stage, number))
        number += 1
