"""Training step time per ZeRO stage on Ray Train workers, measured by the real loop.

    python benchmarks/train_step.py [--preset tiny] [--workers 2] [--steps 30] [--warmup 10]
                                    [--size 32x32] [--frames 8] [--batch 4] [--out benchmarks/results/train_step.json]

For each ZeRO stage (0, 1, 2, 3) it runs `training.loop.train_loop` under a Ray `TorchTrainer`
(`--workers` x 1 CPU, gloo, fp32) on synthetic shards (PyAV-encoded H.264 in WebDataset tars,
written like `reelforge ingest` does), and reads back what the loop itself logs to MLflow every
`--warmup` steps: seconds per optimizer step, the share of it spent waiting for data, and clips/s
over all workers. The first window (start-up, first DataLoader fill) is dropped. Ratios are to
ZeRO-0; targets: ZeRO-2 <= 1.10x, data wait < 5%.

For ZeRO 1-3 it then times the one-off cost of a resume at another world size: converting the
run's final checkpoint to DeepSpeed's universal checkpoint (`training.checkpoint.convert_to_universal`,
on this process's CPU), with the sizes of the ZeRO shards read and the universal files written.

Prints a markdown table (with hardware, versions and commit) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.cluster import start_ray  # noqa: E402
from infra.config import load_config  # noqa: E402
from infra.logs import setup_logging  # noqa: E402

logger = logging.getLogger("benchmarks.train_step")


def make_shards(folder: Path, clips: int, frames: int, width: int, height: int) -> Path:
    # The shard writer the training tests use: the ingest contract, written directly.
    from tests.training.conftest import uniform_clips, write_shards

    if (folder / "_SUCCESS").is_file():
        return folder
    return write_shards(folder, uniform_clips(clips, num_frames=frames, width=width, height=height), clips_per_shard=8)


def run_stage(stage: int, args: argparse.Namespace, shards: Path, work: Path) -> dict:
    from mlflow import MlflowClient

    from training.loop import WorkerArgs
    from training.train import build_trainer

    out = work / f"zero{stage}"
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(
        "train/tiny",
        [
            f"model.preset={args.preset}",
            f"model.size={args.size}",
            f"model.num_frames={args.frames}",
            f"train.batch_size={args.batch}",
            f"train.max_steps={args.warmup + args.steps}",
            f"train.log_every_steps={args.warmup}",
            f"train.data_workers={args.data_workers}",
            f"scaling.num_workers={args.workers}",
            f"deepspeed.zero_stage={stage}",
            "checkpoint.every_steps=1000000",  # only the final checkpoint, outside the timed windows
            f"mlflow.tracking_uri={tracking_uri}",
            "mlflow.experiment=bench-train-step",
        ],
    ).training()
    result = build_trainer(cfg, WorkerArgs(config=cfg, data=str(shards), out=str(out)), out, run_name=out.name).fit()
    if result.error is not None:
        raise RuntimeError(f"ZeRO-{stage} run failed: {result.error}")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("bench-train-step").experiment_id
    run = client.search_runs([experiment], filter_string=f"attributes.run_name = '{out.name}'")[0]

    def timed(key: str) -> list[float]:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        return [m.value for m in history if m.step > args.warmup]  # drop the start-up window

    step_s = timed("step_s")
    wait = timed("data_wait_fraction")
    clips = timed("clips_per_s")
    row = {
        "zero_stage": stage,
        "step_s": sum(step_s) / len(step_s),
        "data_wait_fraction": sum(wait) / len(wait),
        "clips_per_s": sum(clips) / len(clips),
    }
    if stage > 0:
        row.update(time_universal_conversion(Path(result.checkpoint.path)))
    return row


def time_universal_conversion(checkpoint: Path) -> dict:
    """Seconds to convert `checkpoint` (its ZeRO shards) to a universal checkpoint, and the sizes."""
    import time

    from training.checkpoint import DEEPSPEED_DIR, UNIVERSAL_DIR, convert_to_universal

    def mib(folder: Path) -> float:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20

    started = time.perf_counter()
    convert_to_universal(checkpoint)
    return {
        "universal_s": time.perf_counter() - started,
        "zero_checkpoint_mib": mib(checkpoint / DEEPSPEED_DIR),
        "universal_mib": mib(checkpoint / UNIVERSAL_DIR),
    }


def hardware() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (also the logging window)")
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data-workers", type=int, default=1)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    if args.steps % args.warmup:
        parser.error(f"--steps {args.steps} must be a multiple of --warmup {args.warmup} (whole logging windows)")
    setup_logging()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # this process's own Ray (never a cluster another process started), with the job's worker logging
    start_ray(num_cpus=max(args.workers, os.cpu_count() or 1))
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="reelforge-bench-train-") as tmp:
        work = Path(tmp)
        shards = make_shards(work / "shards", clips=64, frames=max(12, args.frames + 4), width=width, height=height)
        for stage in args.stages:
            logger.info("ZeRO-%d: %d workers, %s, %d timed steps", stage, args.workers, args.preset, args.steps)
            rows.append(run_stage(stage, args, shards, work))
    ray.shutdown()
    base = next((r["step_s"] for r in rows if r["zero_stage"] == 0), rows[0]["step_s"])
    for row in rows:
        row["ratio_to_zero0"] = row["step_s"] / base

    setup = f"preset {args.preset}, {args.workers} Ray workers x 1 CPU (gloo, fp32), batch {args.batch}/worker of {args.frames}x{args.size}, pixel AE"
    print(f"## Training step\n\n{setup}; {hardware()}; commit {commit()}\n")
    print(
        "| ZeRO stage | step (s) | ratio to ZeRO-0 | data wait | clips/s (all workers) "
        "| universal conversion (s) | ZeRO / universal files (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        universal = (
            f"{row['universal_s']:.1f} | {row['zero_checkpoint_mib']:.0f} / {row['universal_mib']:.0f}"
            if "universal_s" in row
            else "- | -"
        )
        print(
            f"| {row['zero_stage']} | {row['step_s']:.3f} | {row['ratio_to_zero0']:.2f}x | "
            f"{100 * row['data_wait_fraction']:.1f}% | {row['clips_per_s']:.1f} | {universal} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "hardware": hardware(), "commit": commit(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
