"""Packing: finished work results → deduplicated clips in new shards, merged tables, stats.

Runs on the driver once every source of a run is done (steps 2-4 of the crash-safety list in
pipelines/output.py). It is a pure function of the committed tables and the finished work
results, so a pack interrupted at any point is redone with the same bytes:

1. Read every uncommitted work result; order sources by (sha256, uri), clips by start.
2. Drop exact copies and near-duplicates (phash within `filters.dedup_hamming` bits) against
   the manifest and the clips kept before them in that order.
3. Copy kept clips one at a time from the work tars into new shards of about `target_mb`,
   numbered after the last committed shard (temp name, then rename).
4. Rewrite manifest.parquet, rejects.parquet, the report sample, then sources.parquet: the commit.
5. Delete the packed work results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.dedup import NearDuplicateIndex
from pipelines.output import (
    MANIFEST,
    REJECTS,
    SAMPLES,
    SHARD_RE,
    SOURCES,
    STATS,
    TMP_MARK,
    WORK_DIR,
    OutputDir,
    committed_keys,
    shard_name,
)
from pipelines.work import delete_work, read_work, rows_to_table, work_keys

if TYPE_CHECKING:
    import webdataset

logger = logging.getLogger(__name__)

# Columns of a processor row that describe a rejection, not the clip; they never reach the manifest.
REJECT_FIELDS = ("status", "reject_stage", "reject_reason", "reject_score", "reject_threshold")
# Kept clips and rejects per reason that report.html shows; chosen by hash of id, so the sample
# is stable across incremental runs and bounded whatever the corpus size.
SAMPLES_KEPT = 24
SAMPLES_PER_REASON = 8
# Whole-source rejects, and sources without a kept clip, that stats.json (and the end-of-run summary)
# name per run; every one is in rejects.parquet and sources.parquet.
STATS_SOURCE_REJECTS = 20


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
    # Sources processed in this run that yield no kept clip (uri, clips_rejected, rejected_by_stage).
    sources_without_clips: list[dict[str, Any]] = field(default_factory=list)


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

    work = sorted((read_work(out, key) for key in new_keys), key=lambda w: (w[0].get("sha256") or "", w[0]["uri"]))
    dedup = Deduplicator(manifest, dedup_hamming)
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
            reason = dedup.reason(row)
            if row.get("status") != "kept" or reason is not None:
                reject_rows.append(_clip_reject(source, row, reason, dedup_hamming))
                continue
            kept_rows.append(row)
        result.sources += 1
        result.sources_rejected += bool(source.get("reject_stage"))
        result.source_seconds += float(source.get("duration_s") or 0.0)
        source_rejects, kept = reject_rows[rejected_before:], len(kept_rows) - kept_before
        if kept == 0 and not source.get("reject_stage"):
            # Named in the summary and the report, apart from the sources rejected whole.
            result.sources_without_clips.append(_no_clip_source(source, source_rejects))
        source_rows.append(_source_row(source, kept, len(source_rejects)))

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
        delete_work(out, key)
    return result


class Deduplicator:
    """Exact copies and near-duplicates (step 2 of the module docstring): the clips of the manifest,
    then each clip kept before, in pack order. It remembers where every kept clip came from, so a
    reject names the clip it repeats by source file and span, not by id alone."""

    def __init__(self, manifest: pa.Table | None, dedup_hamming: int | None) -> None:
        self.dedup_hamming = dedup_hamming
        self.index = NearDuplicateIndex(dedup_hamming if dedup_hamming is not None else 0)
        self.origin: dict[str, str] = {}  # kept clip id -> "source_uri start-end s"
        if manifest is not None:
            names = ("id", "phash", "source_uri", "start_s", "end_s")
            columns = [manifest.column(n).to_pylist() if n in manifest.column_names else [None] * manifest.num_rows for n in names]
            for clip_id, phash, uri, start_s, end_s in zip(*columns):
                self._keep(clip_id, phash, uri, start_s, end_s)

    def reason(self, row: dict[str, Any]) -> tuple[str, int] | None:
        """(reason, distance) when a kept clip repeats an earlier one, else None (and it counts as kept)."""
        if row.get("status") != "kept":
            return None
        if row["id"] in self.origin:
            # Same id = same source bytes and same cut: a second copy of a file already ingested.
            return f"duplicate of {row['id']} from {self.origin[row['id']]} (same source content)", 0
        phash = row.get("phash")
        match = self.index.nearest(phash) if self.dedup_hamming is not None and phash else None
        if match is not None:
            return f"near-duplicate of {match[0]} from {self.origin[match[0]]}", match[1]
        self._keep(row["id"], phash, row.get("source_uri"), row.get("start_s"), row.get("end_s"))
        return None

    def _keep(self, clip_id: str, phash: str | None, uri: str | None, start_s: float | None, end_s: float | None) -> None:
        self.origin[clip_id] = f"{uri or 'an unknown source'} {start_s or 0.0:.2f}-{end_s or 0.0:.2f} s"
        if phash and self.dedup_hamming is not None:
            self.index.add(clip_id, phash)


def _no_clip_source(source: dict[str, Any], reject_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A processed source that yields no kept clip: its uri and its clip rejects counted by stage."""
    by_stage = Counter(row["stage"] for row in reject_rows if row["id"] is not None)
    return {"uri": source["uri"], "clips_rejected": sum(by_stage.values()), "rejected_by_stage": dict(sorted(by_stage.items()))}


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
                    sample = {"__key__": row["id"], "mp4": mp4, "json": metadata, "txt": (row.get("caption") or "").encode()}
                    size = sum(tar_member_bytes(len(data)) for key, data in sample.items() if key != "__key__")
                    if writer is not None and writer.size + size > target_bytes:
                        result.shards.append(writer.close())
                        writer = None
                    if writer is None:
                        writer = _ShardWriter(out, shard_name(next_shard))
                        next_shard += 1
                    writer.add(sample, size)
                    shard_of[row["id"]] = writer.name
                    progress.update()
    if writer is not None:
        result.shards.append(writer.close())
    progress.close()
    return shard_of


