"""The ingest output folder: per-source work results, deterministic shard packing, tables, stats.

Layout of `--out` (docs/data-format.md is the reference):

    shard-000000.tar ...   WebDataset samples {id}.mp4 / {id}.json / {id}.txt
    manifest.parquet       one row per kept clip: its metadata + `shard` + `source_key`
    rejects.parquet        one row per rejected source or clip: uri, id, stage, reason, score, threshold, ...
    sources.parquet        one row per finished source; THE commit record (see below)
    stats.json, report.html, _SUCCESS (written last)
    _work/config.json      ingest-relevant config of this output (refuse to mix configs)
    _work/<key>.tar        kept clips of one source ({id}.mp4), written by the worker
    _work/<key>.parquet    that source's clip rows + source facts; its existence = source done
    _work/report-samples.parquet  the bounded thumbnail sample report.html shows

Crash safety, and why reruns are byte-identical:

1. Workers write each source's result to temp names and rename (tar first, parquet last), so a
   source is either absent or complete. A SIGKILL loses at most the sources in flight.
2. The driver packs only after every source of the run is done. Packing is a pure function of
   (committed tables, finished work results): clips sorted by (source sha256, uri, start),
   near-duplicates dropped in that order, tar members with fixed mtime/uid/gid/mode.
3. Tables are rewritten with temp + rename; `sources.parquet` goes last and is the commit point.
   Rows of not-yet-committed sources found in manifest/rejects (an interrupted pack) are
   dropped and repacked, and shard numbering restarts after the last committed shard, so an
   interrupted pack is simply redone with the same bytes. Shard files no committed row names
   are leftovers of such a pack and are deleted.
4. After the commit, work results of committed sources are deleted (they hold a second copy
   of every clip).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from model.storage import resolve_uri
from pipelines.dedup import NearDuplicateIndex

logger = logging.getLogger(__name__)

WORK_DIR = "_work"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SOURCES = "sources.parquet"
STATS = "stats.json"
REPORT = "report.html"
SUCCESS = "_SUCCESS"
CONFIG = f"{WORK_DIR}/config.json"
SAMPLES = f"{WORK_DIR}/report-samples.parquet"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_MARK = ".tmp-"
SOURCE_META_KEY = b"reelforge.source"
# Columns of a processor row that describe a rejection, not the clip; they never reach the manifest.
REJECT_FIELDS = ("status", "reject_stage", "reject_reason", "reject_score", "reject_threshold")
# Kept clips and rejects per reason that report.html shows; chosen by hash of id, so the sample
# is stable across incremental runs and bounded whatever the corpus size.
SAMPLES_KEPT = 24
SAMPLES_PER_REASON = 8
# Whole-source rejects of a run that stats.json (and the end-of-run summary) name with their reason.
STATS_SOURCE_REJECTS = 20


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


class OutputDir:
    """`--out` as (pyarrow filesystem, root); picklable by its uri, so workers rebuild it."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, root = resolve_uri(uri)
        self.root = root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (OutputDir, (self.uri,))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to root) of the files directly in `folder`."""
        base = self.path(folder) if folder else self.root
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        prefix = f"{folder}/" if folder else ""
        return sorted(prefix + info.base_name for info in infos if info.type == pafs.FileType.File)

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def temp_name(self, name: str) -> str:
        return f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"

    def commit(self, temp: str, name: str) -> None:
        """Rename a finished temp file into place (atomic on POSIX; a single PUT on object stores)."""
        self.fs.move(self.path(temp), self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        temp = self.temp_name(name)
        with self.fs.open_output_stream(self.path(temp)) as stream:
            stream.write(data)
        self.commit(temp, name)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as stream:
            return stream.read()

    def write_table(self, name: str, table: pa.Table) -> None:
        temp = self.temp_name(name)
        pq.write_table(table, self.path(temp), filesystem=self.fs)
        self.commit(temp, name)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        if not self.exists(name):
            return None
        return pq.read_table(self.path(name), filesystem=self.fs, columns=columns)

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path(WORK_DIR), recursive=True)


# --- config record: one output folder, one ingest config ---------------------------------


def owned_names(out: OutputDir) -> list[str]:
    """The files in `out` that reelforge ingest wrote (what --new-output clears)."""
    ours = {MANIFEST, REJECTS, SOURCES, STATS, REPORT, SUCCESS}
    top = [n for n in out.list() if n in ours or SHARD_RE.match(n.split(TMP_MARK)[0]) or _is_temp_of(n, ours)]
    return top + out.list(WORK_DIR)


def _is_temp_of(name: str, ours: set[str]) -> bool:
    return TMP_MARK in name and name.split(TMP_MARK)[0] in ours


def check_config(out: OutputDir, sections: dict[str, Any], config_hash: str, new_output: bool) -> None:
    """Record the ingest config in a fresh output, or refuse to mix a different one into it.

    `--new-output` deletes the files this command owns in `out` (shards, tables, report,
    _work/) and leaves anything else there alone."""
    record = {"config_hash": config_hash, "sections": sections}
    owned = owned_names(out)
    if new_output and owned:
        logger.warning("--new-output: deleting %d reelforge files from %s", len(owned), out.uri)
        for name in owned:
            out.delete(name)
        owned = []
    if owned and out.exists(CONFIG):
        previous = json.loads(out.read_bytes(CONFIG))
        if previous["config_hash"] != config_hash:
            changed = _diff(previous["sections"], sections)
            raise ValueError(
                f"--out {out.uri} holds an ingest made with another config (hash {previous['config_hash']}, "
                f"this run {config_hash}; changed: {changed}); use the same config, another --out, or --new-output"
            )
        return
    if owned and not out.exists(CONFIG):
        raise ValueError(f"--out {out.uri} holds reelforge files but no {CONFIG}; use another --out or --new-output")
    out.make_dirs()
    out.write_bytes(CONFIG, json.dumps(record, indent=2, sort_keys=True).encode())


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return ", ".join(changes)


# --- worker side: one source's result, all or nothing ------------------------------------


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
        with out.fs.open_output_stream(out.path(tar_temp)) as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
            for row in clips:
                mp4 = row.pop("mp4", None)
                if mp4 and row.get("status") == "kept":
                    _add_member(tar, f"{row['id']}.mp4", mp4)
                rows.append(row)
        out.commit(tar_temp, tar_name)
    except BaseException:
        out.delete(tar_temp)
        raise
    table = rows_to_table(rows) if rows else pa.table({})
    table = table.replace_schema_metadata({SOURCE_META_KEY: json.dumps(source, default=str).encode()})
    out.write_table(table_name, table)
    return _summary(source, rows)


def work_summary(out: OutputDir, key: str) -> dict[str, Any]:
    """The summary row write_source_result returned for an already finished work result."""
    source, rows = _read_work(out, key)
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


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows → table with the union of their keys (from_pylist alone takes the first row's keys and
    silently drops the rest, e.g. score columns present only on filtered clips)."""
    names = dict.fromkeys(key for row in rows for key in row)
    return pa.table({name: pa.array([row.get(name) for row in rows]) for name in names})


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same bytes in give the same tar out, whoever packs it and when.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # header + data padded to 512-byte blocks


