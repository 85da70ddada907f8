"""Checkpoints: save and exact resume, the EMA weights, and the inference bundle export.

A checkpoint is one directory, the same under Ray Train and torchrun:

    trainer_state.json        step, samples seen, data position, per-rank RNG, config hash, MLflow run id
    ema.safetensors           the full fp32 EMA weights (gathered, so any world size can resume)
    deepspeed/latest          DeepSpeed's tag file
    deepspeed/step-000010/    DeepSpeed's own checkpoint: module, optimizer and LR scheduler, ZeRO shards

Under Ray each rank writes into its own local folder and reports it with `ray.train.report`;
Ray merges the ranks' files into one storage directory, which is what `ray.train.get_checkpoint()`
(and `--resume`) hand back. Under torchrun all ranks write into one folder on a shared disk.

Resuming at another world size: the data position and EMA are world-size independent; DeepSpeed's
optimizer shards are not for ZeRO >= 1, so training/train.py refuses that combination at launch.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import random
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
    """Restore DeepSpeed (module, optimizer, scheduler), the EMA and this rank's RNG from `directory`."""
    directory = Path(directory)
    state = read_trainer_state(directory)
    load_path, _ = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=state.deepspeed_tag)
    if load_path is None:
        raise ValueError(f"--resume {directory}: DeepSpeed checkpoint {state.deepspeed_tag} missing or unreadable")
    from safetensors.torch import load_file

    ema.load_full_state_dict(load_file(str(directory / EMA_FILE)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank < len(state.rng):
        restore_rng(state.rng[rank])
    logger.info("resumed from %s at step %d (%d clips seen)", directory, state.step, state.samples_seen)
    return state
