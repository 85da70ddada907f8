"""The per-worker training loop: runs under Ray Train (`train_loop`) and under plain torchrun (`run_torchrun`).

    torchrun --nproc_per_node 2 -m infra train --launcher torchrun --config configs/train/tiny.yaml --data SHARDS

Everything a worker needs arrives in one `WorkerArgs` (the training config group plus the launch
paths), validated again on the worker. The two launchers differ only in a session
(training/sessions.py): how the process group comes up, where checkpoints go and how one is
found on resume.

`run_training` reads top to bottom as the run goes:
  1. set up: device and process group, the frozen autoencoder and text encoder, the DiT wrapped
     by DeepSpeed, its EMA;
  2. resume: weights, optimizer, EMA, RNG and data position from the checkpoint, if any;
  3. track: rank 0 continues the checkpoint's (or the driver's) MLflow run;
  4. train: one optimizer step, then log, checkpoint and evaluate when each is due;
  5. export: the inference bundle from the EMA weights (training/export.py).

One optimizer step (`train.grad_accum_steps` micro-steps):
  batch of same-shape uint8 clips (training/data.py) -> frames in [-1, 1] -> frozen autoencoder
  -> latents (B, C, T, H, W) -> per-sample conditioning mask and text dropout -> rectified-flow
  loss (model/rectified_flow.py) -> DeepSpeed backward/step (ZeRO, clipping, LR schedule) -> EMA.
Then the step's clips are marked consumed in the data position, so a checkpoint records exactly
the clips trained on, never those a DataLoader worker had merely prefetched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from model.autoencoders import load_autoencoder
from model.conditioning import sample_condition_masks
from model.dit import DiT, DiTConfig, dit_config
from model.rectified_flow import training_loss
from model.storage import config_hash
from model.text_encoders import load_text_encoder
from training.caption_sets import prompt_style
from training.checkpoint import (
    ParameterEMA,
    TrainerState,
    load_checkpoint,
    needs_universal,
    read_trainer_state,
    save_checkpoint,
)
from training.config import ScalingSection, TrainingConfig, TrainSection
from training.clip_index import ClipIndex, held_out_note, read_clip_index, without_held_out
from training.data import ClipBatches, DataPosition, TextEmbeddingCache, frames_to_model, make_loader
from training.deepspeed_config import deepspeed_config, make_lr_scheduler, use_bf16
from training.eval_samples import log_eval_samples
from training.export import export_bundle
from training.metrics import MetricsWindow, format_eta, peak_flops_per_device, sum_over_ranks
from training.preflight import PreflightError, check_world_size, read_resume_state
from training.run_dir import check_outputs_last, check_run_record, nothing_to_resume, run_identity, write_run_record
from training.sessions import RaySession, Session, TorchrunSession, latest_torchrun_checkpoint
from training.tracking import TAG_OUT, Tracker, resolve_tracking_uri, run_params, run_tags
from training.wrap import TrainingModule, build_context, wrap_model

logger = logging.getLogger(__name__)

WORKERS_DIR = "workers"  # pid files and optional per-rank sample logs


class WorkerArgs(BaseModel):
    """The one argument of the worker function: config plus where to read, write and resume from."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    config: TrainingConfig
    data: str
    out: str
    mlflow_run_id: str | None = None  # the driver's run; a checkpoint's run id takes precedence
    run_name: str | None = None  # of an MLflow run the worker starts itself (torchrun); default: out's folder name
    resume_from: str | None = None  # a checkpoint folder (--resume); Ray's own restart checkpoint wins


@dataclass
class Components:
    """What `set_up` builds on one worker."""

    device: torch.device
    autoencoder: Any  # frozen: pixels -> latents
    text_encoder: Any  # frozen: captions -> embeddings
    dit_cfg: DiTConfig
    engine: Any  # DeepSpeed engine around TrainingModule(DiT)
    scheduler: Any  # the LR schedule DeepSpeed steps
    ema: ParameterEMA
    compute_dtype: torch.dtype


@dataclass
class Progress:
    """One worker's running state besides `TrainerState` (which a checkpoint holds)."""

    position: DataPosition  # clips consumed, this rank's view (merged over ranks at a checkpoint)
    batches: Iterator[dict[str, Any]]
    text_cache: TextEmbeddingCache
    sample_log: TextIO | None  # train.log_sample_ids: every step's clip ids
    start_step: int
    start_time: float = field(default_factory=time.perf_counter)
    window: MetricsWindow = field(default_factory=MetricsWindow)
    skipped_total: dict[str, int] = field(default_factory=dict)  # reason -> clips, this attempt
    unsynced_samples: int = 0  # clips this rank trained on since the last checkpoint
    prompt_style: dict[str, Any] = field(default_factory=dict)  # training captions the bundle records