def tar_writer(stream: Any) -> webdataset.TarWriter:
    """A WebDataset writer onto an open output stream (closing the writer leaves `stream` open).

    Members get fixed metadata (mtime 0, uid/gid 0, no user/group names, mode 0644), so the same
    bytes in give the same tar out, whoever packs it and when. Values must already be bytes
    (`encoder=False`); the writer emits a sample's members in sorted key order (json, mp4, txt)."""
    # Imported here, not at the top: webdataset imports torch (~1.8 s, ~180 MB), which only the
    # packing driver should pay for (not discovery, not report.html, never an ingest actor).
    import webdataset

    # mtime must be an int: a float one makes tarfile add a PAX header carrying it.
    writer = webdataset.TarWriter(stream, user="", group="", mode=0o644, mtime=0, encoder=False)
    # TarWriter does not pass its `format` on to tarfile.open, which defaults to PAX; USTAR is
    # what our short ASCII names need, and fails loudly instead of adding extension headers.
    writer.tarstream.format = tarfile.USTAR_FORMAT
    return writer


def tar_member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: 512-byte header + data padded to 512-byte blocks."""
    return 512 + -(-size // 512) * 512


class _ShardWriter:
    """One shard being written under a temp name; renamed into place by close()."""

    def __init__(self, out: OutputDir, name: str) -> None:
        self.out, self.name = out, name
        self.temp = out.temp_name(name)
        self.stream = out.fs.open_output_stream(out.path(self.temp))
        self.tar = tar_writer(self.stream)
        self.size = 0  # bytes in the tar so far, headers and padding included (shards.target_mb)

    def add(self, sample: dict[str, Any], size: int) -> None:
        # WebDataset groups consecutive members by the name before the first dot: the clip id.
        self.tar.write(sample)
        self.size += size

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


# --- stats -------------------------------------------------------------------------------


def write_stats(
    out: OutputDir, run: PackResult, wall_s: float, phase_s: dict[str, float], config_hash: str, versions: dict[str, str]
) -> dict[str, Any]:
    """stats.json: totals over the whole output plus this run's numbers; returns it."""
    manifest = out.read_table(MANIFEST, columns=["start_s", "end_s"])
    rejects = out.read_table(REJECTS, columns=["id", "stage"])
    sources = out.read_table(SOURCES, columns=["status", "duration_s", "clips_kept"])
    source_status = sources.column("status").to_pylist() if sources is not None else []
    source_kept = sources.column("clips_kept").to_pylist() if sources is not None else []
    reject_ids = rejects.column("id").to_pylist() if rejects is not None else []
    reject_stages = rejects.column("stage").to_pylist() if rejects is not None else []
    clip_seconds = 0.0
    if manifest is not None and manifest.num_rows:
        clip_seconds = sum(e - s for s, e in zip(manifest.column("start_s").to_pylist(), manifest.column("end_s").to_pylist()))
    stats = {
        "sources": {"total": len(source_status), "ok": source_status.count("ok"), "rejected": source_status.count("rejected")},
        # Of the "ok" sources, those that yield no kept clip (every clip rejected, or none at all).
        "sources_without_clips": sum(1 for status, kept in zip(source_status, source_kept) if status == "ok" and not kept),
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
            "sources_without_clips": len(run.sources_without_clips),
            # The first few sources of the run that yield no kept clip, with their clip rejects by stage.
            "no_clip_sources": sorted(run.sources_without_clips, key=lambda r: r["uri"])[:STATS_SOURCE_REJECTS],
            "new_shards": run.shards,
            "source_seconds": round(run.source_seconds, 3),
            "clip_seconds": round(run.clip_seconds, 3),
            "source_seconds_per_wall_s": round(run.source_seconds / wall_s, 3) if wall_s > 0 else None,
        },
    }
    out.write_bytes(STATS, json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


