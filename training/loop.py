"""The per-worker training loop: runs under Ray Train (`train_loop`) and under plain `torchrun`.

    torchrun --nproc_per_node 2 -m training.loop --config configs/train/tiny.yaml --data SHARDS [--out DIR]

Everything a worker needs arrives in one `WorkerArgs` (the full `ReelforgeConfig` plus the launch
paths), validated again on the worker. The two launchers differ only in a `Session`: how the
process group comes up, where checkpoints go and how one is found on resume.

One optimizer step (`train.grad_accum_steps` micro-steps):
  batch of same-shape uint8 clips (training/data.py) -> frames in [-1, 1] -> frozen autoencoder
  -> latents (B, C, T, H, W) -> per-sample conditioning mask and text dropout -> rectified-flow
  loss (model/rectified_flow.py) -> DeepSpeed backward/step (ZeRO, clipping, LR schedule) -> EMA.
Then the step's clips are marked consumed in the data position, so a checkpoint records exactly
the clips trained on, never those a DataLoader worker had merely prefetched.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from infra.config import ReelforgeConfig, add_config_args, config_from_args
from model.storage import config_hash
from infra.logs import setup_logging
from model.dit import flops_per_token
from training.checkpoint import (
    ParameterEMA,
    TrainerState,
    checkpoint_tag,
    load_checkpoint,
    needs_universal,
    read_trainer_state,
    save_checkpoint,
)
from training.data import ClipBatches, DataPosition, TextEmbeddingCache, frames_to_model, make_loader, read_clip_index
from training.deepspeed_config import deepspeed_config, make_lr_scheduler, use_bf16
from training.wrap import TrainingModule, build_context, wrap_model

logger = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
WORKERS_DIR = "workers"  # pid files and optional per-rank sample logs


class WorkerArgs(BaseModel):
    """The one argument of the worker function: config plus where to read, write and resume from."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    config: ReelforgeConfig
    data: str
    out: str
    mlflow_run_id: str | None = None  # the driver's run; a checkpoint's run id takes precedence
    resume_from: str | None = None  # a checkpoint folder (--resume); Ray's own restart checkpoint wins


