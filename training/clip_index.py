"""The dataset on disk as training sees it: an ingest output folder's manifest as a `ClipIndex`
(`read_clip_index`, one-line ValueError for a folder that is no finished ingest), and the held-out
split (`data.held_out`): which clips training leaves for evaluation, by a rule that reads only the
clip's id (`is_held_out`). training/data.py reads shards by this index; training/evaluation.py picks
its clips by the same rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow.fs
import pyarrow.parquet as pq

from model.storage import resolve_uri
from training.caption_sets import read_caption_set

MANIFEST = "manifest.parquet"
SUCCESS_MARKER = "_SUCCESS"


# --- the dataset on disk ------------------------------------------------------------------


@dataclass
class ClipIndex:
    """What the manifest says about the dataset; row i of every list is sample index i."""

    data_dir: str
    shards: list[str]  # shard file names, sorted
    ids: list[str]
    shard_of: list[int]  # index into `shards`
    num_frames: list[int]
    fps: list[float]
    width: list[int]
    height: list[int]
    # data.caption_set: sample i's caption, None if the set has none usable (skipped); None: the shards'
    captions: list[str | None] | None = None
    caption_set_id: str | None = None
    # data.held_out: clips kept for evaluation, absent from the lists above (`without_held_out`)
    held_out: float = 0.0
    held_out_ids: frozenset[str] = frozenset()
    index_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index_of = {clip_id: i for i, clip_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


def read_clip_index(data_dir: str, caption_set: str | None = None) -> ClipIndex:
    """Check an ingest output folder, read its manifest (and `caption_set`); one-line ValueError if wrong."""
    filesystem, root = resolve_uri(data_dir)
    info = filesystem.get_file_info(root)
    if info.type != pyarrow.fs.FileType.Directory:
        raise ValueError(f"--data {data_dir}: no such shard folder")
    names = {item.base_name for item in filesystem.get_file_info(pyarrow.fs.FileSelector(root))}
    if SUCCESS_MARKER not in names:
        raise ValueError(f"--data {data_dir}: no {SUCCESS_MARKER} marker (ingest unfinished or failed; rerun `reelforge ingest`)")
    shard_names = sorted(name for name in names if name.startswith("shard-") and name.endswith(".tar"))
    if not shard_names:
        raise ValueError(f"--data {data_dir}: no shard-*.tar files")
    if MANIFEST not in names:
        raise ValueError(f"--data {data_dir}: no {MANIFEST}")
    with filesystem.open_input_file(f"{root}/{MANIFEST}") as handle:
        table = pq.read_table(handle)
    required = ("id", "shard", "num_frames", "fps", "width", "height")
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise ValueError(f"--data {data_dir}: {MANIFEST} lacks columns {missing}")
    if table.num_rows == 0:
        raise ValueError(f"--data {data_dir}: {MANIFEST} lists no clips")
    columns = {name: table.column(name).to_pylist() for name in required}
    shard_pos = {name: i for i, name in enumerate(shard_names)}
    unknown = sorted({s for s in columns["shard"] if _shard_name(s) not in shard_pos})
    if unknown:
        raise ValueError(f"--data {data_dir}: {MANIFEST} names shards that are not there: {unknown[:3]}")
    ids = [str(x) for x in columns["id"]]
    captions, set_id = read_caption_set(data_dir, caption_set, ids) if caption_set else (None, None)
    return ClipIndex(
        data_dir=data_dir,
        shards=shard_names,
        ids=ids,
        shard_of=[shard_pos[_shard_name(s)] for s in columns["shard"]],
        num_frames=[int(x) for x in columns["num_frames"]],
        fps=[float(x) for x in columns["fps"]],
        width=[int(x) for x in columns["width"]],
        height=[int(x) for x in columns["height"]],
        captions=captions,
        caption_set_id=set_id,
    )


def _shard_name(value: str) -> str:
    """The manifest may hold a bare name or a path/URI; shards are matched by file name."""
    return str(value).rstrip("/").rsplit("/", 1)[-1]


# --- the held-out split -------------------------------------------------------------------


def eval_rank(clip_id: str) -> str:
    """A clip's place in the held-out order (training/evaluation.py evaluates the smallest first)."""
    return hashlib.sha256(f"reelforge-eval:{clip_id}".encode()).hexdigest()


def is_held_out(clip_id: str, held_out: float) -> bool:
    """The held-out rule, one clip at a time: the first 64 bits of its `eval_rank` as a fraction of
    2**64 fall below `held_out`. It reads nothing but the id, so adding footage never moves a trained
    clip into the held-out set, and a larger fraction only adds clips to it."""
    return int(eval_rank(clip_id)[:16], 16) / 16**16 < held_out


def without_held_out(index: ClipIndex, held_out: float) -> ClipIndex:
    """The clips training reads: `index` less those `is_held_out` keeps for evaluation (their ids in
    `held_out_ids`, so readers pass them unread). No minimum: a small dataset may hold out none."""
    held = [is_held_out(clip_id, held_out) for clip_id in index.ids]
    keep = [i for i, out in enumerate(held) if not out]
    if not keep:
        raise ValueError(f"data.held_out={held_out:g} leaves none of the {len(index)} clips of {index.data_dir} to train on; lower it")
    return ClipIndex(
        data_dir=index.data_dir,
        shards=index.shards,
        ids=[index.ids[i] for i in keep],
        shard_of=[index.shard_of[i] for i in keep],
        num_frames=[index.num_frames[i] for i in keep],
        fps=[index.fps[i] for i in keep],
        width=[index.width[i] for i in keep],
        height=[index.height[i] for i in keep],
        captions=None if index.captions is None else [index.captions[i] for i in keep],
        caption_set_id=index.caption_set_id,
        held_out=held_out,
        held_out_ids=frozenset(clip_id for clip_id, out in zip(index.ids, held) if out),
    )


def held_out_note(index: ClipIndex) -> str:
    """What the split kept out of the training clips of `index` (from `without_held_out`), in words."""
    total = len(index) + len(index.held_out_ids)
    if index.held_out > 0 and not index.held_out_ids:
        return f"none of {total} clips held out for evaluation (data.held_out={index.held_out:g} selects none of them)"
    return f"{len(index.held_out_ids)} of {total} clips held out for evaluation (data.held_out={index.held_out:g})"
