"""training/deepspeed_config.py: what DeepSpeed is told, per ZeRO stage and device, and the LR schedule.

The dicts are also fed to DeepSpeed's own config parser, so a key it rejects fails here."""

from __future__ import annotations

import pytest

from infra.config import load_config
from training.deepspeed_config import deepspeed_config, lr_lambda, make_lr_scheduler


def _ds(overrides: list[str], world_size: int = 2) -> dict:
    cfg = load_config("train/tiny", overrides)
    return deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_batch_and_precision_on_cpu(stage):
    ds = _ds([f"deepspeed.zero_stage={stage}", "train.batch_size=3", "train.grad_accum_steps=2"], world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["overlap_comm"] is False

    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed's own validation of every key; without a process group it assumes 1 worker
    parsed = DeepSpeedConfig(_ds([f"deepspeed.zero_stage={stage}", "train.batch_size=3", "train.grad_accum_steps=2"], 1))
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 1.0


def test_gpu_gets_bf16_fused_adam_and_overlap():
    ds = _ds(["scaling.use_gpu=true", "deepspeed.zero_stage=2"])
    assert ds["bf16"]["enabled"] is True
    assert "torch_adam" not in ds["optimizer"]["params"]  # FusedAdam on GPU
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert _ds(["scaling.use_gpu=true", "deepspeed.bf16=false"])["bf16"]["enabled"] is False


def test_offload_uses_cpu_adam_only_with_zero():
    ds = _ds(["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"])
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert "offload_optimizer" not in _ds(["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"])["zero_optimization"]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    warmup, total, floor = 10, 110, 0.1
    values = [lr_lambda(s, warmup, total, floor) for s in range(total + 5)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(values[:10], values[1:10]))  # rising during warmup
    decay = values[10:total + 1]
    assert all(b <= a for a, b in zip(decay, decay[1:]))  # then never rising
    assert values[60] == pytest.approx(floor + (1 - floor) * 0.5)  # half way: the cosine mid-point
    assert values[total] == pytest.approx(floor) and values[-1] == pytest.approx(floor)


def test_scheduler_follows_lr_lambda():
    import torch

    cfg = load_config("train/tiny", ["train.lr=0.01", "train.warmup_steps=4", "train.max_steps=20"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
    scheduler = make_lr_scheduler(cfg.train)(optimizer)
    for step in range(8):
        expected = 0.01 * lr_lambda(step, 4, 20, cfg.train.min_lr_ratio)
        assert scheduler.get_last_lr()[0] == pytest.approx(expected)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("preset", ["train/tiny", "train/small", "train/1b"])
def test_every_training_preset_validates_and_deepspeed_accepts_it(preset):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(preset)
    ds = deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size=1)
    assert DeepSpeedConfig(ds).zero_optimization_stage == cfg.deepspeed.zero_stage
    batch_sizes = cfg.model.bucket_shapes()
    assert batch_sizes[0] == (cfg.model.num_frames, cfg.model.width, cfg.model.height)
