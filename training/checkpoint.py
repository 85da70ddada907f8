"""Checkpoints: save and exact resume, the EMA weights, and the inference bundle export.

A checkpoint is one directory, the same under Ray Train and torchrun:

    trainer_state.json        step, samples seen, data position, per-rank RNG, config hash, MLflow run id
    ema.safetensors           the full fp32 EMA weights (gathered, so any world size can resume)
    deepspeed/latest          DeepSpeed's tag file
    deepspeed/step-000010/    DeepSpeed's own checkpoint: module, optimizer and LR scheduler, ZeRO shards
    universal/                only after a resume at another world size: DeepSpeed's universal
                              checkpoint of deepspeed/, converted once and reused

Under Ray each rank writes into its own local folder and reports it with `ray.train.report`;
Ray merges the ranks' files into one storage directory, which is what `ray.train.get_checkpoint()`
(and `--resume`) hand back. Under torchrun all ranks write into one folder on a shared disk.

Resuming at another world size: the data position, the EMA (stored gathered, re-partitioned on load
under ZeRO-3) and the LR schedule are world-size independent. DeepSpeed's ZeRO 1-3 optimizer shards
are not: each rank's file holds a flat slice of every fp32 weight and Adam moment, cut for the old
world size. Such a checkpoint is converted once to DeepSpeed's *universal* checkpoint (one folder
per parameter holding its full fp32 weight, exp_avg and exp_avg_sq; `ds_to_universal`), which any
world size loads with `"checkpoint": {"load_universal": true}`. ZeRO-0 needs no
conversion: every rank saves and loads the same full state.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training.wrap import export_name

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
DEEPSPEED_DIR = "deepspeed"
UNIVERSAL_DIR = "universal"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # clips trained on, all ranks, all epochs
    data_position: dict[str, Any] | None = None  # DataPosition.state_dict()
    rng: list[str] = field(default_factory=list)  # per rank: base64 pickle of (python, numpy, torch) states
    config_hash: str = ""
    mlflow_run_id: str | None = None
    world_size: int = 1
    zero_stage: int = 0
    deepspeed_tag: str = ""


def read_trainer_state(directory: str | Path) -> TrainerState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"--resume {directory}: not a reelforge checkpoint (no {STATE_FILE})")
    return TrainerState(**json.loads(path.read_text()))


def checkpoint_tag(step: int) -> str:
    return f"step-{step:06d}"


def needs_universal(state: TrainerState, world_size: int) -> bool:
    """A ZeRO 1-3 checkpoint resumed at another world size must go through the universal format."""
    return state.zero_stage >= 1 and state.world_size != world_size


# --- universal checkpoints ------------------------------------------------------------------


def universal_complete(directory: str | Path) -> bool:
    return (Path(directory) / UNIVERSAL_DIR / "latest_universal").is_file()


def convert_to_universal(directory: str | Path, workers: int | None = None) -> Path:
    """`<directory>/universal/<tag>/`: the ZeRO shards of `<directory>/deepspeed/<tag>/` re-cut per
    parameter by DeepSpeed's `ds_to_universal` (CPU only; reads every shard once and writes fp32
    weight and Adam moments per parameter, about the size of the shards). Reused if already there.

    It runs as a child process with `workers` extraction processes (default: the CPUs, at most 8):
    a process pool forked from a training worker that holds a gloo group and DataLoader processes
    could deadlock, a fresh interpreter cannot. Written into a temporary sibling and renamed at the
    end, so a conversion killed half-way never passes for a complete one."""
    directory = Path(directory)
    target = directory / UNIVERSAL_DIR
    if universal_complete(directory):
        return target
    state = read_trainer_state(directory)
    workers = workers or min(8, os.cpu_count() or 1)
    scratch = directory / f"{UNIVERSAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(directory / DEEPSPEED_DIR / state.deepspeed_tag),
        "--output_folder", str(scratch / state.deepspeed_tag),
        "--num_extract_workers", str(workers),
        # merging holds every slice of a parameter at once: fewer processes, as DeepSpeed advises
        "--num_merge_workers", str(max(1, workers // 2)),
        # our engines set no universal_checkpoint_info; plain data parallelism needs none
        "--inject_missing_state",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        logger.error("ds_to_universal output:\n%s", (done.stdout + done.stderr)[-4000:])
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"--resume {directory}: converting the ZeRO shards to a universal checkpoint failed: {last}")
    try:
        scratch.rename(target)
    except OSError:
        if not universal_complete(directory):  # else another process finished first: use theirs
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "converted the ZeRO-%d checkpoint of %d workers in %s to a universal checkpoint in %.1f s (%d processes)",
        state.zero_stage, state.world_size, directory, time.perf_counter() - started, workers,
    )
    return target


def universal_everywhere(directory: str | Path) -> Path:
    """Collective: rank 0 converts `directory` (if not done before), then every rank has it. A rank
    that still sees no conversion holds a private copy of the checkpoint (e.g. Ray downloaded it
    from object storage per worker) and converts its own."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        convert_to_universal(directory)
    if dist.is_initialized():
        dist.barrier()
    return convert_to_universal(directory)