# --- entry points ------------------------------------------------------------------------------


def train_loop(config_dict: dict[str, Any]) -> None:
    """Ray Train worker function: `TorchTrainer(train_loop, train_loop_config=WorkerArgs(...).model_dump())`."""
    session = RaySession()
    session.configure_logging()
    run_training(WorkerArgs.model_validate(config_dict), session)


def run_torchrun(
    config: TrainingConfig,
    data: str,
    out: Path,
    resume: str | None = None,
    *,
    resume_out: bool = False,
    run_name: str | None = None,
) -> TrainerState:
    """Train in this torchrun process (one rank of `torchrun --nproc_per_node N`); returns the final
    state. `resume_out` (--resume alone) continues the newest checkpoint in `<out>/checkpoints`.
    The launch checks of the output folder (training/run_dir.py) and of a --resume that is no
    checkpoint, or one of another ZeRO stage, raise `PreflightError` (one line) before the process
    group starts."""
    session = TorchrunSession()
    check_outputs_last(out, resolve_tracking_uri(config.mlflow, out))
    resume_requested = resume_out or resume is not None
    if resume_out and resume is None:
        latest = latest_torchrun_checkpoint(out)
        if latest is None:
            raise nothing_to_resume(out)
        resume = str(latest)
    if resume is not None:
        check_world_size(config, read_resume_state(resume))
    check_held_out(config, data)
    identity = run_identity(config, data)
    check_run_record(out, identity, resume=resume_requested)
    if session.rank == 0:
        write_run_record(out, identity)
    args = WorkerArgs(config=config, data=data, out=str(out), resume_from=resume, run_name=run_name)
    state = run_training(args, session)
    if dist.is_initialized():
        dist.destroy_process_group()
    return state


def check_held_out(config: TrainingConfig, data: str) -> None:
    """A launch check (PreflightError): `data.held_out` leaves some clip to train on. Preflight counts
    clips before the split; this small dataset case would otherwise fail only on the workers."""
    try:
        without_held_out(read_clip_index(data, config.data.caption_set), config.data.held_out)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None


# --- the loop ---------------------------------------------------------------------------------


def run_training(args: WorkerArgs, session: Session) -> TrainerState:
    """Train until `train.max_steps`, resuming if a checkpoint is given; returns the final state."""
    cfg, out = args.config, Path(args.out)
    device = set_up_device(cfg.scaling, session)
    _write_pid(out, session.rank)
    with contextlib.ExitStack() as resources:  # keeps a downloaded restart checkpoint until loaded
        resume_dir = _resume_dir(session, args, resources)
        parts = set_up(cfg, device, session.world_size, resume_dir)
        state = resume(parts, cfg, session, resume_dir)
    # the clips this run trains on: sample indices, the data position and every count are over these
    index = without_held_out(read_clip_index(args.data, cfg.data.caption_set), cfg.data.held_out)
    tracker = start_tracking(cfg, out, state, args, session.rank)
    progress = open_data(parts, cfg, index, state, out, session)
    _log_start(parts, cfg, index, session, state.step)

    while state.step < cfg.train.max_steps:
        optimizer_step(parts, cfg.train, state, progress, session.rank)
        if _due(state.step, cfg.train.log_every_steps, cfg.train.max_steps):
            log_progress(parts, cfg.train, state, progress, tracker, session.world_size)
        if _due(state.step, cfg.checkpoint.every_steps, cfg.train.max_steps):
            checkpoint(parts, state, progress, session, out, tracker)
        if cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0:
            evaluate(parts, cfg, progress, session.rank, tracker, state.step)

    finish(parts, cfg, state, progress, out, session.rank, tracker)
    return state


# --- 1. set up ---------------------------------------------------------------------------------


def set_up_device(scaling: ScalingSection, session: Session) -> torch.device:
    """This worker's device, then the process group on it (NCCL on GPUs, gloo on CPUs)."""
    use_gpu = scaling.use_gpu and torch.cuda.is_available()
    if scaling.use_gpu and not use_gpu:
        raise RuntimeError("scaling.use_gpu=true but this worker sees no CUDA device")
    device = session.device(use_gpu)
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        # one intra-op thread per reserved CPU: torch's default pool oversubscribes shared hosts
        torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))
    session.init_distributed("nccl" if use_gpu else "gloo")
    return device