# --- sessions: what differs between Ray Train and torchrun ------------------------------------


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
        # Ray Train V2 already gives the root logger a console and a per-run file handler; adding
        # ours would print every line twice. Only the level is ours: warnings only off rank 0.
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
    shared folder, so all ranks must see the same disk)."""

    name = "torchrun"

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def configure_logging(self) -> None:
        setup_logging(rank=self.rank)

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
        return out / "checkpoints" / checkpoint_tag(step)

    def publish(self, directory: Path, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            logger.info("checkpoint %s", directory)


# --- the loop ---------------------------------------------------------------------------------


def train_loop(config_dict: dict[str, Any]) -> None:
    """Ray Train worker function: `TorchTrainer(train_loop, train_loop_config=WorkerArgs(...).model_dump())`."""
    run_training(WorkerArgs.model_validate(config_dict), RaySession())


def run_training(args: WorkerArgs, session: RaySession | TorchrunSession) -> TrainerState:
    """Train until `train.max_steps`, resuming if a checkpoint is given; returns the final state."""
    from model.autoencoders import load_autoencoder
    from model.conditioning import sample_condition_masks
    from model.dit import DiT, dit_config
    from model.rectified_flow import training_loss
    from model.text_encoders import load_text_encoder
    from training.tracking import Tracker, flat_params, run_tags

    cfg = args.config
    out = Path(args.out)
    rank, world_size = session.rank, session.world_size
    session.configure_logging()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    if cfg.scaling.use_gpu and not use_gpu:
        raise RuntimeError("scaling.use_gpu=true but this worker sees no CUDA device")
    device = session.device(use_gpu)
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        # one intra-op thread per reserved CPU: torch's default pool oversubscribes shared hosts
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    session.init_distributed("nccl" if use_gpu else "gloo")
    _write_pid(out, rank)

    # Same initial weights everywhere (ZeRO 0-2 also broadcast rank 0's); per-rank streams after.
    torch.manual_seed(cfg.train.seed)
    autoencoder = load_autoencoder(cfg.model.autoencoder, device=device)
    text_encoder = load_text_encoder(cfg.model.text_encoder, device=device)
    dit_cfg = dit_config(cfg.model.preset, autoencoder.latent_channels, text_encoder.dim, **cfg.model.dit_overrides())
    # Longer captions are truncated to what the DiT's cross-attention accepts.
    text_encoder.max_length = min(text_encoder.max_length, dit_cfg.max_text_tokens)
    # The checkpoint to resume (Ray's own restart checkpoint wins over --resume) is looked at before
    # the engine exists: DeepSpeed must be told at initialize to load a universal checkpoint.
    resources = contextlib.ExitStack()
    resume_dir = _resume_dir(session, args, resources)
    universal = resume_dir is not None and needs_universal(read_trainer_state(resume_dir), world_size)
    ds_config = deepspeed_config(cfg.train, cfg.deepspeed, cfg.scaling, world_size, load_universal=universal)
    with build_context(cfg.deepspeed, ds_config):
        module = TrainingModule(DiT(dit_cfg))
    engine, _, scheduler = wrap_model(module, cfg.deepspeed, ds_config, make_lr_scheduler(cfg.train))
    compute_dtype = torch.bfloat16 if use_bf16(cfg.deepspeed, cfg.scaling) else torch.float32
    ema = ParameterEMA(engine.module, cfg.train.ema_decay, zero3=cfg.deepspeed.zero_stage == 3)

    # --- resume ---
    index = read_clip_index(args.data)
    state = TrainerState(config_hash=config_hash(cfg), world_size=world_size, zero_stage=cfg.deepspeed.zero_stage)
    with resources:
        if resume_dir is not None:
            state = load_checkpoint(engine, ema, resume_dir)
    if state.step == 0 or rank >= len(state.rng):
        # fresh start, or a rank that did not exist before the resume: its own seeded streams
        torch.manual_seed(cfg.train.seed * 1_000_003 + state.step * 101 + rank)
    if state.config_hash and state.config_hash != config_hash(cfg):
        logger.warning("config changed since the checkpoint (hash %s -> %s)", state.config_hash, config_hash(cfg))
    state.config_hash, state.world_size, state.zero_stage = config_hash(cfg), world_size, cfg.deepspeed.zero_stage
    position = (
        DataPosition.from_state_dict(state.data_position, len(index))
        if state.data_position is not None
        else DataPosition(len(index))
    )

    # --- tracking (rank 0) ---
    tracker = Tracker(cfg.mlflow, out, rank=rank)
    # Tags hash the data manifest and ask git: work only rank 0's (active) tracker needs.
    tags = run_tags(state.config_hash, args.data) if rank == 0 else {}
    run_id = tracker.start_or_resume(state.mlflow_run_id or args.mlflow_run_id, run_name=out.name, tags=tags)
    if rank == 0:
        state.mlflow_run_id = run_id
        if state.step == 0:
            tracker.log_params(flat_params(cfg))

    # --- data ---
    dataset = ClipBatches(index, cfg.model, cfg.train.batch_size, cfg.train.seed, rank, world_size, position)
    batches = iter(make_loader(dataset, cfg.train.data_workers))
    text_cache = TextEmbeddingCache(text_encoder, cfg.train.text_cache_size)
    cond_probs = cfg.train.conditioning
    sample_log = _open_sample_log(out / WORKERS_DIR / f"samples-rank-{rank}.jsonl") if cfg.train.log_sample_ids else None

    logger.info(
        "training %s (%s params) on %d clips, %d workers x batch %d x accum %d, ZeRO %d, %s, from step %d",
        cfg.model.preset,
        f"{sum(p.ds_numel if hasattr(p, 'ds_numel') else p.numel() for p in engine.module.parameters()):,}",
        len(index), world_size, cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.deepspeed.zero_stage,
        session.name, state.step,
    )
    window = _Window()
    start_step, start_time = state.step, time.perf_counter()
    skipped_total: dict[str, int] = {}
    unsynced_samples = 0  # clips this rank trained on since the last checkpoint
    while state.step < cfg.train.max_steps:
        step_start = time.perf_counter()
        step_ids: list[tuple[list[int], list[int]]] = []
        for _ in range(cfg.train.grad_accum_steps):
            wait_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                # streams are endless; only readers that own no clip stop (preflight prevents that)
                raise RuntimeError(f"rank {rank}: every data reader stopped; no clips reach this worker")
            window.data_wait_s += time.perf_counter() - wait_start
            with torch.no_grad():
                # uint8 crosses to the device (4x fewer bytes than float), then scales there
                frames = frames_to_model(batch["frames"].to(device, non_blocking=True))  # (B, 3, T, H, W)
                latents = autoencoder.encode(frames).to(compute_dtype)  # (B, C, T', H', W')
                text, text_mask = text_cache.embed(batch["captions"])  # (B, L, Dt), (B, L)
            B, _, num_latent_frames = latents.shape[:3]
            cond_mask = sample_condition_masks(B, num_latent_frames, cond_probs).to(device)  # (B, T')
            drop_text = (torch.rand(B) < cfg.train.text_dropout).to(device)  # (B,)
            loss, stats = training_loss(
                functools.partial(engine, drop_text=drop_text),
                latents,
                text.to(device, compute_dtype),
                text_mask.to(device),
                cond_mask,
                shift=cfg.train.timestep_shift,  # None: the latent size's default
            )
            engine.backward(loss)
            engine.step()  # an optimizer step (and LR step) only at the accumulation boundary
            window.loss_sum += stats["loss"]  # stays a device tensor: no host sync until the log line
            window.micro_steps += 1
            window.samples += B
            window.count_tokens(frames.shape[2:], latents.shape[2:], dit_cfg, text.shape[1], B)
            unsynced_samples += B
            step_ids.append((batch["epochs"] + batch["skipped_epochs"], batch["indices"] + batch["skipped_indices"]))
            for reason, count in batch["skipped"].items():
                skipped_total[reason] = skipped_total.get(reason, 0) + count
                window.skipped += count
        ema.update()
        state.step += 1
        window.grad_norm = engine.get_global_grad_norm()  # after clipping's measurement; None before the first step
        for epochs, indices in step_ids:
            position.mark(epochs, indices)
        if sample_log is not None:
            sample_log.write(json.dumps({"step": state.step, "ids": [list(x) for x in step_ids]}) + "\n")
            sample_log.flush()
        window.step_s += time.perf_counter() - step_start
        window.steps += 1

        if state.step % cfg.train.log_every_steps == 0 or state.step == cfg.train.max_steps:
            metrics = window.reduce(world_size, device, peak_flops_per_device(device))
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["epoch"] = float(position.epoch)
            steps_done = state.step - start_step
            eta_s = (time.perf_counter() - start_time) / steps_done * (cfg.train.max_steps - state.step)
            logger.info(
                "step %d/%d loss %.4f lr %.2e clips/s %.1f data-wait %.1f%% ETA %s",
                state.step, cfg.train.max_steps, metrics["loss"], metrics["lr"], metrics["clips_per_s"],
                100 * metrics["data_wait_fraction"], _format_eta(eta_s),
            )
            tracker.log_metrics(metrics, step=state.step)
            window = _Window()
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps:
            state.samples_seen += _sum_over_ranks(unsynced_samples, device)
            unsynced_samples = 0
            _checkpoint(engine, ema, state, position, session, out, tracker)
        if cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0:
            # Outside step_s: the window's clips/s and step time measure training only.
            eval_start = time.perf_counter()
            _log_eval_samples(ema, dit_cfg, cfg, autoencoder, text_encoder, device, rank, tracker, state.step)
            window.eval_s += time.perf_counter() - eval_start

    if sample_log is not None:
        sample_log.close()
    _export_bundle(ema, dit_cfg, cfg, out, rank, tracker)
    elapsed_s = time.perf_counter() - start_time
    if rank == 0:
        logger.info(
            "done: step %d, %d clips seen, %.1f s this attempt, skipped on rank 0 %s, text cache %d hits / %d misses",
            state.step, state.samples_seen, elapsed_s, skipped_total or "none", text_cache.hits, text_cache.misses,
        )
    tracker.end("FINISHED")
    return state


def _resume_dir(session: RaySession | TorchrunSession, args: WorkerArgs, resources: contextlib.ExitStack) -> Path | None:
    """Ray's restart checkpoint (entered on `resources`, which keeps a downloaded copy alive until
    it is closed), else --resume, else None."""
    restart = session.restart_checkpoint()
    if restart is not None:
        return Path(resources.enter_context(restart.as_directory()))
    return Path(args.resume_from) if args.resume_from is not None else None


class _Window:
    """Counters over one logging interval, reduced across ranks when logged."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.micro_steps = 0
        self.samples = 0
        self.skipped = 0  # bad or too-short clips the readers passed over
        self.steps = 0
        self.step_s = 0.0
        self.data_wait_s = 0.0
        self.eval_s = 0.0  # rank 0 sampling eval videos (other ranks wait for it in the next collective)
        self.tokens = 0  # DiT tokens (spacetime patches) trained on
        self.flops = 0.0  # model FLOPs of those tokens (flops_per_token: 6 x params + attention)
        self.bucket_tokens: dict[str, int] = {}  # "TxHxW" of the pixel clip -> tokens
        self.grad_norm: Any = None

    def count_tokens(self, frame_shape: Any, latent_shape: Any, dit_cfg: Any, num_text_tokens: int, batch: int) -> None:
        """Account one micro-batch: frame_shape (T, H, W) names its bucket, latent_shape (T', H', W') its tokens."""
        pt, ph, pw = dit_cfg.patch_size
        num_tokens = (latent_shape[0] // pt) * (latent_shape[1] // ph) * (latent_shape[2] // pw)
        tokens = batch * num_tokens
        self.tokens += tokens
        self.flops += flops_per_token(dit_cfg, num_tokens, num_text_tokens) * tokens
        bucket = "x".join(str(int(d)) for d in frame_shape)
        self.bucket_tokens[bucket] = self.bucket_tokens.get(bucket, 0) + tokens

    def reduce(self, world_size: int, device: torch.device, peak_flops: float | None) -> dict[str, float]:
        local = torch.tensor(
            [float(self.loss_sum), self.micro_steps, self.samples, self.skipped, self.step_s, self.data_wait_s,
             self.tokens, self.flops],
            dtype=torch.float64,
        ).to(device)
        buckets: list[dict[str, int]] = [self.bucket_tokens]
        if dist.is_initialized():
            dist.all_reduce(local)  # sums over ranks
            # ranks train different buckets, so the key sets differ: gather the small dicts instead
            buckets = [{} for _ in range(world_size)]
            dist.all_gather_object(buckets, self.bucket_tokens)
        loss_sum, micro_steps, samples, skipped, step_s, data_wait_s, tokens, flops = local.tolist()
        step_s_per_rank = step_s / world_size
        wall_s = max(step_s_per_rank, 1e-9)
        metrics = {
            "loss": loss_sum / max(1, micro_steps),
            "clips_per_s": samples / wall_s,
            "tokens_per_s": tokens / wall_s,
            "step_s": step_s_per_rank / max(1, self.steps),
            "data_wait_fraction": data_wait_s / max(step_s, 1e-9),
            "skipped_clips": skipped,
            "eval_s": self.eval_s,
        }
        if self.grad_norm is not None:
            metrics["grad_norm"] = float(self.grad_norm)
        for bucket in sorted({key for rank_buckets in buckets for key in rank_buckets}):
            # per-bucket throughput over the window's wall time: how much each shape contributes
            metrics[f"bucket/{bucket}/tokens_per_s"] = sum(b.get(bucket, 0) for b in buckets) / wall_s
        if peak_flops:
            metrics["mfu"] = flops / wall_s / (peak_flops * world_size)
        return metrics


# Dense bf16 tensor-core peak per GPU (vendor datasheets, without sparsity), for the MFU estimate.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops_per_device(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s when it is a GPU we know; None (no MFU metric) on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def _sum_over_ranks(value: int, device: torch.device) -> int:
    total = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total.item())


