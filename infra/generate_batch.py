"""`reelforge generate --batch REQUESTS --out DIR --model PATH|models:/NAME@ALIAS`: a table of requests
(one row per video, the columns serving takes) → DIR/videos/<id>.mp4 and DIR/results.parquet.

    reelforge generate --batch requests.parquet --out batch/ --model runs/tiny/bundle
    reelforge generate --batch s3://bucket/requests.parquet --out s3://bucket/batch --model models:/reelforge-t2v@champion \\
        --concurrency 8

The job is `pipelines.generate_batch.run_batch_generation` (docs/batch-generation.md): one model per
Ray actor, a GPU each when the cluster has GPUs; a rerun resumes and does only what is not done.
`infra.generate.main` sends every command line holding `--batch` here.

Exit status: 0 when every row made a video; 1 when some rows failed (results.parquet says why) or the
job stopped (one line `reelforge generate: stopped: ...`; rerun to resume); 2 for bad input (no such
table, no `prompt` column, unknown columns, not a bundle), one line `reelforge generate: error: ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from infra.cluster import start_ray
from infra.logs import setup_logging
from model.errors import one_line
from pipelines.generate_batch import RESULTS, BatchGenerationConfig, BatchStopped, run_batch_generation

logger = logging.getLogger(__name__)

PROG = "reelforge generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} --batch",
        description="Generate one video per row of a request table (the columns serving takes) with a Ray Data job.",
    )
    parser.add_argument("--batch", required=True, metavar="REQUESTS", help="a .parquet or .jsonl table: a local path or a URI (s3://...)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder or URI: videos/<id>.mp4, results.parquet, _SUCCESS")
    parser.add_argument("--model", required=True, help="bundle folder, or a registry reference (models:/NAME@ALIAS, models:/NAME/VERSION)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU per actor when the Ray cluster has GPUs, else CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="DiT weights dtype (default: as saved)")
    parser.add_argument("--concurrency", type=int, metavar="N", help="actors, each holding one model (default: one per GPU, else one)")
    parser.add_argument("--rows-per-part", type=int, default=4, metavar="N", help="rows whose results are committed together (default 4)")
    parser.add_argument("--retry-failed", action="store_true", help="generate rows that failed in an earlier run again")
    return parser


def main(argv: list[str], resolve_model: Callable[[str], Path]) -> int:
    """`resolve_model` turns --model into a local bundle folder (infra.generate.resolve_model_path,
    passed in by infra.generate.main, which imports this module: no import cycle)."""
    setup_logging()
    args = build_parser().parse_args(argv)
    ray_before = _ray_connected()
    try:
        for flag, value in (("--concurrency", args.concurrency), ("--rows-per-part", args.rows_per_part)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        cfg = BatchGenerationConfig(
            requests=args.batch, bundle=str(resolve_model(args.model)), out=args.out, device=args.device, dtype=args.dtype,
            concurrency=args.concurrency, rows_per_part=args.rows_per_part, retry_failed=args.retry_failed,
        )  # fmt: skip
        summary = run_batch_generation(cfg, start_ray=start_ray)
    except (ValueError, BatchStopped) as exc:
        if _ray_connected() and not ray_before:
            sys.modules["ray"].shutdown()  # late worker log lines must not follow the one line that says why
        kind, status = ("error", 2) if isinstance(exc, ValueError) else ("stopped", 1)
        print(f"{PROG}: {kind}: {one_line(exc)}", file=sys.stderr)
        return status
    print(summary_line(summary, args.out))
    return 0 if summary["failed"] == 0 else 1


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def summary_line(summary: dict[str, Any], out: str) -> str:
    """The command's last line: counts over results.parquet, then what this run did."""
    run = summary["this_run"]
    done = "nothing new to generate" if summary.get("nothing_new") else f"this run generated {run['generated']} ({run['failed']} failed) in {run['wall_s']:.1f} s"
    return (
        f"{summary['rows']} requests: {summary['ok']} ok, {summary['failed']} failed ({summary['invalid']} invalid); "
        f"{done}; results in {out.rstrip('/')}/{RESULTS}"
    )