def set_up(cfg: TrainingConfig, device: torch.device, world_size: int, resume_dir: Path | None) -> Components:
    """The frozen encoders, and the DiT wrapped by DeepSpeed (training/wrap.py) with its EMA."""
    # Same initial weights everywhere (ZeRO 0-2 also broadcast rank 0's); per-rank streams after.
    torch.manual_seed(cfg.train.seed)
    autoencoder = load_autoencoder(cfg.model.autoencoder, device=device)
    text_encoder = load_text_encoder(cfg.model.text_encoder, device=device)
    dit_cfg = dit_config(cfg.model.preset, autoencoder.latent_channels, text_encoder.dim, **cfg.model.dit_overrides())
    # Longer captions are truncated to what the DiT's cross-attention accepts.
    text_encoder.max_length = min(text_encoder.max_length, dit_cfg.max_text_tokens)
    # The checkpoint is looked at before the engine exists: DeepSpeed must be told at initialize
    # to load a universal checkpoint.
    universal = resume_dir is not None and needs_universal(read_trainer_state(resume_dir), world_size)
    ds_config = deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size, load_universal=universal)
    with build_context(cfg.deepspeed, ds_config):
        module = TrainingModule(DiT(dit_cfg))
    engine, _, scheduler = wrap_model(module, cfg.deepspeed, ds_config, make_lr_scheduler(cfg.train))
    ema = ParameterEMA(engine.module, cfg.train.ema_decay, zero3=cfg.deepspeed.zero_stage == 3)
    compute_dtype = torch.bfloat16 if use_bf16(cfg.deepspeed, cfg.scaling) else torch.float32
    return Components(device, autoencoder, text_encoder, dit_cfg, engine, scheduler, ema, compute_dtype)


def _resume_dir(session: Session, args: WorkerArgs, resources: contextlib.ExitStack) -> Path | None:
    """Ray's restart checkpoint (entered on `resources`, which keeps a downloaded copy alive until
    it is closed), else --resume, else None."""
    restart = session.restart_checkpoint()
    if restart is not None:
        return Path(resources.enter_context(restart.as_directory()))
    return Path(args.resume_from) if args.resume_from is not None else None


# --- 2. resume, 3. track ---------------------------------------------------------------------


def resume(parts: Components, cfg: TrainingConfig, session: Session, resume_dir: Path | None) -> TrainerState:
    """The checkpoint's state, with its weights, optimizer, EMA and RNG loaded into `parts`; or a
    fresh state. Either way the state then describes this run (config hash, world size, stage)."""
    current_hash = config_hash(cfg)
    state = TrainerState(config_hash=current_hash, world_size=session.world_size, zero_stage=cfg.deepspeed.zero_stage)
    if resume_dir is not None:
        state = load_checkpoint(parts.engine, parts.ema, resume_dir)
    if state.step == 0 or session.rank >= len(state.rng):
        # fresh start, or a rank that did not exist before the resume: its own seeded streams
        torch.manual_seed(cfg.train.seed * 1_000_003 + state.step * 101 + session.rank)
    if state.config_hash and state.config_hash != current_hash:
        logger.warning("config changed since the checkpoint (hash %s -> %s)", state.config_hash, current_hash)
    state.config_hash, state.world_size, state.zero_stage = current_hash, session.world_size, cfg.deepspeed.zero_stage
    return state


def start_tracking(cfg: TrainingConfig, out: Path, state: TrainerState, args: WorkerArgs, rank: int) -> Tracker:
    """Rank 0 continues the checkpoint's MLflow run, else the driver's, else starts one (params on
    a fresh start only); every other rank gets a tracker whose methods do nothing."""
    tracker = Tracker(cfg.mlflow, out, rank=rank)
    # Tags hash the data manifest and ask git: work only rank 0's (active) tracker needs.
    tags = run_tags(state.config_hash, args.data, cfg.data.held_out) | {TAG_OUT: str(out.resolve())} if rank == 0 else {}
    run_name = args.run_name or out.name
    run_id = tracker.start_or_resume(state.mlflow_run_id or args.mlflow_run_id, run_name=run_name, tags=tags)
    if rank == 0:
        state.mlflow_run_id = run_id
        if state.step == 0:
            tracker.log_params(run_params(cfg, args.data))
    return tracker


