"""training/checkpoint.py: a resumed run continues bit for bit.

Real DeepSpeed engines (one process, gloo), real tiny DiT, real files. Multi-worker ZeRO-2/3
checkpoints and the gathered EMA are covered by tests/training/test_loop.py."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from infra.config import load_config
from training.checkpoint import (
    DEEPSPEED_DIR,
    EMA_FILE,
    STATE_FILE,
    UNIVERSAL_DIR,
    ParameterEMA,
    TrainerState,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from training.deepspeed_config import deepspeed_config, make_lr_scheduler
from training.wrap import TrainingModule, build_context, wrap_model


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, as torchrun would set up. Rendezvous through a file, not a TCP
    port: a port found free may be taken by a test running alongside before the store binds it."""
    import deepspeed
    import torch.distributed as dist

    rendezvous = tmp_path_factory.mktemp("gloo") / "store"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # one intra-op thread, as torchrun and Ray give a 1-CPU worker: on a shared 2-core machine
    # torch's default thread pool makes these tiny steps 20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _engine(seed: int, stage: int = 0, universal: bool = False):
    from model.dit import DiT, dit_config

    cfg = load_config("train/tiny", [f"deepspeed.zero_stage={stage}", "scaling.num_workers=1", "train.batch_size=2"])
    torch.manual_seed(seed)
    ds = deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size=1, load_universal=universal)
    with build_context(cfg.deepspeed, ds):
        module = TrainingModule(DiT(dit_config("tiny", 48, 384)))
    engine, _, scheduler = wrap_model(module, cfg.deepspeed, ds, make_lr_scheduler(cfg.train))
    return engine, scheduler, ParameterEMA(engine.module, 0.9, zero3=stage == 3)


def _steps(engine, ema, batch, n: int) -> list[float]:
    from model.rectified_flow import training_loss

    latents, text, text_mask = batch
    losses = []
    for _ in range(n):
        drop = torch.rand(latents.shape[0]) < 0.5  # from the global RNG, which the checkpoint restores
        loss, _ = training_loss(functools.partial(engine, drop_text=drop), latents, text, text_mask)
        engine.backward(loss)
        engine.step()
        ema.update()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "universal"),
    # universal: the path of a resume at another world size (tests/training/test_train_ray.py,
    # test_torchrun.py), here at the same one, where it must change nothing at all
    [(0, False), (2, False), (2, True), (3, True)],
)
def test_resume_continues_bit_for_bit(process_group, tmp_path, stage, universal):
    generator = torch.Generator().manual_seed(7)
    batch = (
        torch.randn(2, 48, 2, 8, 8, generator=generator),  # (B, C, T, H, W) latents
        torch.randn(2, 5, 384, generator=generator),  # (B, L, Dt)
        torch.ones(2, 5, dtype=torch.bool),
    )
    engine, scheduler, ema = _engine(seed=0, stage=stage)
    _steps(engine, ema, batch, 3)
    state = TrainerState(step=3, samples_seen=6, config_hash="abc", mlflow_run_id="run-1", zero_stage=stage)
    save_checkpoint(engine, ema, state, tmp_path / "ckpt")
    expected_losses = _steps(engine, ema, batch, 3)
    expected_lr = scheduler.get_last_lr()
    expected_ema = ema.full_state_dict()

    # a fresh engine with other initial weights and RNG, then the checkpoint
    torch.manual_seed(12345)
    engine2, scheduler2, ema2 = _engine(seed=1, stage=stage, universal=universal)
    restored = load_checkpoint(engine2, ema2, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / UNIVERSAL_DIR).is_dir() == universal
    assert (restored.step, restored.samples_seen, restored.mlflow_run_id) == (3, 6, "run-1")
    assert _steps(engine2, ema2, batch, 3) == expected_losses  # same weights, Adam moments, LR and noise
    assert scheduler2.get_last_lr() == expected_lr
    restored_ema = ema2.full_state_dict()
    assert restored_ema.keys() == expected_ema.keys()
    assert all(torch.equal(restored_ema[k], expected_ema[k]) for k in expected_ema)


@pytest.mark.slow
def test_checkpoint_files_and_bundle_names(process_group, tmp_path):
    from model.dit import DiT, dit_config

    engine, _, ema = _engine(seed=0)
    state = TrainerState(step=5, data_position={"num_samples": 3, "epoch": 0, "consumed": {}})
    save_checkpoint(engine, ema, state, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / EMA_FILE).is_file()
    saved = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    assert saved["deepspeed_tag"] == "step-000005" and len(saved["rng"]) == 1
    assert read_trainer_state(tmp_path / "ckpt").data_position["num_samples"] == 3
    # the EMA is exported under the names model/ uses: a plain DiT loads it strictly
    DiT(dit_config("tiny", 48, 384)).load_state_dict(ema.full_state_dict(), strict=True)


@pytest.mark.slow
def test_failed_universal_conversion_is_one_line_and_leaves_nothing(process_group, tmp_path):
    from training.checkpoint import convert_to_universal

    engine, _, ema = _engine(seed=0)  # ZeRO-0: no ZeRO shards for ds_to_universal to read
    save_checkpoint(engine, ema, TrainerState(step=2), tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match=r"^--resume .*ckpt: converting the ZeRO shards to a universal checkpoint failed: .*optim_states"):
        convert_to_universal(tmp_path / "ckpt", workers=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [DEEPSPEED_DIR, EMA_FILE, STATE_FILE]


def test_not_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=f"--resume {tmp_path}: not a reelforge checkpoint"):
        read_trainer_state(tmp_path)


@pytest.mark.slow
def test_activation_checkpointing_changes_memory_not_results(process_group):
    """wrap_model's first stage: recomputing blocks in backward gives the same loss and weights,
    and the exported names drop the wrapper so a plain DiT loads them."""
    from model.dit import DiT, dit_config
    from training.wrap import CheckpointedBlock

    generator = torch.Generator().manual_seed(3)
    batch = (torch.randn(2, 48, 2, 8, 8, generator=generator), torch.randn(2, 5, 384, generator=generator), torch.ones(2, 5, dtype=torch.bool))
    results = []
    for checkpointing in (False, True):
        cfg = load_config("train/tiny", ["deepspeed.zero_stage=0", "scaling.num_workers=1", f"deepspeed.activation_checkpointing={checkpointing}"])
        torch.manual_seed(0)
        module = TrainingModule(DiT(dit_config("tiny", 48, 384)))
        ds = deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size=1)
        engine, _, _ = wrap_model(module, cfg.deepspeed, ds, make_lr_scheduler(cfg.train))
        assert isinstance(engine.module.dit.blocks[0], CheckpointedBlock) == checkpointing
        ema = ParameterEMA(engine.module, 0.0, zero3=False)
        torch.manual_seed(1)
        losses = _steps(engine, ema, batch, 2)
        results.append((losses, ema.full_state_dict()))
    (plain_losses, plain_weights), (ckpt_losses, ckpt_weights) = results
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    assert ckpt_weights.keys() == plain_weights.keys()
    assert all(torch.allclose(ckpt_weights[k], plain_weights[k], atol=1e-6) for k in plain_weights)
    DiT(dit_config("tiny", 48, 384)).load_state_dict(ckpt_weights, strict=True)
