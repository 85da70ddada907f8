"""What differs between the two launchers of the training loop: Ray Train and plain torchrun.

A session says which rank this process is, how the process group comes up, which device it
trains on, where checkpoints go and how one is published, and which checkpoint a restarted
group resumes. Everything else in `training/loop.py` is the same under both.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import STATE_FILE, checkpoint_tag

logger = logging.getLogger(__name__)

TORCHRUN_CHECKPOINTS = "checkpoints"  # <out>/checkpoints/step-NNNNNN under torchrun


class RaySession:
    """Ray Train V2 (the default in Ray 2.60): the process group exists already; checkpoints are
    written to a local folder per rank and reported, and Ray merges them in storage."""

    name = "ray"

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()

    def configure_logging(self) -> None:
        # Ray Train V2 replaces the root logger's handlers with its console and per-run file
        # handlers when the worker starts (so the job's setup hook leaves no second handler);
        # adding ours would print every line twice. Only the level is ours: warnings only off rank 0.
        logging.getLogger().setLevel(logging.INFO if self.rank == 0 else logging.WARNING)

    def init_distributed(self, backend: str) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)  # wraps Ray's process group

    def device(self, use_gpu: bool) -> torch.device:
        if not use_gpu:
            return torch.device("cpu")
        import ray.train.torch

        # Ray sets CUDA_VISIBLE_DEVICES per worker; it knows which index is this worker's GPU
        return ray.train.torch.get_device()

    def restart_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def checkpoint_dir(self, out: Path, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"reelforge-{checkpoint_tag(step)}-r{self.rank}-"))

    def publish(self, directory: Path, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        shutil.rmtree(directory, ignore_errors=True)  # Ray has copied it into storage


class TorchrunSession:
    """Plain torchrun: env:// rendezvous; checkpoints go straight to <out>/checkpoints/step-N (one
    shared folder, so all ranks must see the same disk). The command that torchrun starts sets up
    each rank's logging before the loop runs."""

    name = "torchrun"

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def init_distributed(self, backend: str) -> None:
        import deepspeed

        if self.world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        deepspeed.init_distributed(dist_backend=backend)

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}" if use_gpu else "cpu")

    def restart_checkpoint(self) -> Any:
        return None

    def checkpoint_dir(self, out: Path, step: int) -> Path:
        return out / TORCHRUN_CHECKPOINTS / checkpoint_tag(step)

    def publish(self, directory: Path, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            logger.info("checkpoint %s", directory)


Session = RaySession | TorchrunSession


def latest_torchrun_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint torchrun wrote in `out` (what `--resume` without a path
    continues), or None. Complete: `trainer_state.json` is written last."""
    complete = sorted(state.parent for state in (out / TORCHRUN_CHECKPOINTS).glob(f"step-*/{STATE_FILE}"))
    return complete[-1] if complete else None