def open_data(
    parts: Components, cfg: TrainingConfig, index: ClipIndex, state: TrainerState, out: Path, session: Session
) -> Progress:
    """This rank's endless batches from the checkpoint's data position on, and the loop's counters."""
    position = (
        DataPosition.from_state_dict(state.data_position, len(index))
        if state.data_position is not None
        else DataPosition(len(index))
    )
    dataset = ClipBatches(index, cfg.model, cfg.train.batch_size, cfg.train.seed, session.rank, session.world_size, position)
    sample_log = None
    if cfg.train.log_sample_ids:
        sample_log = _open_sample_log(out / WORKERS_DIR / f"samples-rank-{session.rank}.jsonl")
    return Progress(
        position=position,
        batches=iter(make_loader(dataset, cfg.train.data_workers)),
        text_cache=TextEmbeddingCache(parts.text_encoder, cfg.train.text_cache_size),
        sample_log=sample_log,
        start_step=state.step,
        prompt_style=prompt_style(index, cfg.data.caption_set) if session.rank == 0 else {},
    )


def _log_start(parts: Components, cfg: TrainingConfig, index: ClipIndex, session: Session, step: int) -> None:
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in parts.engine.module.parameters())
    logger.info(
        "training %s (%s params) on %d clips (%s), %d workers x batch %d x accum %d, ZeRO %d, %s, from step %d",
        cfg.model.preset, f"{params:,}", len(index), held_out_note(index), session.world_size, cfg.train.batch_size,
        cfg.train.grad_accum_steps, cfg.deepspeed.zero_stage, session.name, step,
    )  # fmt: skip


# --- 4. train: one step, then log / checkpoint / evaluate when due -----------------------------


def optimizer_step(parts: Components, train: TrainSection, state: TrainerState, progress: Progress, rank: int) -> None:
    """`train.grad_accum_steps` micro-steps (DeepSpeed steps the optimizer at the boundary), the
    EMA update, then the step's clips marked consumed: only now, after the step."""
    step_start = time.perf_counter()
    step_ids: list[tuple[list[int], list[int]]] = []
    for _ in range(train.grad_accum_steps):
        wait_start = time.perf_counter()
        batch = next(progress.batches, None)
        if batch is None:
            # streams are endless; only readers that own no clip stop (preflight prevents that)
            raise RuntimeError(f"rank {rank}: every data reader stopped; no clips reach this worker")
        progress.window.data_wait_s += time.perf_counter() - wait_start
        _micro_step(parts, train, batch, progress)
        step_ids.append((batch["epochs"] + batch["skipped_epochs"], batch["indices"] + batch["skipped_indices"]))
        for reason, count in batch["skipped"].items():
            progress.skipped_total[reason] = progress.skipped_total.get(reason, 0) + count
            progress.window.skipped += count
    parts.ema.update()
    state.step += 1
    progress.window.grad_norm = parts.engine.get_global_grad_norm()  # after clipping's measurement; None before the first step
    for epochs, indices in step_ids:
        progress.position.mark(epochs, indices)
    if progress.sample_log is not None:
        progress.sample_log.write(json.dumps({"step": state.step, "ids": [list(x) for x in step_ids]}) + "\n")
        progress.sample_log.flush()
    progress.window.step_s += time.perf_counter() - step_start
    progress.window.steps += 1


def _micro_step(parts: Components, train: TrainSection, batch: dict[str, Any], progress: Progress) -> None:
    """Forward and backward of one batch; DeepSpeed accumulates until the step boundary."""
    device = parts.device
    with torch.no_grad():
        # uint8 crosses to the device (4x fewer bytes than float), then scales there
        frames = frames_to_model(batch["frames"].to(device, non_blocking=True))  # (B, 3, T, H, W)
        latents = parts.autoencoder.encode(frames).to(parts.compute_dtype)  # (B, C, T', H', W')
        text, text_mask = progress.text_cache.embed(batch["captions"])  # (B, L, Dt), (B, L)
    B, _, num_latent_frames = latents.shape[:3]
    cond_mask = sample_condition_masks(B, num_latent_frames, train.conditioning).to(device)  # (B, T')
    drop_text = (torch.rand(B) < train.text_dropout).to(device)  # (B,)
    loss, stats = training_loss(
        functools.partial(parts.engine, drop_text=drop_text),
        latents,
        text.to(device, parts.compute_dtype),
        text_mask.to(device),
        cond_mask,
        shift=train.timestep_shift,  # None: the latent size's default
    )
    parts.engine.backward(loss)
    parts.engine.step()  # an optimizer step (and LR step) only at the accumulation boundary
    window = progress.window
    window.loss_sum += stats["loss"]  # stays a device tensor: no host sync until the log line
    window.micro_steps += 1
    window.samples += B
    window.count_tokens(frames.shape[2:], latents.shape[2:], parts.dit_cfg, text.shape[1], B)
    progress.unsynced_samples += B


