"""Caption sets: versioned captions beside the shards, written by `reelforge recaption`.

Layout (docs/captions.md is the reference; training reads it with `data.caption_set=NAME`):

    SHARDS/captions/<NAME>/
        manifest.json          set id, what made it (model, revision, prompt + hash, sampling, frames,
                               cleaning), and, once finished, the counts
        part-<16 hex>.parquet  one row per clip id (PART_SCHEMA), a part per committed batch
        report.html            old and new captions side by side, lengths, failures, stripped openings
        _SUCCESS               written last
        _work/lease.json       the run that may write this set now (fencing, as for ingest)

A set is made by one thing: its id hashes everything that decides a caption (`set_record`), and a
run with another model, revision, prompt, sampling, frame choice or cleaning under the same name is
refused in one line. Parts are committed by temp file + rename, each after a fence check, so a
killed run leaves whole parts only and a rerun captions just the clips no part holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.storage import config_hash
from pipelines.config import CaptionConfig
from pipelines.output import TMP_MARK, OutputDir, diff_records

CAPTIONS_DIR = "captions"
SET_MANIFEST = "manifest.json"
SET_FORMAT = "reelforge-caption-set/1"
PART_RE = re.compile(r"^part-[0-9a-f]{16}\.parquet$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PART_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),  # cleaned; "" when failed
        ("raw_caption", pa.string()),  # what the model said, None when it said nothing
        ("status", pa.string()),  # "ok" | "failed"
        ("reason", pa.string()),  # failed: why
        ("stripped", pa.string()),  # the boilerplate opening removed, if any
        ("truncated", pa.bool_()),
        ("tokens", pa.int32()),  # tokens of the training text encoder
        ("old_caption", pa.string()),  # the shard's own caption, for comparison
        ("model", pa.string()),
        ("revision", pa.string()),
        ("prompt_hash", pa.string()),
        ("frames_used", pa.int32()),
        ("frame_s", pa.float32()),  # seconds spent decoding + encoding this clip's frames
        ("caption_s", pa.float32()),  # seconds of the model's time for this clip
        ("output_tokens", pa.int32()),
    ]
)


def check_set_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"--caption-set {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def set_uri(shards: str, name: str) -> str:
    return f"{shards.rstrip('/')}/{CAPTIONS_DIR}/{check_set_name(name)}"


def prompt_hash(cfg: CaptionConfig) -> str:
    return hashlib.sha256(json.dumps([cfg.system_prompt, cfg.prompt]).encode()).hexdigest()[:16]


def set_record(cfg: CaptionConfig, text_encoder: str, revision: str) -> dict[str, Any]:
    """Everything that decides a caption in this set; its hash is the set id. `revision` is what the
    backend resolved (a hub commit, a local folder's content hash) or the configured label."""
    return {
        "format": SET_FORMAT,
        "backend": cfg.backend,
        "model": cfg.model,
        "revision": revision,
        "prompt": cfg.prompt,
        "system_prompt": cfg.system_prompt,
        "prompt_hash": prompt_hash(cfg),
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed},
        "frames": {
            "count": cfg.frames,
            "fps": cfg.frames_fps,
            "max_pixels": cfg.max_pixels,
            "jpeg_quality": cfg.jpeg_quality,
            "video_input": cfg.video_input,
        },
        "cleaning": {
            "strip_prefixes": list(cfg.strip_prefixes),
            "min_words": cfg.min_words,
            "max_tokens": cfg.max_tokens,
            "text_encoder": text_encoder,
        },
    }


def set_id(record: dict[str, Any]) -> str:
    return config_hash(record)


def check_set(out: OutputDir, record: dict[str, Any]) -> dict[str, Any] | None:
    """The set's manifest, or None for a new set; ValueError in one line when the set was made
    with something else."""
    manifest = out.read_json(SET_MANIFEST)
    if manifest is None:
        if part_names(out):
            raise ValueError(f"caption set {out.uri} holds parts but no {SET_MANIFEST}; use another --caption-set name")
        return None
    if manifest["set_id"] != set_id(record):
        if not part_names(out):
            return None  # a run that failed before its first part locks nothing: a corrected rerun starts over
        raise ValueError(
            f"caption set {out.uri} was made with other settings (set {manifest['set_id']}, this run {set_id(record)}; "
            f"changed: {diff_records(manifest['record'], record)}); use another --caption-set name"
        )
    return manifest


def write_set_manifest(out: OutputDir, record: dict[str, Any], **extra: Any) -> None:
    manifest = {"set_id": set_id(record), "record": record} | extra
    out.make_dirs()
    out.write_bytes(SET_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def part_names(out: OutputDir) -> list[str]:
    return [name for name in out.list() if PART_RE.match(name) and TMP_MARK not in name]


def part_name(clip_ids: list[str]) -> str:
    return f"part-{hashlib.sha256(' '.join(sorted(clip_ids)).encode()).hexdigest()[:16]}.parquet"


def read_set(out: OutputDir, columns: list[str] | None = None, ids: set[str] | None = None) -> pa.Table:
    """Every row of every committed part (PART_SCHEMA, or `columns` of it), one row per clip id
    (the first part in name order wins should two hold the same clip). With `ids`, only those
    clips' rows, filtered part by part: a report's sample costs one part's memory, not the set's."""
    read_columns = None if columns is None else list(dict.fromkeys(["clip_id", *columns]))
    tables = []
    for name in part_names(out):
        with out.fs.open_input_file(out.path(name)) as stream:
            part = pq.read_table(stream, columns=read_columns)
        if ids is not None:
            part = part.filter(pc.is_in(part.column("clip_id"), value_set=pa.array(sorted(ids), pa.string())))
        tables.append(part)
    if not tables:
        schema = PART_SCHEMA if read_columns is None else pa.schema([PART_SCHEMA.field(c) for c in read_columns])
        return schema.empty_table()
    table = pa.concat_tables(tables)
    if "clip_id" in table.column_names and pc.count_distinct(table.column("clip_id")).as_py() < len(table):
        seen: set[str] = set()
        keep = [not (cid in seen or seen.add(cid)) for cid in table.column("clip_id").to_pylist()]
        table = table.filter(pa.array(keep))
    return table.select(columns) if columns is not None else table
