"""Our config -> the DeepSpeed config dict `deepspeed.initialize` takes, plus the LR schedule.

Everything DeepSpeed does is decided here from the validated `ReelforgeConfig`; no JSON file
lives beside it, so `reelforge config show` is the whole truth.

* Optimizer: AdamW. On GPU DeepSpeed's FusedAdam (one kernel for all params); on CPU plain
  `torch.optim.AdamW` (`torch_adam`), because DeepSpeed's CPU FusedAdam is a C++ op that takes a
  minute to build on first use and is no faster at tiny sizes. `offload_optimizer` selects
  DeepSpeed's CPU Adam for optimizer states in host memory.
* LR schedule: our own `LambdaLR` (`lr_lambda`) rather than DeepSpeed's `WarmupCosineLR`: the LR at
  step s is one pure function of s, written below and shared by logs, tests and docs. DeepSpeed's
  warms up log-shaped by default and needs `total_num_steps` duplicated into its params. DeepSpeed
  steps a client scheduler once per optimizer step and saves its state in the checkpoint.
* Precision: bf16 on GPU (no loss scaling needed, unlike fp16), fp32 on CPU.
* ZeRO: `zero_optimization.stage` from `deepspeed.zero_stage`; DeepSpeed pads partitions, so any
  world size divides the parameters (see training/train.py for the world-size rules we do enforce).
"""

from __future__ import annotations

import math
from typing import Any

from training.config import DeepSpeedSection, ScalingSection, TrainSection


def use_bf16(deepspeed: DeepSpeedSection, scaling: ScalingSection) -> bool:
    return scaling.use_gpu if deepspeed.bf16 is None else deepspeed.bf16


def deepspeed_config(
    train: TrainSection,
    deepspeed: DeepSpeedSection,
    scaling: ScalingSection,
    world_size: int,
    *,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for `world_size` data-parallel workers. `load_universal`: the engine
    will resume a universal checkpoint (a ZeRO checkpoint of another world size, training/checkpoint.py)."""
    offload = deepspeed.offload_optimizer and deepspeed.zero_stage > 0
    zero: dict[str, Any] = {
        "stage": deepspeed.zero_stage,
        "contiguous_gradients": True,
        # Overlapping the gradient reduce with backward needs a second CUDA stream; on CPU it only
        # adds copies.
        "overlap_comm": scaling.use_gpu,
        # 50M elements per bucket: large enough to saturate NCCL, small enough for 24 GiB cards.
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": scaling.use_gpu}
    if deepspeed.zero_stage == 3:
        # The bundle is gathered by training/checkpoint.py from the EMA shards, not by DeepSpeed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    optimizer_params: dict[str, Any] = {
        "lr": train.lr,
        "betas": list(train.betas),
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
    }
    if not scaling.use_gpu and not offload:
        optimizer_params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": use_bf16(deepspeed, scaling)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Our loop logs; DeepSpeed's own step prints would repeat it on every rank.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier after `step` optimizer steps:
    1. linear warmup from 1/warmup_steps to 1 over the first `warmup_steps` steps;
    2. cosine decay from 1 to `min_lr_ratio` over the remaining steps, reached at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(train: TrainSection):
    """A callable `optimizer -> LambdaLR` for `deepspeed.initialize(lr_scheduler=...)`."""
    import functools

    import torch

    schedule = functools.partial(
        lr_lambda, warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_lr_ratio=train.min_lr_ratio
    )
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
