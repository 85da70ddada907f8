"""Packing on real footage run through the real SourceProcessor (no Ray): deterministic
WebDataset shards, crash recovery, incremental appends, the same bytes on an object store."""

from __future__ import annotations

import copy
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import webdataset

from pipelines.output import MANIFEST, REJECTS, SOURCES, OutputDir, committed_keys
from pipelines.pack import pack, write_stats
from pipelines.work import work_keys


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.tar"))}


def test_pack_writes_deterministic_webdataset_shards(tmp_path: Path, processed: dict, write_processed) -> None:
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    write_processed(out, ["v0", "v1", "v2"])
    assert len(work_keys(out)) == 3
    result = pack(out, dedup_hamming=None, target_mb=0.05)

    manifest = pq.read_table(out.path(MANIFEST)).to_pylist()
    kept = [r for name in ("v0", "v1", "v2") for r in processed[name][1] if r["status"] == "kept"]
    assert result.clips_kept == len(manifest) == len(kept) > 3
    assert len(result.shards) > 1, "target_mb=0.05 must split the clips over several shards"
    # Order: by source sha256, then clip start.
    assert [r["id"] for r in manifest] == [r["id"] for r in sorted(kept, key=lambda r: (r["source_sha256"], r["start_s"]))]

    samples = list(webdataset.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["id"] for r in manifest]
    by_id = {r["id"]: r for r in kept}
    for sample, row in zip(samples, manifest):
        assert sample["mp4"] == by_id[row["id"]]["mp4"]
        assert sample["txt"].decode() == row["caption"]
        metadata = json.loads(sample["json"])
        assert metadata["phash"] == row["phash"] and metadata["start_s"] == row["start_s"]
        assert "status" not in metadata and "thumbnail" not in metadata
    with tarfile.open(out.path(result.shards[0])) as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}
    # Committed: work results are gone, every source is recorded.
    assert work_keys(out) == set() and len(committed_keys(out)) == 3
    rejects = pq.read_table(out.path(REJECTS)).to_pylist()
    assert len(rejects) == sum(1 for n in ("v0", "v1", "v2") for r in processed[n][1] if r["status"] == "rejected")

    # Same work results packed elsewhere give byte-identical shards.
    again = OutputDir(str(tmp_path / "again"))
    again.make_dirs()
    write_processed(again, ["v2", "v0", "v1"])
    pack(again, dedup_hamming=None, target_mb=0.05)
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(tmp_path / "out")


def test_interrupted_pack_is_redone_identically(tmp_path: Path, write_processed) -> None:
    reference = OutputDir(str(tmp_path / "reference"))
    reference.make_dirs()
    write_processed(reference, ["v0", "v1"])
    pack(reference, dedup_hamming=None, target_mb=0.05)

    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    write_processed(out, ["v0", "v1"])
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "out" / "_work", saved)
    pack(out, dedup_hamming=None, target_mb=0.05)
    # A crash after the shards and manifest were written but before sources.parquet (the commit):
    (tmp_path / "out" / SOURCES).unlink()
    shutil.rmtree(tmp_path / "out" / "_work")
    shutil.copytree(saved, tmp_path / "out" / "_work")
    (tmp_path / "out" / "shard-000042.tar").write_bytes(b"partial")
    (tmp_path / "out" / "shard-000001.tar.tmp-abc").write_bytes(b"partial")

    pack(out, dedup_hamming=None, target_mb=0.05)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "reference")
    ids = pq.read_table(out.path(MANIFEST), columns=["id"]).column("id").to_pylist()
    assert ids == pq.read_table(reference.path(MANIFEST), columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))

    # A crash after the commit but before the work results were deleted: nothing is packed twice.
    shutil.rmtree(tmp_path / "out" / "_work")
    shutil.copytree(saved, tmp_path / "out" / "_work")
    assert pack(out, dedup_hamming=None, target_mb=0.05).sources == 0
    assert work_keys(out) == set() and not list((tmp_path / "out" / "_work").glob("*.tar"))
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "reference")


