"""`--materialize OUT`: new shards whose captions are a caption set's, for plain WebDataset readers.

Our own training joins a caption set by clip id (`data.caption_set`) and needs no copy; other
tools read `txt` members. This writes, for each shard of SHARDS, a shard of the same name in OUT
holding the clips that have a usable caption in the set, with `txt` = that caption and the
`json` metadata's `caption`, `caption_model` and `caption_set` updated; the mp4 bytes are copied
as they are. Then `manifest.parquet` (the same rows, captions replaced, the left-out clips
dropped), `materialized.json` (which shards, which set) and `_SUCCESS` last.

A rerun for the same set is a no-op; OUT made from another set is refused. Shards are written
under temp names and renamed, so an interrupted run leaves whole shards; it is simply redone.
Members are read and written one sample at a time: memory is one clip, whatever the shard size.
"""

from __future__ import annotations

import json
import logging
import tarfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.caption_sets import SET_MANIFEST, read_set, set_uri
from pipelines.output import MANIFEST, SUCCESS, OutputDir, retry_storage
from pipelines.pack import tar_writer

logger = logging.getLogger(__name__)

RECORD = "materialized.json"


def materialize(shards: str, name: str, out: str) -> dict[str, Any]:
    """Write OUT from SHARDS and caption set `name`; returns {clips, shards, skipped}."""
    source, target, captions = OutputDir(shards), OutputDir(out), OutputDir(set_uri(shards, name))
    manifest = captions.read_json(SET_MANIFEST)
    if manifest is None or not captions.exists(SUCCESS):
        raise ValueError(f"caption set {captions.uri} is not finished; run reelforge recaption first")
    record = {"shards": source.uri, "caption_set": name, "set_id": manifest["set_id"]}
    previous = target.read_json(RECORD)
    if previous is not None and {k: previous.get(k) for k in record} != record:
        raise ValueError(f"{out} was materialized from {previous['shards']} with caption set {previous['caption_set']} ({previous['set_id']}); use another folder")
    if previous is not None and target.exists(SUCCESS):
        logger.info("%s already holds caption set %s; nothing to do", out, name)
        return previous["counts"]
    table = read_set(captions, ["clip_id", "caption", "status"])
    usable = {c: t for c, t, s in zip(*(table.column(k).to_pylist() for k in ("clip_id", "caption", "status"))) if s == "ok" and t}
    model = manifest["record"]["model"] + (f"@{manifest['record']['revision']}" if manifest["record"]["revision"] else "")
    clips = source.read_table(MANIFEST)
    target.make_dirs()
    target.delete(SUCCESS)
    kept = pc.is_in(clips.column("id"), value_set=pa.array(list(usable), pa.string()))
    rows = clips.filter(kept)
    shard_names = sorted(set(rows.column("shard").to_pylist()))
    for shard in shard_names:
        retry_storage(f"writing {target.path(shard)}", lambda shard=shard: _write_shard(source, target, shard, usable, model, name))
    new_captions = pa.array([usable[c] for c in rows.column("id").to_pylist()], pa.string())
    rows = rows.set_column(rows.column_names.index("caption"), "caption", new_captions)
    if "caption_model" in rows.column_names:
        rows = rows.set_column(rows.column_names.index("caption_model"), "caption_model", pa.array([model] * len(rows), pa.string()))
    target.write_table(MANIFEST, rows)
    counts = {"clips": len(rows), "shards": len(shard_names), "skipped": len(clips) - len(rows)}
    target.write_bytes(RECORD, json.dumps(record | {"counts": counts}, indent=2, sort_keys=True).encode())
    target.write_bytes(SUCCESS, b"")
    logger.info("materialized %d clips into %d shards in %s (%d without a usable caption left out)", len(rows), len(shard_names), out, counts["skipped"])
    return counts


def _write_shard(source: OutputDir, target: OutputDir, shard: str, usable: dict[str, str], model: str, name: str) -> None:
    temp = target.temp_name(shard)
    try:
        with source.fs.open_input_stream(source.path(shard)) as stream, target.fs.open_output_stream(target.path(temp)) as sink:
            writer = tar_writer(sink)
            for sample in tar_samples(stream):
                caption = usable.get(sample["__key__"])
                if caption is None:
                    continue
                meta = json.loads(sample["json"]) if "json" in sample else {}
                meta.update(caption=caption, caption_model=model, caption_set=name)
                sample.update(txt=caption.encode(), json=json.dumps(meta, sort_keys=True).encode())
                writer.write(sample)
            writer.close()
        target.commit(temp, shard)
    except BaseException:
        target.discard(temp)
        raise


def tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of a shard stream, one at a time: {"__key__": id, "mp4": bytes, ...}.
    Streaming (mode "r|"), so memory is one sample whatever the shard size or the store."""
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if sample is not None:
        yield sample
