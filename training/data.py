"""Training data: WebDataset shards -> same-shape batches of clips, resumable at any world size.

The epoch and who reads what:

* The sample universe is `manifest.parquet` (one row per clip) less the clips `data.held_out`
  keeps for evaluation (`is_held_out`, `without_held_out`); a clip's row number among the rest is
  its *sample index*. Epoch `e` visits the shards in a seeded permutation of (seed, e).
* A *slot* is one reader: (training rank, DataLoader worker), `num_slots = world_size *
  max(1, data_workers)`. With at least as many shards as slots, shard k of the epoch order
  belongs to slot k % num_slots; with fewer shards (tiny datasets) every slot scans every shard
  and keeps the clips whose position in the epoch order is its own modulo num_slots. Either way
  each clip belongs to exactly one slot, so no clip is read twice in an epoch.
* The data position is `DataPosition`: per epoch, a bitmap over sample indices of the clips
  already *trained on* (the training process marks a batch after its step, never when a
  DataLoader worker prefetched it). It is merged across ranks at checkpoint time. On resume, at
  any world size, each slot skips the marked clips of each epoch: the epoch continues without
  repeating or skipping a clip. A slot that finishes its share moves on to the next epoch by
  itself (streams never end, so ranks always step together); a clip waiting in a half-full
  bucket is simply not marked yet, and is read again after a resume.

Batches: each clip goes to a (frames, width, height) bucket (`assign_bucket`) and a batch is
emitted when its bucket holds `bucket_batch_sizes()[bucket]` clips, so every batch has one shape
and no padding. A clip that cannot be decoded or fits no bucket is skipped and counted (and
marked consumed with the batch it travels with), never a crash.

Captions become text embeddings once per caption (`TextEmbeddingCache`) in the training process,
where the text encoder lives.
"""

from __future__ import annotations

import base64
import logging
import math
import random
import tarfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.fs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.storage import resolve_uri
from training.clip_index import ClipIndex
from training.config import ModelSection

logger = logging.getLogger(__name__)

# Clips shuffled inside one reader before bucketing: shard order is shuffled per epoch already,
# this breaks up runs of clips cut from the same source video. Costs buffer x decoded clip memory.
SHUFFLE_BUFFER = 16


# --- buckets ------------------------------------------------------------------------------


def frames_available(clip_frames: int, clip_fps: float, model_fps: float) -> int:
    """Frames a clip yields after resampling to `model_fps` (sample-and-hold, from its first frame)."""
    duration_s = clip_frames / clip_fps
    return max(0, math.floor(duration_s * model_fps + 1e-6))


def assign_bucket(
    clip_frames: int, clip_fps: float, width: int, height: int, shapes: list[tuple[int, int, int]], model_fps: float
) -> tuple[int, int, int] | None:
    """The bucket (frames, width, height) for a clip: among those its duration fills, the nearest
    aspect ratio, then the most frames. None when the clip is shorter than every bucket."""
    available = frames_available(clip_frames, clip_fps, model_fps)
    fitting = [shape for shape in shapes if shape[0] <= available]
    if not fitting:
        return None
    aspect = math.log(width / height)
    return min(fitting, key=lambda s: (round(abs(math.log(s[1] / s[2]) - aspect), 6), -s[0]))


def bucket_batch_sizes(shapes: list[tuple[int, int, int]], batch_size: int) -> dict[tuple[int, int, int], int]:
    """Per bucket, the clips per batch that keep pixels (hence latent tokens) per batch near
    `batch_size` clips of the first (reference) bucket; at least 1."""
    ref_frames, ref_w, ref_h = shapes[0]
    ref_pixels = ref_frames * ref_w * ref_h
    return {s: max(1, round(batch_size * ref_pixels / (s[0] * s[1] * s[2]))) for s in shapes}