def _checkpoint(
    engine: Any, ema: ParameterEMA, state: TrainerState, position: DataPosition, session: Any, out: Path, tracker: Any
) -> None:
    """Merge every rank's data position into the state, save, publish (Ray: report)."""
    states: list[Any] = [None] * session.world_size
    dist.all_gather_object(states, position.state_dict())
    merged = DataPosition(position.num_samples)
    for other in states:
        merged.merge(DataPosition.from_state_dict(other, position.num_samples))
    state.data_position = merged.state_dict()
    directory = session.checkpoint_dir(out, state.step)
    with tracker.checkpoint_timer():
        save_checkpoint(engine, ema, state, directory)
        session.publish(directory, {"step": state.step, "samples_seen": state.samples_seen})


def _export_bundle(ema: ParameterEMA, dit_cfg: Any, cfg: ReelforgeConfig, out: Path, rank: int, tracker: Any) -> None:
    """Rank 0 writes the inference bundle from the gathered EMA weights (collective gather first)."""
    weights = ema.full_state_dict()
    if rank != 0:
        return
    from model.bundle import save_bundle

    bundle_dir = out / BUNDLE_DIR
    save_bundle(
        bundle_dir,
        weights,
        dit_cfg,
        autoencoder=cfg.model.autoencoder,
        text_encoder=cfg.model.text_encoder,
        fps=cfg.model.fps,
        num_frames=cfg.model.num_frames,
        width=cfg.model.width,
        height=cfg.model.height,
        extra={
            "config_hash": config_hash(cfg),
            "ema_decay": cfg.train.ema_decay,
            "generation": generation_defaults(cfg.train),
        },
    )
    tracker.log_artifacts(bundle_dir, "bundle")
    logger.info("inference bundle (EMA weights) in %s", bundle_dir)


