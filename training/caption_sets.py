"""Reading a caption set for training (`data.caption_set=NAME`).

The set is written by `reelforge recaption` (pipelines/caption_sets.py; docs/captions.md):
`<data>/captions/<NAME>/` with `manifest.json` (the set id and what made it), `part-*.parquet`
rows keyed by clip id (caption, status, ...) and `_SUCCESS`. training/ and pipelines/ meet only
through that layout, so this is the reading half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow.fs
import pyarrow.parquet as pq

from model.storage import resolve_uri

logger = logging.getLogger(__name__)

CAPTIONS_DIR = "captions"
SUCCESS_MARKER = "_SUCCESS"
STYLE_EXAMPLES = 8  # training captions a bundle records for prompt expansion


def caption_set_manifest(data_dir: str, name: str) -> dict[str, Any]:
    """The manifest of caption set `name` of `data_dir`; ValueError unless the set is finished."""
    filesystem, root = resolve_uri(data_dir)
    folder = f"{root.rstrip('/')}/{CAPTIONS_DIR}/{name}"
    names = {item.base_name for item in filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))}
    if not names:
        raise ValueError(f"data.caption_set={name}: no caption set {folder} (make it with `reelforge recaption {data_dir} --caption-set {name}`)")
    if SUCCESS_MARKER not in names or "manifest.json" not in names:
        raise ValueError(f"data.caption_set={name}: {folder} is unfinished (no {SUCCESS_MARKER}); rerun the same `reelforge recaption` to finish it")
    with filesystem.open_input_stream(f"{folder}/manifest.json") as stream:
        return json.loads(stream.read())


def read_caption_set(data_dir: str, name: str, ids: list[str]) -> tuple[list[str | None], str]:
    """(caption per clip of `ids`, None where the set has no usable one; the set id). The set's
    layout is pipelines/caption_sets.py's (docs/captions.md): part-*.parquet rows keyed by clip id."""
    manifest = caption_set_manifest(data_dir, name)
    filesystem, root = resolve_uri(data_dir)
    folder = f"{root.rstrip('/')}/{CAPTIONS_DIR}/{name}"
    usable: dict[str, str] = {}
    for info in sorted(filesystem.get_file_info(pyarrow.fs.FileSelector(folder)), key=lambda i: i.base_name):
        if not (info.base_name.startswith("part-") and info.base_name.endswith(".parquet")):
            continue
        with filesystem.open_input_file(info.path) as handle:
            part = pq.read_table(handle, columns=["clip_id", "caption", "status"])
        for clip_id, caption, status in zip(*(part.column(c).to_pylist() for c in ("clip_id", "caption", "status"))):
            if status == "ok" and caption and clip_id not in usable:
                usable[clip_id] = caption
    captions = [usable.get(clip_id) for clip_id in ids]
    missing = sum(c is None for c in captions)
    logger.info("caption set %s (%s): %d of %d clips have a usable caption, %d are skipped", name, manifest["set_id"], len(ids) - missing, len(ids), missing)
    return captions, manifest["set_id"]


def prompt_style(index: Any, caption_set: str | None) -> dict[str, Any]:
    """A few of the captions the model trains on, for prompt expansion at generation time
    (model/prompt_expansion.py): the caption set's when training on one, else the shards' own.
    `index` is training.data's ClipIndex (not imported: training.data imports this module).
    A stable choice (the smallest hashes of distinct captions of 3+ words), so reruns agree.
    Clips held out for evaluation (`index.held_out_ids`) lend none: their captions are eval prompts."""
    if index.captions is not None:
        captions = [c for c in index.captions if c]
    else:
        filesystem, root = resolve_uri(index.data_dir)
        with filesystem.open_input_file(f"{root.rstrip('/')}/manifest.parquet") as handle:
            names = pq.read_schema(handle).names
        if "caption" not in names:
            return {}
        with filesystem.open_input_file(f"{root.rstrip('/')}/manifest.parquet") as handle:
            table = pq.read_table(handle, columns=["id", "caption"])
        held_out = index.held_out_ids
        rows = zip(table.column("id").to_pylist(), table.column("caption").to_pylist())
        captions = [c for clip_id, c in rows if c and str(clip_id) not in held_out]
    distinct = sorted({c for c in captions if len(c.split()) >= 3}, key=lambda c: hashlib.sha1(c.encode()).hexdigest())
    if not distinct:
        return {}
    return {"source": f"caption_set:{caption_set}" if caption_set else "shards", "caption_set_id": index.caption_set_id,
            "examples": distinct[:STYLE_EXAMPLES]}  # fmt: skip
