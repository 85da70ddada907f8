"""The Ray Train driver: check everything, then train on Ray Train x DeepSpeed.

    summary = train(cfg.training(), "shards/", Path("runs/tiny"))   # what `reelforge train` calls

Run the launch checks (each failure is one line naming the value: training/preflight.py, and
training/run_dir.py for the output folder), start or attach to Ray
(through the caller's `start_ray`), create or resume the MLflow run, build the `TorchTrainer`
around `training.loop.train_loop`, fit, register the bundle, and return the summary. Ray Train V2
is the default in Ray 2.60 (`RAY_TRAIN_V2_ENABLED` unset means on); this module and the loop use
the V2 API (`ray.train.report/get_checkpoint/get_context`, `RunConfig(failure_config=...,
checkpoint_config=...)`) and also run under V1. The launch rules are in training/preflight.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.storage import config_hash
from training.checkpoint import STATE_FILE
from training.config import TrainingConfig
from training.export import BUNDLE_DIR
from training.loop import WorkerArgs, check_held_out, train_loop
from training.preflight import check_memory, preflight
from training.run_dir import check_outputs_last, check_run_record, nothing_to_resume, run_identity, write_run_record

logger = logging.getLogger(__name__)


def train(
    config: TrainingConfig,
    data: str,
    out: Path,
    resume: str | None = None,
    *,
    resume_out: bool = False,
    register: bool = True,
    start_ray: Callable[[], None] | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Preflight, fit on Ray, register; returns the summary. Bad input raises `PreflightError` (a
    ValueError, one line) before Ray starts. `resume` is a checkpoint to continue from (--resume
    CKPT); `resume_out` continues the run already in `out` (--resume alone). Either lets the run in
    `out` go on with another config or dataset (training/run_dir.py). `start_ray` connects this
    process to Ray when it is not yet (default: plain `ray.init()`). `run_name` names the MLflow run
    (default: the folder name of `out`; the command passes the config's name)."""
    from training.tracking import TAG_OUT, Tracker, resolve_tracking_uri, run_params, run_tags

    started = time.time()
    tracking_uri = resolve_tracking_uri(config.mlflow, out)
    check_outputs_last(out, tracking_uri)  # first: nothing may be written where Ray deletes it
    out = out.resolve()
    facts, resume = launch_checks(config, data, out, resume, resume_out)
    _connect_ray(start_ray)
    check_memory(config, facts["params"])
    write_run_record(out, facts["identity"])
    # The driver opens the MLflow run so a crash before the first checkpoint still resumes into it.
    tracker = Tracker(config.mlflow, out, rank=0)
    resume_state = facts["resume_state"]
    run_name = run_name or out.name
    tags = run_tags(config_hash(config), data, config.data.held_out) | {TAG_OUT: str(out)}
    run_id = tracker.start_or_resume(resume_state.mlflow_run_id if resume_state else None, run_name=run_name, tags=tags)
    tracker.log_params(run_params(config, data))
    worker_args = WorkerArgs(
        config=config, data=data, out=str(out), mlflow_run_id=run_id, run_name=run_name,
        resume_from=str(Path(resume).resolve()) if resume else None,
    )  # fmt: skip
    trainer = build_trainer(config, worker_args, out, run_name=out.name)
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
        "tracking_uri": tracking_uri,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "bundle": str(bundle_dir),
        "params": facts["params"],
    }
    if register:
        from training.registry import log_and_register

        version = log_and_register(bundle_dir, run_id, config.registry, tracking_uri)
        summary["registered"] = f"models:/{config.registry.model_name}@{config.registry.alias} (version {getattr(version, 'version', version)})"
    return summary


def launch_checks(
    config: TrainingConfig, data: str, out: Path, resume: str | None, resume_out: bool
) -> tuple[dict[str, Any], str | None]:
    """What the driver checks before Ray, after the output folder's place: the checkpoint to resume,
    preflight, and the run `out` already holds. Returns (preflight facts plus the run's identity,
    the checkpoint the run continues from)."""
    # --resume in either form is the user's word that the run in `out` may go on changed.
    resume_requested = resume_out or resume is not None
    # Ray's restart checkpoint wins over --resume in the workers (training/loop.py), so it is also
    # the one whose world size, ZeRO stage and MLflow run the driver checks and continues.
    restart = ray_restart_checkpoint(out)
    if restart is not None:
        logger.info("%s holds a Ray run: continuing from its latest checkpoint %s", out, restart)
        if resume is not None and Path(resume).resolve() != restart.resolve():
            logger.warning("--resume %s is ignored: Ray resumes %s (use a new --out to start from --resume)", resume, restart)
        resume = str(restart)
    elif resume_out:
        raise nothing_to_resume(out)
    facts = preflight(config, data, resume)
    check_held_out(config, data)
    facts["identity"] = run_identity(config, data)
    check_run_record(out, facts["identity"], resume=resume_requested)
    return facts, resume


def build_trainer(cfg: TrainingConfig, worker_args: WorkerArgs, out: Path, run_name: str) -> Any:
    """The Ray `TorchTrainer` running `train_loop` on `scaling.num_workers` workers, checkpoints in
    `<out>/ray/<run_name>` (tests and benchmarks/train_step.py fit it directly)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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


def _connect_ray(start_ray: Callable[[], None] | None) -> None:
    """Ray is first needed here (the memory check asks it for the workers' RAM, then the fit)."""
    import ray

    if ray.is_initialized():
        return
    if start_ray is None:
        ray.init()
    else:
        start_ray()