def generation_defaults(train: Any) -> dict[str, float]:
    """Sampling defaults the bundle records for `reelforge generate` and serving."""
    # Sampling must integrate the same shifted schedule the model was trained on.
    defaults = {"shift": train.timestep_shift}
    if train.text_dropout == 0:
        # Never trained on the null text, so classifier-free guidance would extrapolate towards an
        # unconditional prediction the model does not have: sample with the caption alone.
        defaults["guidance"] = 1.0
    return defaults


@torch.no_grad()
def _log_eval_samples(
    ema: ParameterEMA,
    dit_cfg: Any,
    cfg: ReelforgeConfig,
    autoencoder: Any,
    text_encoder: Any,
    device: torch.device,
    rank: int,
    tracker: Any,
    step: int,
) -> None:
    """Rank 0 samples each of `train.eval_prompts` with the EMA weights at the reference bucket and
    logs the MP4s as samples/step-NNNNNN/<prompt slug>.mp4. The EMA gather is collective (ZeRO-3
    shards), so every rank calls this; only rank 0 samples."""
    weights = ema.full_state_dict()
    if rank == 0:
        _sample_eval_videos(weights, dit_cfg, cfg, autoencoder, text_encoder, device, tracker, step)
    if dist.is_initialized():
        # Other ranks wait here, inside the eval time, not in the next step's gradient all-reduce.
        dist.barrier()