def usable_clips(index: ClipIndex, model: ModelSection) -> np.ndarray:
    """Boolean mask over sample indices: clips long enough for at least one bucket (and, training
    on a caption set, with a usable caption in it)."""
    shapes = model.bucket_shapes()
    fits = np.array(
        [
            assign_bucket(f, r, w, h, shapes, model.fps) is not None
            for f, r, w, h in zip(index.num_frames, index.fps, index.width, index.height)
        ],
        dtype=bool,
    )
    if index.captions is not None:  # a caption set: clips without a usable caption in it are skipped
        fits &= np.array([caption is not None for caption in index.captions], dtype=bool)
    return fits


# --- epoch order and ownership ------------------------------------------------------------


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """A permutation of shard numbers that depends only on (seed, epoch), not on the world size."""
    order = list(range(num_shards))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def slot_plan(index: ClipIndex, seed: int, epoch: int, slot: int, num_slots: int) -> list[tuple[int, set[int] | None]]:
    """What one slot reads in one epoch: [(shard number, sample indices it keeps, None = all)]."""
    order = epoch_shard_order(len(index.shards), seed, epoch)
    if len(order) >= num_slots:
        return [(shard, None) for k, shard in enumerate(order) if k % num_slots == slot]
    # Fewer shards than readers: split clips, in the epoch's shard order, round-robin.
    by_shard: dict[int, list[int]] = {shard: [] for shard in order}
    for i, shard in enumerate(index.shard_of):
        by_shard[shard].append(i)
    epoch_samples = [i for shard in order for i in by_shard[shard]]
    mine = set(epoch_samples[slot::num_slots])
    return [(shard, {i for i in by_shard[shard] if i in mine}) for shard in order]


# --- data position ------------------------------------------------------------------------


class DataPosition:
    """Clips trained on so far, per epoch, as bitmaps over sample indices.

    Independent of world size and DataLoader workers by construction; `merge` ORs the positions
    of all ranks; `state_dict` is compact JSON (a bit per clip, zlib + base64)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.consumed: dict[int, np.ndarray] = {}

    def mark(self, epochs: list[int], indices: list[int]) -> None:
        for epoch, i in zip(epochs, indices):
            bitmap = self.consumed.get(epoch)
            if bitmap is None:
                bitmap = self.consumed[epoch] = np.zeros(self.num_samples, dtype=bool)
            bitmap[i] = True

    def merge(self, other: "DataPosition") -> None:
        for epoch, bitmap in other.consumed.items():
            mine = self.consumed.get(epoch)
            self.consumed[epoch] = bitmap.copy() if mine is None else (mine | bitmap)

    def is_consumed(self, epoch: int, i: int) -> bool:
        bitmap = self.consumed.get(epoch)
        return bool(bitmap is not None and bitmap[i])

    @property
    def epoch(self) -> int:
        """The oldest epoch not finished (every epoch before it saw every clip)."""
        epoch = 0
        while epoch in self.consumed and self.consumed[epoch].all():
            epoch += 1
        return epoch

    def count(self, epoch: int) -> int:
        bitmap = self.consumed.get(epoch)
        return 0 if bitmap is None else int(bitmap.sum())

    def state_dict(self) -> dict[str, Any]:
        start = self.epoch  # finished epochs are summarised by `epoch` alone
        return {
            "num_samples": self.num_samples,
            "epoch": start,
            "consumed": {
                str(e): base64.b64encode(zlib.compress(np.packbits(b).tobytes())).decode()
                for e, b in sorted(self.consumed.items())
                if e >= start
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], num_samples: int) -> "DataPosition":
        if state["num_samples"] != num_samples:
            raise ValueError(
                f"data position is over {state['num_samples']} clips but the dataset has {num_samples} to train on: "
                "resume on the same shards and data.held_out (or start a new run)"
            )
        position = cls(num_samples)
        for epoch in range(int(state["epoch"])):
            position.consumed[epoch] = np.ones(num_samples, dtype=bool)
        for key, blob in state["consumed"].items():
            bits = np.frombuffer(zlib.decompress(base64.b64decode(blob)), dtype=np.uint8)
            position.consumed[int(key)] = np.unpackbits(bits)[:num_samples].astype(bool)
        return position


# --- reading and decoding -----------------------------------------------------------------


def iter_shard_samples(filesystem: pyarrow.fs.FileSystem, path: str, wanted: Any) -> Iterator[dict[str, bytes]]:
    """Stream a WebDataset tar; yield {"__key__", ext: bytes} for keys with `wanted(key)` true.
    Members of unwanted keys are skipped without being read."""
    sample: dict[str, Any] | None = None
    with filesystem.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            if not wanted(key):
                continue
            if sample is None:
                sample = {"__key__": key}
            sample[ext] = tar.extractfile(member).read()
            tar.members = []  # streaming mode would otherwise keep every TarInfo
    if sample is not None:
        yield sample


def decode_clip(
    mp4: bytes, shape: tuple[int, int, int], model_fps: float, clip_frames: int, clip_fps: float, rng: random.Random
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) for bucket `shape`, from a random start inside the clip."""
    from model.video_io import read_video

    num_frames, width, height = shape
    spare = frames_available(clip_frames, clip_fps, model_fps) - num_frames
    start = rng.randint(0, spare) if spare > 0 else 0
    frames = read_video(mp4, num_frames=start + num_frames, fps=model_fps, size=(width, height))
    return frames[start:]  # (T, H, W, 3)