# --- RNG ----------------------------------------------------------------------------------


def capture_rng() -> str:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as one opaque string."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return base64.b64encode(pickle.dumps(states)).decode()


def restore_rng(blob: str) -> None:
    states = pickle.loads(base64.b64decode(blob))  # our own checkpoint, written by capture_rng
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- EMA ----------------------------------------------------------------------------------


class ParameterEMA:
    """fp32 exponential moving average of the weights, kept on each rank's local parameters.

    ZeRO 0-2: every rank holds every parameter, so the EMA is a full copy (identical on all ranks).
    ZeRO-3: a rank holds only its partition `p.ds_tensor` (a flat slice of the padded parameter),
    and its EMA is of that slice alone, so EMA memory is partitioned like the weights."""

    def __init__(self, module: torch.nn.Module, decay: float, zero3: bool) -> None:
        self.decay = decay
        self.zero3 = zero3
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        if self.decay == 0:
            torch._foreach_copy_(self.shadow, [self._local(p).float() for p in self.params])
            return
        # shadow += (1 - decay) * (param - shadow), one fused kernel for all tensors
        torch._foreach_lerp_(self.shadow, [self._local(p).float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full EMA weights, names as in `model/` (wrapper prefixes removed), on rank 0; None elsewhere.

        ZeRO-3 shards are all-gathered in fp32 (not through `GatheredParameters`, which would gather
        the bf16 compute copy of the weights, not our fp32 EMA), one parameter at a time so peak
        memory is one full parameter. Collective: every rank must call it."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        out: dict[str, torch.Tensor] = {}
        for name, p, shadow in zip(self.names, self.params, self.shadow):
            if self.zero3:
                world = dist.get_world_size()
                gathered = [torch.empty_like(shadow) for _ in range(world)]
                dist.all_gather(gathered, shadow)
                full = torch.cat(gathered)[: p.ds_numel].view(p.ds_shape)
            else:
                full = shadow
            if rank == 0:
                out[export_name(name)] = full.detach().cpu().clone()
        return out if rank == 0 else None

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of a full EMA state dict (works for any world size)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, p, shadow in zip(self.names, self.params, self.shadow):
            full = state[export_name(name)].float().flatten()
            if self.zero3:
                size = shadow.numel()
                padded = torch.zeros(size * dist.get_world_size(), dtype=full.dtype)
                padded[: full.numel()] = full
                shadow.copy_(padded[rank * size : (rank + 1) * size])
            else:
                shadow.copy_(full.view_as(shadow))


# --- save / load --------------------------------------------------------------------------


def save_checkpoint(engine: Any, ema: ParameterEMA, state: TrainerState, directory: str | Path) -> Path:
    """Write a checkpoint into `directory` (collective: every rank calls it with its own or a shared
    folder). `state.rng` is filled with every rank's RNG here."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = capture_rng()
    if dist.is_initialized():
        all_rng: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    state.rng = all_rng
    state.deepspeed_tag = checkpoint_tag(state.step)
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=state.deepspeed_tag)
    ema_weights = ema.full_state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(ema_weights, str(directory / EMA_FILE))
        # written last: a folder with trainer_state.json is a complete checkpoint
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    if dist.is_initialized():
        dist.barrier()
    return directory


def load_checkpoint(engine: Any, ema: ParameterEMA, directory: str | Path) -> TrainerState:
    """Restore DeepSpeed (module, optimizer, scheduler), the EMA and this rank's RNG from `directory`.

    An engine configured with `"checkpoint": {"load_universal": true}` (deepspeed_config's
    `load_universal`, set when `needs_universal`) loads the universal conversion, made here if
    missing; collective then, like DeepSpeed's own load."""
    directory = Path(directory)
    state = read_trainer_state(directory)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if state.zero_stage != engine.zero_optimization_stage():
        raise ValueError(
            f"--resume {directory}: written at deepspeed.zero_stage={state.zero_stage}, this run uses "
            f"{engine.zero_optimization_stage()}; resume at the stage it was written with"
        )
    if engine.load_universal_checkpoint():
        if state.zero_stage == 0:
            raise ValueError(f"--resume {directory}: a ZeRO-0 checkpoint has no ZeRO shards to load as universal")
        load_dir = universal_everywhere(directory)
    elif needs_universal(state, world_size):
        raise ValueError(
            f"--resume {directory}: written by {state.world_size} workers at ZeRO-{state.zero_stage}, loaded by "
            f"{world_size}: the engine needs deepspeed_config(load_universal=True)"
        )
    else:
        load_dir = directory / DEEPSPEED_DIR
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=state.deepspeed_tag)
    if load_path is None:
        raise ValueError(f"--resume {directory}: DeepSpeed checkpoint {state.deepspeed_tag} missing or unreadable")
    from safetensors.torch import load_file

    ema.load_full_state_dict(load_file(str(directory / EMA_FILE)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank < len(state.rng):
        restore_rng(state.rng[rank])
    logger.info("resumed from %s at step %d (%d clips seen)", directory, state.step, state.samples_seen)
    return state