def _sample_eval_videos(
    weights: dict[str, torch.Tensor],
    dit_cfg: Any,
    cfg: ReelforgeConfig,
    autoencoder: Any,
    text_encoder: Any,
    device: torch.device,
    tracker: Any,
    step: int,
) -> None:
    from model.dit import DiT
    from model.rectified_flow import sample
    from model.video_io import from_model, write_mp4

    # A plain fp32 DiT on the EMA weights: the training engine's weights (and its ZeRO state) stay untouched.
    with torch.device("meta"):
        dit = DiT(dit_cfg)
    dit.load_state_dict({name: w.to(device) for name, w in weights.items()}, assign=True)
    dit.eval()
    num_latent = autoencoder.latent_frames(cfg.model.num_frames)
    sf = autoencoder.spatial_factor
    latent_shape = (1, autoencoder.latent_channels, num_latent, cfg.model.height // sf, cfg.model.width // sf)
    # Fixed noise per prompt (seeded by its position), so samples at different steps are comparable.
    for i, prompt in enumerate(cfg.train.eval_prompts):
        generator = torch.Generator().manual_seed(cfg.train.seed + i)
        noise = torch.randn(latent_shape, generator=generator).to(device)  # (1, C, T, H, W)
        text, text_mask = text_encoder.encode([prompt])  # (1, L, Dt), (1, L)
        latents = sample(
            dit, noise, text.to(device), text_mask.to(device),
            steps=cfg.train.eval_sampling_steps, guidance=cfg.train.eval_guidance, shift=cfg.train.timestep_shift,
        )  # fmt: skip
        frames = from_model(autoencoder.decode(latents)[:, :, : cfg.model.num_frames])  # (T, H, W, 3) uint8
        tracker.log_sample_video(write_mp4(frames, cfg.model.fps), prompt, step)
    logger.info("step %d: logged %d eval samples", step, len(cfg.train.eval_prompts))


def _open_sample_log(path: Path) -> Any:
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


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- torchrun entry ---------------------------------------------------------------------------


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The arguments `reelforge train` and `torchrun -m training.loop` share."""
    add_config_args(parser)
    parser.add_argument("--data", required=True, help="ingest output folder (local path or pyarrow URI such as s3://...)")
    parser.add_argument("--out", help="output folder (default ./runs/<config name>)")
    parser.add_argument("--resume", metavar="CKPT", help="checkpoint folder to continue from (same MLflow run)")


def default_out(args: argparse.Namespace) -> Path:
    return Path(args.out or Path("runs") / (Path(args.config).stem if args.config else "default"))


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc_per_node N -m training.loop --config F --data SHARDS [--out DIR] [--resume CKPT]`."""
    parser = argparse.ArgumentParser(prog="python -m training.loop", description=__doc__.splitlines()[0])
    add_run_args(parser)
    args = parser.parse_args(argv)
    session = TorchrunSession()
    setup_logging(rank=session.rank)
    cfg = config_from_args(args)
    out = str(default_out(args))
    if args.resume is not None:
        from training.train import check_world_size

        try:
            check_world_size(cfg, read_trainer_state(args.resume))
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    run_training(WorkerArgs(config=cfg, data=args.data, out=out, resume_from=args.resume), session)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
