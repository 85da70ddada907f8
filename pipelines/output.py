"""The ingest output folder: its layout, how files get into it, and the config it was made with.

Layout of `--out` (docs/data-format.md is the reference):

    shard-000000.tar ...   WebDataset samples {id}.json / {id}.mp4 / {id}.txt
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
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
SAMPLES = f"{WORK_DIR}/report-samples.parquet"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_MARK = ".tmp-"


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


# --- tar files: the same bytes in give the same tar out ----------------------------------


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


# --- the commit record, the success marker, leftovers ------------------------------------


def committed_keys(out: OutputDir) -> set[str]:
    """Keys of the sources `sources.parquet` records: packed and committed."""
    table = out.read_table(SOURCES, columns=["source_key"])
    return set() if table is None else set(table.column("source_key").to_pylist())


def mark_success(out: OutputDir) -> None:
    out.write_bytes(SUCCESS, b"")


def clear_success(out: OutputDir) -> None:
    out.delete(SUCCESS)


def remove_temp_files(out: OutputDir) -> None:
    """Temp files are what a killed run was writing; never complete, always safe to drop."""
    for name in out.list() + out.list(WORK_DIR):
        if TMP_MARK in name:
            out.delete(name)
