"""`reelforge train`: check everything, then train a diffusion transformer on shards.

    reelforge train --config configs/train/tiny.yaml --data SHARDS [--set k=v ...] [--resume [CKPT]] [--out DIR] [--no-register]
    torchrun --nproc_per_node 2 -m infra train --launcher torchrun --config configs/train/tiny.yaml --data SHARDS [--resume [CKPT]]

`--launcher ray` (the default) calls `training.train.train`: preflight checks, Ray (infra/cluster.py:
the cluster RAY_ADDRESS names, else a local instance sized for the workers), Ray Train x DeepSpeed,
registration of the bundle; the summary it returns is printed as a table. `--launcher torchrun`
runs the worker loop in this process (`training.loop.run_torchrun`), one rank of the group torchrun
started; torchrun runs never register. A launch problem exits with one line `reelforge train: ...`.

`--out` (default `runs/<config name>`) holds one run: rerunning the same command continues it, and
another config or dataset there is refused unless `--resume` is given (alone: continue the run in
`--out` with the new settings; with CKPT: continue from that checkpoint). Inside a Ray job, an
`--out` or MLflow store in the job's working-dir copy is refused (training/run_dir.py). The MLflow
run is named after the config (`tiny` for `--config train/tiny`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

from infra.cluster import start_ray
from infra.config import add_config_args, config_from_args
from infra.logs import setup_logging
from training.preflight import PreflightError

PROG = "reelforge train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--data", required=True, help="ingest output folder (local path or pyarrow URI such as s3://...)")
    parser.add_argument("--out", help="output folder (default ./runs/<config name>)")
    parser.add_argument(
        "--resume", nargs="?", const="", metavar="CKPT",
        help="continue from checkpoint folder CKPT (same MLflow run); alone: continue the run in --out even "
        "with another config or dataset",
    )  # fmt: skip
    parser.add_argument(
        "--launcher", choices=("ray", "torchrun"), default="ray",
        help="ray: start Ray Train workers (default); torchrun: be one rank of `torchrun ... -m infra train`",
    )  # fmt: skip
    parser.add_argument(
        "--no-register", dest="register", action="store_false",
        help="skip MLflow model registration (--launcher ray only: torchrun runs never register)",
    )  # fmt: skip
    return parser


def config_name(args: argparse.Namespace) -> str:
    """`tiny` for `--config train/tiny` or `configs/train/tiny.yaml`; `default` without --config."""
    return Path(args.config).stem if args.config else "default"


def default_out(args: argparse.Namespace) -> Path:
    return Path(args.out or Path("runs") / config_name(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.launcher == "torchrun" and not args.register:
        parser.error("--no-register applies to --launcher ray only: torchrun runs never register")
    # torchrun ranks other than 0 log warnings only (infra/logs.py)
    setup_logging(rank=int(os.environ.get("RANK", 0)) if args.launcher == "torchrun" else 0)
    cfg = config_from_args(args).training()
    out = default_out(args)
    # --resume alone (const "") continues the run in --out; --resume CKPT continues from CKPT
    resume, resume_out = args.resume or None, args.resume == ""
    try:
        if args.launcher == "torchrun":
            from training.loop import run_torchrun

            run_torchrun(cfg, args.data, out, resume, resume_out=resume_out, run_name=config_name(args))
            return 0
        from training.train import train

        # a local Ray instance gets a CPU for every worker's reservation, at least this machine's
        cpus = max(os.cpu_count() or 1, math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
        summary = train(
            cfg, args.data, out, resume, resume_out=resume_out, register=args.register,
            start_ray=functools.partial(start_ray, num_cpus=cpus), run_name=config_name(args),
        )  # fmt: skip
    except PreflightError as exc:
        raise SystemExit(f"{PROG}: {exc}") from None
    print("| | |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
