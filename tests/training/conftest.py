"""Shard fixtures for the training tests, written exactly as `reelforge ingest` writes them.

Real H.264 clips encoded with PyAV, real WebDataset tars (webdataset.TarWriter), a real
manifest.parquet and the `_SUCCESS` marker, following the shard contract in DESIGN.md. Each
clip's frames carry its number in their colour, so a test can tell clips apart after decoding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def clip_frames(number: int, num_frames: int, width: int, height: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a flat colour per clip with a bar moving across it (some motion)."""
    rng = np.random.default_rng(number)
    base = rng.integers(40, 215, size=3)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = base
    for t in range(num_frames):
        x = (t * 2) % width
        frames[t, :, x : x + 2] = 255 - base
    return frames


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    from model.mp4 import write_mp4

    return write_mp4(frames, fps)


def write_shards(
    out: Path,
    clips: list[dict],
    clips_per_shard: int = 4,
    *,
    success: bool = True,
) -> Path:
    """Write `clips` ({num_frames, fps, width, height, caption}, optional "bad": True for an undecodable
    mp4) as shard-NNNNNN.tar + manifest.parquet (+ _SUCCESS). Returns `out`."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard_no, start in enumerate(range(0, len(clips), clips_per_shard)):
        shard = f"shard-{shard_no:06d}.tar"
        with wds.TarWriter(str(out / shard)) as writer:
            for number in range(start, min(start + clips_per_shard, len(clips))):
                clip = clips[number]
                sha = hashlib.sha256(f"source-{number}".encode()).hexdigest()
                end_ms = int(clip["num_frames"] / clip["fps"] * 1000)
                clip_id = f"{sha[:16]}-{0:08d}-{end_ms:08d}"
                if clip.get("bad"):
                    mp4 = b"\x00\x00\x00\x18ftypmp42 this is not a video"
                else:
                    mp4 = encode_mp4(clip_frames(number, clip["num_frames"], clip["width"], clip["height"]), clip["fps"])
                meta = {
                    "id": clip_id,
                    "source_uri": f"file:///footage/source-{number}.mp4",
                    "source_sha256": sha,
                    "start_s": 0.0,
                    "end_s": end_ms / 1000,
                    "fps": clip["fps"],
                    "num_frames": clip["num_frames"],
                    "width": clip["width"],
                    "height": clip["height"],
                    "caption": clip["caption"],
                }
                writer.write({"__key__": clip_id, "mp4": mp4, "json": json.dumps(meta).encode(), "txt": clip["caption"].encode()})
                rows.append({**meta, "shard": shard})
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    if success:
        (out / "_SUCCESS").write_text("")
    return out


def uniform_clips(count: int, *, num_frames: int = 12, fps: float = 8.0, width: int = 32, height: int = 32) -> list[dict]:
    return [
        {"num_frames": num_frames, "fps": fps, "width": width, "height": height, "caption": f"clip number {i} in colour {i % 5}"}
        for i in range(count)
    ]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """16 clips of 12 frames at 8 fps, 32x32, 4 per shard: the training tests' dataset."""
    return write_shards(tmp_path_factory.mktemp("shards"), uniform_clips(16), clips_per_shard=4)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow SQLite store for all training tests: creating its schema costs ~7 s per store.
    Tests keep their runs apart by experiment name."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