def test_incremental_pack_appends_and_rejects_copies_of_committed_clips(tmp_path: Path, processed: dict, write_processed) -> None:
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    write_processed(out, ["v0"])
    first = pack(out, dedup_hamming=0, target_mb=0.05)
    before = _shard_bytes(tmp_path / "out")

    write_processed(out, ["v0_copy", "v1"])
    second = pack(out, dedup_hamming=0, target_mb=0.05)
    assert _shard_bytes(tmp_path / "out").items() >= before.items(), "committed shards must not change"
    numbers = [int(name[6:12]) for name in first.shards + second.shards]
    assert numbers == list(range(len(numbers))), "new shards continue the numbering"
    rejects = pq.read_table(out.path(REJECTS)).to_pylist()
    copy_rejects = [r for r in rejects if r["uri"].endswith("v0_copy.mp4") and r["stage"] == "dedup"]
    assert len(copy_rejects) == first.clips_kept
    # The reason names the committed clip it repeats: id, source file and span.
    committed = {r["id"]: r for r in pq.read_table(out.path(MANIFEST)).to_pylist()}
    for row in copy_rejects:
        original = committed[row["id"]]
        where = f"{original['source_uri']} {original['start_s']:.2f}-{original['end_s']:.2f} s"
        assert row["reason"] == f"duplicate of {row['id']} from {where} (same source content)"
    # v0_copy yields no kept clip: named apart from whole-source rejects, with its rejects by stage.
    assert second.sources_without_clips == [
        {"uri": processed["v0_copy"][0]["uri"], "clips_rejected": len(processed["v0"][1]), "rejected_by_stage": {
            stage: sum(1 for r in processed["v0"][1] if (r["reject_stage"] or "dedup") == stage)
            for stage in {r["reject_stage"] or "dedup" for r in processed["v0"][1]}}}
    ]  # fmt: skip
    stats = write_stats(out, second, 1.0, {}, "hash", {})
    assert stats["sources_without_clips"] == 1 and stats["sources"]["rejected"] == 0
    assert stats["last_run"]["sources_without_clips"] == 1
    assert stats["last_run"]["no_clip_sources"] == second.sources_without_clips
    manifest_ids = pq.read_table(out.path(MANIFEST), columns=["id"]).column("id").to_pylist()
    assert len(manifest_ids) == len(set(manifest_ids)) == first.clips_kept + second.clips_kept


def test_object_store_output_gives_the_same_shards(tmp_path: Path, write_processed) -> None:
    # No S3 here: pyarrow's in-memory filesystem stands in for a bucket. It proves the output
    # protocol uses only filesystem calls an object store has (no os.rename, no local paths).
    local = OutputDir(str(tmp_path / "local"))
    local.make_dirs()
    bucket = OutputDir("mock:///bucket/out")
    bucket.make_dirs()
    for out in (local, bucket):
        write_processed(out, ["v0", "v1"])
        pack(out, dedup_hamming=None, target_mb=0.05)
    names = [n for n in bucket.list() if n.startswith("shard-")]
    assert not bucket.is_local and names == sorted(_shard_bytes(tmp_path / "local"))
    assert {n: bucket.read_bytes(n) for n in names} == _shard_bytes(tmp_path / "local")
    assert committed_keys(bucket) == committed_keys(local) and work_keys(bucket) == set()


def test_near_duplicate_reason_names_the_other_clips_source_file_and_span(tmp_path: Path, processed: dict) -> None:
    """A near-duplicate's reason used to give only the other clip's id, useless to a person reading
    report.html; it now says where that clip is: its source file and time span."""
    from pipelines.work import write_source_result

    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    source, rows = copy.deepcopy(processed["v1"])
    write_source_result(out, source, iter(copy.deepcopy(rows)))
    # The same pictures under another file and hash (as a re-encode would be): ids differ, phashes match.
    twin = source | {"uri": source["uri"].replace("v1.", "v1_twin."), "sha256": "f" * 64, "source_key": "f" * 32}
    twin_rows = [r | {"id": "f" * 16 + r["id"][16:], "source_uri": twin["uri"], "source_sha256": "f" * 64} for r in copy.deepcopy(rows)]
    write_source_result(out, twin, iter(twin_rows))
    pack(out, dedup_hamming=0, target_mb=0.05)
    kept = {r["id"]: r for r in pq.read_table(out.path(MANIFEST)).to_pylist()}
    dedup = [r for r in pq.read_table(out.path(REJECTS)).to_pylist() if r["stage"] == "dedup"]
    assert dedup and {r["uri"] for r in dedup} == {twin["uri"]}
    for row in dedup:
        other = kept[row["id"].replace("f" * 16, source["sha256"][:16], 1)]
        where = f"{source['uri']} {other['start_s']:.2f}-{other['end_s']:.2f} s"
        assert row["reason"] == f"near-duplicate of {other['id']} from {where}" and row["score"] == 0