# --- driver side: deterministic pack and commit ------------------------------------------


@dataclass
class PackResult:
    sources: int = 0
    sources_rejected: int = 0
    clips_kept: int = 0
    clips_rejected: int = 0
    shards: list[str] = field(default_factory=list)
    source_seconds: float = 0.0
    clip_seconds: float = 0.0
    rejected_by_stage: Counter = field(default_factory=Counter)
    # (uri, stage, reason) of every source rejected whole in this run, for the end-of-run summary.
    source_rejects: list[dict[str, Any]] = field(default_factory=list)


def committed_keys(out: OutputDir) -> set[str]:
    table = out.read_table(SOURCES, columns=["source_key"])
    return set() if table is None else set(table.column("source_key").to_pylist())


def pack(out: OutputDir, dedup_hamming: int | None, target_mb: float) -> PackResult:
    """Commit every finished, uncommitted work result: dedup, write new shards, merge tables."""
    committed = committed_keys(out)
    for name in out.list(WORK_DIR):  # left by a run killed between its commit and its cleanup
        if name.removeprefix(f"{WORK_DIR}/").rsplit(".", 1)[0] in committed:
            out.delete(name)
    new_keys = sorted(work_keys(out) - committed)
    result = PackResult()
    if not new_keys:
        return result
    manifest = _without_keys(out.read_table(MANIFEST), new_keys)
    rejects = _without_keys(out.read_table(REJECTS), new_keys)
    sources = out.read_table(SOURCES)
    committed_shards = set(manifest.column("shard").to_pylist()) if manifest is not None else set()
    _delete_uncommitted_shards(out, committed_shards)
    next_shard = 1 + max((int(SHARD_RE.match(s)[1]) for s in committed_shards), default=-1)

    work = sorted((_read_work(out, key) for key in new_keys), key=lambda w: (w[0].get("sha256") or "", w[0]["uri"]))
    index = NearDuplicateIndex(dedup_hamming if dedup_hamming is not None else 0)
    seen_ids: set[str] = set()
    if manifest is not None:
        for clip_id, phash in zip(manifest.column("id").to_pylist(), manifest.column("phash").to_pylist()):
            seen_ids.add(clip_id)
            if phash:
                index.add(clip_id, phash)

    kept_rows: list[dict[str, Any]] = []  # (metadata) in shard order
    reject_rows: list[dict[str, Any]] = []
    source_rows: list[dict[str, Any]] = []
    for source, clips in work:
        source, clips = _whole_source_failure(source, clips)
        kept_before = len(kept_rows)
        rejected_before = len(reject_rows)
        if source.get("reject_stage"):
            reject_rows.append(_source_reject(source))
            result.source_rejects.append({k: reject_rows[-1][k] for k in ("uri", "stage", "reason")})
        for row in sorted(clips, key=lambda r: (r.get("start_s") or 0.0, r.get("id") or "")):
            reason = _dedup_reason(row, seen_ids, index, dedup_hamming)
            if row.get("status") != "kept" or reason is not None:
                reject_rows.append(_clip_reject(source, row, reason, dedup_hamming))
                continue
            seen_ids.add(row["id"])
            kept_rows.append(row)
        result.sources += 1
        result.sources_rejected += bool(source.get("reject_stage"))
        result.source_seconds += float(source.get("duration_s") or 0.0)
        source_rows.append(_source_row(source, len(kept_rows) - kept_before, len(reject_rows) - rejected_before))

    shard_of = _write_shards(out, work, kept_rows, next_shard, target_mb, result)
    manifest_rows = [_metadata(row) | {"shard": shard_of[row["id"]], "source_key": row["source_key"]} for row in kept_rows]
    result.clips_kept = len(kept_rows)
    result.clip_seconds = sum(float(r["end_s"]) - float(r["start_s"]) for r in kept_rows)
    result.clips_rejected = sum(1 for r in reject_rows if r["id"] is not None)
    result.rejected_by_stage = Counter(r["stage"] for r in reject_rows)

    out.write_table(MANIFEST, _concat(manifest, manifest_rows, MANIFEST))
    out.write_table(REJECTS, _concat(rejects, reject_rows, REJECTS))
    _update_samples(out, work, kept_rows, reject_rows)
    out.write_table(SOURCES, _concat(sources, source_rows, SOURCES))  # the commit point
    for key in new_keys:
        _delete_work(out, key)
    return result