def _due(step: int, every_steps: int, max_steps: int) -> bool:
    return step % every_steps == 0 or step == max_steps


def log_progress(
    parts: Components, train: TrainSection, state: TrainerState, progress: Progress, tracker: Tracker, world_size: int
) -> None:
    """The window's metrics, reduced over ranks: one log line (rank 0) and MLflow; then a new window."""
    metrics = progress.window.reduce(world_size, parts.device, peak_flops_per_device(parts.device))
    metrics["lr"] = parts.scheduler.get_last_lr()[0]
    metrics["epoch"] = float(progress.position.epoch)
    steps_done = state.step - progress.start_step
    eta_s = (time.perf_counter() - progress.start_time) / steps_done * (train.max_steps - state.step)
    logger.info(
        "step %d/%d loss %.4f lr %.2e clips/s %.1f data-wait %.1f%% ETA %s",
        state.step, train.max_steps, metrics["loss"], metrics["lr"], metrics["clips_per_s"],
        100 * metrics["data_wait_fraction"], format_eta(eta_s),
    )  # fmt: skip
    tracker.log_metrics(metrics, step=state.step)
    progress.window = MetricsWindow()


def checkpoint(
    parts: Components, state: TrainerState, progress: Progress, session: Session, out: Path, tracker: Tracker
) -> None:
    """Count every rank's clips, merge every rank's data position into the state, save, publish (Ray: report)."""
    state.samples_seen += sum_over_ranks(progress.unsynced_samples, parts.device)
    progress.unsynced_samples = 0
    positions: list[Any] = [None] * session.world_size
    dist.all_gather_object(positions, progress.position.state_dict())
    merged = DataPosition(progress.position.num_samples)
    for other in positions:
        merged.merge(DataPosition.from_state_dict(other, progress.position.num_samples))
    state.data_position = merged.state_dict()
    directory = session.checkpoint_dir(out, state.step)
    with tracker.checkpoint_timer():
        save_checkpoint(parts.engine, parts.ema, state, directory)
        session.publish(directory, {"step": state.step, "samples_seen": state.samples_seen})


def evaluate(parts: Components, cfg: TrainingConfig, progress: Progress, rank: int, tracker: Tracker, step: int) -> None:
    """Eval samples from the EMA weights (training/eval_samples.py), timed apart from the steps."""
    # Outside step_s: the window's clips/s and step time measure training only.
    eval_start = time.perf_counter()
    log_eval_samples(parts.ema, parts.dit_cfg, cfg, parts.autoencoder, parts.text_encoder, parts.device, rank, tracker, step)
    progress.window.eval_s += time.perf_counter() - eval_start


# --- 5. export ---------------------------------------------------------------------------------


def finish(
    parts: Components, cfg: TrainingConfig, state: TrainerState, progress: Progress, out: Path, rank: int, tracker: Tracker
) -> None:
    """Export the bundle, log what this attempt did, end the MLflow run."""
    if progress.sample_log is not None:
        progress.sample_log.close()
    export_bundle(parts.ema, parts.dit_cfg, cfg, out, rank, tracker, progress.prompt_style)
    elapsed_s = time.perf_counter() - progress.start_time
    if rank == 0:
        logger.info(
            "done: step %d, %d clips seen, %.1f s this attempt, skipped on rank 0 %s, text cache %d hits / %d misses",
            state.step, state.samples_seen, elapsed_s, progress.skipped_total or "none",
            progress.text_cache.hits, progress.text_cache.misses,
        )  # fmt: skip
    tracker.end("FINISHED")


# --- worker files ------------------------------------------------------------------------------


def _open_sample_log(path: Path) -> TextIO:
    """Append mode; a line torn by a killed predecessor is ended first, so the next record parses."""
    handle = path.open("a+b")
    if handle.tell() > 0:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            handle.write(b"\n")
    handle.close()
    return path.open("a")


def _write_pid(out: Path, rank: int) -> None:
    """<out>/workers/rank-R.pid: lets an operator (or a test) find and signal a worker."""
    directory = out / WORKERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{rank}.pid").write_text(str(os.getpid()))