class ClipBatches(IterableDataset):
    """Endless same-shape batches for one training rank (split further over DataLoader workers).

    Yields dicts: `frames` uint8 (B, T, H, W, 3), `captions` list[str], `indices`/`epochs` lists
    (for `DataPosition.mark`), `skipped_indices`/`skipped_epochs` (bad clips to mark with it) and
    `skipped` {reason: count}."""

    def __init__(
        self,
        index: ClipIndex,
        model: ModelSection,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        position: DataPosition | None = None,
    ) -> None:
        self.index = index
        self.model = model
        self.shapes = model.bucket_shapes()
        self.batch_sizes = bucket_batch_sizes(self.shapes, batch_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = position or DataPosition(len(index))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        num_loader_workers = worker.num_workers if worker is not None else 1
        loader_worker = worker.id if worker is not None else 0
        slot = self.rank * num_loader_workers + loader_worker
        num_slots = self.world_size * num_loader_workers
        filesystem, root = resolve_uri(self.index.data_dir)
        buckets: dict[tuple[int, int, int], list[tuple[int, int, torch.Tensor, str]]] = {s: [] for s in self.shapes}
        skipped: Counter[str] = Counter()
        skipped_marks: list[tuple[int, int]] = []
        shuffle: list[tuple[int, dict[str, bytes]]] = []
        epoch = self.position.epoch
        while True:
            rng = random.Random(f"{self.seed}:{epoch}:{slot}:{num_slots}")
            read_any = False
            for shard, keep in slot_plan(self.index, self.seed, epoch, slot, num_slots):

                def wanted(key: str, keep: set[int] | None = keep, epoch: int = epoch) -> bool:
                    i = self.index.index_of.get(key)
                    if i is None:  # held out: never read; not in the manifest: its shard's owner reads, skips, counts it
                        return keep is None and key not in self.index.held_out_ids
                    return (keep is None or i in keep) and not self.position.is_consumed(epoch, i)

                for raw in iter_shard_samples(filesystem, f"{root}/{self.index.shards[shard]}", wanted):
                    read_any = True
                    shuffle.append((epoch, raw))
                    if len(shuffle) < SHUFFLE_BUFFER:
                        continue
                    item = shuffle.pop(rng.randrange(len(shuffle)))
                    yield from self._add(item, buckets, skipped, skipped_marks, rng)
            if not read_any and not shuffle and not any(buckets.values()):
                if epoch > self.position.epoch + 1:
                    # Two whole epochs gave this reader nothing: it owns no clips (preflight should
                    # have caught this); ending lets DataLoader's other workers carry on.
                    logger.warning("data reader %d/%d owns no clips; it stops", slot, num_slots)
                    return
            # drain the shuffle buffer at the epoch end so its clips keep their epoch number
            while shuffle:
                item = shuffle.pop(rng.randrange(len(shuffle)))
                yield from self._add(item, buckets, skipped, skipped_marks, rng)
            epoch += 1

    def _add(
        self,
        item: tuple[int, dict[str, bytes]],
        buckets: dict[tuple[int, int, int], list[tuple[int, int, torch.Tensor, str]]],
        skipped: Counter[str],
        skipped_marks: list[tuple[int, int]],
        rng: random.Random,
    ) -> Iterator[dict[str, Any]]:
        epoch, raw = item
        key = raw["__key__"]
        i = self.index.index_of.get(key)
        if i is None:
            skipped["not_in_manifest"] += 1
            return
        reason, shape, frames, caption = self._prepare(raw, i, rng)
        if reason is not None:
            skipped[reason] += 1
            skipped_marks.append((epoch, i))
            logger.debug("skipping clip %s: %s", key, reason)
            return
        bucket = buckets[shape]
        bucket.append((epoch, i, frames, caption))
        if len(bucket) < self.batch_sizes[shape]:
            return
        batch = {
            "frames": torch.stack([entry[2] for entry in bucket]),  # (B, T, H, W, 3)
            "captions": [entry[3] for entry in bucket],
            "epochs": [entry[0] for entry in bucket],
            "indices": [entry[1] for entry in bucket],
            "skipped_epochs": [e for e, _ in skipped_marks],
            "skipped_indices": [s for _, s in skipped_marks],
            "skipped": dict(skipped),
        }
        bucket.clear()
        skipped.clear()
        skipped_marks.clear()
        yield batch

    def _prepare(
        self, raw: dict[str, bytes], i: int, rng: random.Random
    ) -> tuple[str | None, tuple[int, int, int] | None, torch.Tensor | None, str]:
        """(skip reason or None, bucket, frames, caption) for one raw sample."""
        if "mp4" not in raw:
            return "no_mp4", None, None, ""
        if self.index.captions is not None:
            caption = self.index.captions[i]
            if caption is None:
                return "no_caption_in_set", None, None, ""
        else:
            caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
        clip_frames, clip_fps = self.index.num_frames[i], self.index.fps[i]
        shape = assign_bucket(clip_frames, clip_fps, self.index.width[i], self.index.height[i], self.shapes, self.model.fps)
        if shape is None:
            return "too_short", None, None, caption
        try:
            frames = decode_clip(raw["mp4"], shape, self.model.fps, clip_frames, clip_fps, rng)
        except (ValueError, OSError) as exc:
            logger.warning("clip %s unreadable: %s", raw["__key__"], exc)
            return "decode_error", None, None, caption
        return None, shape, frames, caption


def make_loader(dataset: ClipBatches, data_workers: int) -> DataLoader:
    """DataLoader over ready-made batches (batch_size=None); workers decode in parallel."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=data_workers,
        # 4 batches ahead per worker hide decode jitter; more only costs memory
        prefetch_factor=4 if data_workers > 0 else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


# --- text embeddings ----------------------------------------------------------------------


class TextEmbeddingCache:
    """Caption -> (L_i, D) embedding, computed once per caption (LRU of `max_entries`).

    `embed(captions)` returns the batch padded to its longest caption: (B, L, D) float and a
    (B, L) bool mask."""

    def __init__(self, encoder: Any, max_entries: int = 100_000) -> None:
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            emb, mask = self.encoder.encode(missing)  # (M, L, D), (M, L)
            for caption, row, row_mask in zip(missing, emb, mask):
                self._cache[caption] = row[row_mask.bool()].detach().float().cpu().clone()  # (L_i, D)
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        rows = []
        for caption in captions:
            rows.append(self._cache[caption])
            self._cache.move_to_end(caption)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        length = max(1, max(row.shape[0] for row in rows))
        dim = rows[0].shape[-1]
        text = torch.zeros(len(rows), length, dim)  # (B, L, D)
        text_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
        for b, row in enumerate(rows):
            text[b, : row.shape[0]] = row
            text_mask[b, : row.shape[0]] = True
        return text, text_mask


def frames_to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1], the autoencoders' input."""
    return frames.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)  # (B, C, T, H, W)