def _delete_work(out: OutputDir, key: str) -> None:
    out.delete(f"{WORK_DIR}/{key}.parquet")  # the done marker first: a tar alone is just garbage
    out.delete(f"{WORK_DIR}/{key}.tar")


def _dedup_reason(
    row: dict[str, Any], seen_ids: set[str], index: NearDuplicateIndex, dedup_hamming: int | None
) -> tuple[str, int] | None:
    """(reason, distance) when a kept clip repeats an earlier one, else None (and it joins the index)."""
    if row.get("status") != "kept":
        return None
    if row["id"] in seen_ids:
        # Same id = same source bytes and same cut: a second copy of a file already ingested.
        return f"duplicate of {row['id']} (same source content)", 0
    phash = row.get("phash")
    if dedup_hamming is None or not phash:
        return None
    match = index.nearest(phash)
    if match is not None:
        return f"near-duplicate of {match[0]}", match[1]
    index.add(row["id"], phash)
    return None


def _whole_source_failure(source: dict[str, Any], clips: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A processor row that rejects the whole source (a probe reject passed through, or "decode
    error at 0.0 s") makes the source rejected, reported with a null clip id like a probe reject."""
    if len(clips) == 1 and clips[0].get("reject_stage") in ("probe", "decode") and not clips[0].get("start_s"):
        row = clips[0]
        return source | {"reject_stage": row["reject_stage"], "reject_reason": row.get("reject_reason")}, []
    return source, clips


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """Clip metadata as stored in the sample's json and the manifest (no bytes, no reject fields)."""
    return {k: v for k, v in row.items() if k not in REJECT_FIELDS and k not in ("mp4", "thumbnail", "source_key")}


def _source_reject(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "uri": source["uri"],
        "id": None,
        "stage": source["reject_stage"],
        "reason": source.get("reject_reason"),
        "score": None,
        "threshold": None,
        "source_key": source["source_key"],
        "source_sha256": source.get("sha256"),
        "start_s": None,
        "end_s": None,
    }


def _clip_reject(
    source: dict[str, Any], row: dict[str, Any], dedup: tuple[str, int] | None, dedup_hamming: int | None
) -> dict[str, Any]:
    if dedup is not None:
        stage, reason, score, threshold = "dedup", dedup[0], dedup[1], dedup_hamming
    else:
        stage, reason = row.get("reject_stage") or "process", row.get("reject_reason")
        score, threshold = row.get("reject_score"), row.get("reject_threshold")
    scores = {k: v for k, v in row.items() if k.startswith("score_")}
    return {
        "uri": source["uri"],
        "id": row.get("id"),
        "stage": stage,
        "reason": reason,
        "score": None if score is None else float(score),
        "threshold": None if threshold is None else float(threshold),
        "source_key": source["source_key"],
        "source_sha256": source.get("sha256"),
        "start_s": row.get("start_s"),
        "end_s": row.get("end_s"),
    } | scores


def _source_row(source: dict[str, Any], kept: int, rejected: int) -> dict[str, Any]:
    return {
        "source_key": source["source_key"],
        "uri": source["uri"],
        "size_bytes": source.get("size_bytes"),
        "mtime_ns": source.get("mtime_ns"),
        "sha256": source.get("sha256"),
        "duration_s": source.get("duration_s"),
        "codec": source.get("codec"),
        "width": source.get("width"),
        "height": source.get("height"),
        "fps": source.get("fps"),
        "status": "rejected" if source.get("reject_stage") else "ok",
        "reject_stage": source.get("reject_stage"),
        "reject_reason": source.get("reject_reason"),
        "clips_kept": kept,
        "clips_rejected": rejected,
    }


def _read_work(out: OutputDir, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(source facts, clip rows without thumbnails) of one finished work result."""
    path = out.path(f"{WORK_DIR}/{key}.parquet")
    schema = pq.read_schema(path, filesystem=out.fs)
    source = json.loads(schema.metadata[SOURCE_META_KEY])
    columns = [name for name in schema.names if name != "thumbnail"]
    rows = pq.read_table(path, filesystem=out.fs, columns=columns).to_pylist() if columns else []
    return source, [row | {"source_key": key} for row in rows]


def _write_shards(
    out: OutputDir,
    work: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    kept_rows: list[dict[str, Any]],
    next_shard: int,
    target_mb: float,
    result: PackResult,
) -> dict[str, str]:
    """Write kept clips, in order, into shards of about `target_mb`; returns {clip id: shard name}."""
    target_bytes = int(target_mb * 1024 * 1024)
    shard_of: dict[str, str] = {}
    writer: _ShardWriter | None = None
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in kept_rows:
        by_key.setdefault(row["source_key"], []).append(row)
    progress = tqdm(total=len(kept_rows), desc="writing shards", unit="clip", disable=not kept_rows)
    for source, _ in work:
        rows = by_key.get(source["source_key"], [])
        if not rows:
            continue
        with out.fs.open_input_file(out.path(f"{WORK_DIR}/{source['source_key']}.tar")) as handle:
            with tarfile.open(fileobj=handle, mode="r:") as work_tar:
                for row in rows:
                    mp4 = work_tar.extractfile(f"{row['id']}.mp4").read()
                    metadata = json.dumps(_metadata(row), sort_keys=True, default=str).encode()
                    caption = (row.get("caption") or "").encode()
                    size = sum(_member_bytes(len(b)) for b in (mp4, metadata, caption))
                    if writer is not None and writer.size + size > target_bytes:
                        result.shards.append(writer.close())
                        writer = None
                    if writer is None:
                        writer = _ShardWriter(out, shard_name(next_shard))
                        next_shard += 1
                    writer.add(row["id"], mp4, metadata, caption)
                    shard_of[row["id"]] = writer.name
                    progress.update()
    if writer is not None:
        result.shards.append(writer.close())
    progress.close()
    return shard_of


class _ShardWriter:
    """One shard being written under a temp name; renamed into place by close()."""

    def __init__(self, out: OutputDir, name: str) -> None:
        self.out, self.name = out, name
        self.temp = out.temp_name(name)
        self.stream = out.fs.open_output_stream(out.path(self.temp))
        self.tar = tarfile.open(fileobj=self.stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.size = 0

    def add(self, clip_id: str, mp4: bytes, metadata: bytes, caption: bytes) -> None:
        # WebDataset groups consecutive members by the name before the first dot: the clip id.
        for suffix, data in (("mp4", mp4), ("json", metadata), ("txt", caption)):
            _add_member(self.tar, f"{clip_id}.{suffix}", data)
            self.size += _member_bytes(len(data))

    def close(self) -> str:
        self.tar.close()
        self.stream.close()
        self.out.commit(self.temp, self.name)
        return self.name


def _delete_uncommitted_shards(out: OutputDir, committed_shards: set[str]) -> None:
    for name in out.list():
        base = name.split(TMP_MARK)[0]
        if SHARD_RE.match(base) and (TMP_MARK in name or name not in committed_shards):
            logger.info("removing %s, left over from an interrupted pack", name)
            out.delete(name)


def _without_keys(table: pa.Table | None, keys: list[str]) -> pa.Table | None:
    """`table` minus rows of `keys`: rows an interrupted pack wrote before its commit."""
    if table is None or "source_key" not in table.column_names:
        return table
    drop = set(keys)
    mask = pa.array([k not in drop for k in table.column("source_key").to_pylist()], pa.bool_())
    return table.filter(mask)


# The columns an empty table still has, so readers never meet a table without its key columns.
_EMPTY = {
    MANIFEST: pa.schema([("id", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("phash", pa.string()),
                         ("shard", pa.string()), ("source_key", pa.string())]),
    REJECTS: pa.schema([("uri", pa.string()), ("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                        ("score", pa.float64()), ("threshold", pa.float64()), ("source_key", pa.string())]),
}  # fmt: skip


def _concat(table: pa.Table | None, rows: list[dict[str, Any]], name: str) -> pa.Table:
    new = rows_to_table(rows) if rows else None
    parts = [t for t in (table, new) if t is not None]
    if not parts:
        return _EMPTY[name].empty_table()
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


# --- report sample: a bounded, deterministic set of thumbnails ---------------------------


def _sample_rank(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode()).hexdigest()


def _update_samples(
    out: OutputDir,
    work: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    kept_rows: list[dict[str, Any]],
    reject_rows: list[dict[str, Any]],
) -> None:
    """Merge this run's candidates into the thumbnail sample: per group ("kept" or a reject
    stage) the clips with the smallest sha1(id), so the sample never depends on run order."""
    # (group, id) -> (rank, reason); an id can be kept once and rejected as an exact copy elsewhere.
    candidates: dict[tuple[str, str], tuple[str, str | None]] = {}
    for row in kept_rows:
        candidates["kept", row["id"]] = (_sample_rank(row["id"]), None)
    for row in reject_rows:
        if row["id"] is not None:
            candidates[row["stage"], row["id"]] = (_sample_rank(row["id"]), row["reason"])
    ranked: dict[str, list[tuple[str, str]]] = {}
    for (group, clip_id), (rank, _) in candidates.items():
        ranked.setdefault(group, []).append((rank, clip_id))
    wanted = {
        (group, clip_id)
        for group, pairs in ranked.items()
        for _, clip_id in sorted(pairs)[: SAMPLES_KEPT if group == "kept" else SAMPLES_PER_REASON]
    }
    # One id is one picture (same source bytes, same span), so any copy of its thumbnail will do.
    wanted_ids = {clip_id for _, clip_id in wanted}
    thumbnails: dict[str, bytes] = {}
    for source, _ in work:
        path = out.path(f"{WORK_DIR}/{source['source_key']}.parquet")
        if not {"id", "thumbnail"} <= set(pq.read_schema(path, filesystem=out.fs).names):
            continue
        table = pq.read_table(path, filesystem=out.fs, columns=["id", "thumbnail"])
        for clip_id, thumbnail in zip(table.column("id").to_pylist(), table.column("thumbnail").to_pylist()):
            if clip_id in wanted_ids and thumbnail:
                thumbnails.setdefault(clip_id, thumbnail)
    new_rows = [
        {"id": clip_id, "group": group, "rank": candidates[group, clip_id][0], "reason": candidates[group, clip_id][1],
         "thumbnail": thumbnails[clip_id]}
        for group, clip_id in sorted(wanted)
        if clip_id in thumbnails
    ]  # fmt: skip
    merged = (out.read_table(SAMPLES).to_pylist() if out.exists(SAMPLES) else []) + new_rows
    keep: dict[str, list[dict[str, Any]]] = {}
    for row in sorted({(r["group"], r["id"]): r for r in merged}.values(), key=lambda r: (r["group"], r["rank"])):
        limit = SAMPLES_KEPT if row["group"] == "kept" else SAMPLES_PER_REASON
        bucket = keep.setdefault(row["group"], [])
        if len(bucket) < limit:
            bucket.append(row)
    rows = [row for bucket in keep.values() for row in bucket]
    if rows:
        out.write_table(SAMPLES, pa.Table.from_pylist(rows))


# --- stats and the success marker ---------------------------------------------------------


def write_stats(
    out: OutputDir, run: PackResult, wall_s: float, phase_s: dict[str, float], config_hash: str, versions: dict[str, str]
) -> dict[str, Any]:
    """stats.json: totals over the whole output plus this run's numbers; returns it."""
    manifest = out.read_table(MANIFEST, columns=["start_s", "end_s"])
    rejects = out.read_table(REJECTS, columns=["id", "stage"])
    sources = out.read_table(SOURCES, columns=["status", "duration_s"])
    source_status = sources.column("status").to_pylist() if sources is not None else []
    reject_ids = rejects.column("id").to_pylist() if rejects is not None else []
    reject_stages = rejects.column("stage").to_pylist() if rejects is not None else []
    clip_seconds = 0.0
    if manifest is not None and manifest.num_rows:
        clip_seconds = sum(e - s for s, e in zip(manifest.column("start_s").to_pylist(), manifest.column("end_s").to_pylist()))
    stats = {
        "sources": {"total": len(source_status), "ok": source_status.count("ok"), "rejected": source_status.count("rejected")},
        "clips": {
            "kept": manifest.num_rows if manifest is not None else 0,
            "rejected": sum(1 for i in reject_ids if i is not None),
            "rejected_by_stage": dict(sorted(Counter(s for i, s in zip(reject_ids, reject_stages) if i is not None).items())),
        },
        "sources_rejected_by_stage": dict(sorted(Counter(s for i, s in zip(reject_ids, reject_stages) if i is None).items())),
        "source_seconds": sum(d or 0.0 for d in sources.column("duration_s").to_pylist()) if sources is not None else 0.0,
        "clip_seconds": clip_seconds,
        "shards": sorted(n for n in out.list() if SHARD_RE.match(n)),
        "config_hash": config_hash,
        "versions": versions,
        "last_run": {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(wall_s, 3),
            "phase_s": {name: round(seconds, 3) for name, seconds in phase_s.items()},
            "sources": run.sources,
            "sources_rejected": run.sources_rejected,
            "clips_kept": run.clips_kept,
            "clips_rejected": run.clips_rejected,
            "rejected_by_stage": dict(sorted(run.rejected_by_stage.items())),
            # The first few whole-source rejects with their reasons (all are in rejects.parquet).
            "rejected_sources": sorted(run.source_rejects, key=lambda r: r["uri"])[:STATS_SOURCE_REJECTS],
            "new_shards": run.shards,
            "source_seconds": round(run.source_seconds, 3),
            "clip_seconds": round(run.clip_seconds, 3),
            "source_seconds_per_wall_s": round(run.source_seconds / wall_s, 3) if wall_s > 0 else None,
        },
    }
    out.write_bytes(STATS, json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


def mark_success(out: OutputDir) -> None:
    out.write_bytes(SUCCESS, b"")


def clear_success(out: OutputDir) -> None:
    out.delete(SUCCESS)


def remove_temp_files(out: OutputDir) -> None:
    """Temp files are what a killed run was writing; never complete, always safe to drop."""
    for name in out.list() + out.list(WORK_DIR):
        if TMP_MARK in name:
            out.delete(name)
