"""`reelforge recaption SHARDS --caption-set NAME`: a vision-language model describes every clip.

    reelforge recaption shards/ --caption-set qwen7b --set caption.backend=openai \\
        --set caption.endpoint=http://gpu-node:8000/v1 --set caption.model=Qwen/Qwen2.5-VL-7B-Instruct
    reelforge recaption s3://bucket/shards --caption-set local --set caption.backend=hf \\
        --set caption.model=/models/Qwen2.5-VL-3B-Instruct
    reelforge recaption shards/ --caption-set qwen7b --materialize shards-qwen7b/

The job is `pipelines.recaption.run_recaption`; the caption set lands in SHARDS/captions/NAME
(docs/captions.md), the shards are never rewritten. `--materialize OUT` then writes new shards
whose captions are the set's, for tools that read plain WebDataset. Bad arguments and a job that
cannot finish print one line `recaption: ...` and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from infra.cluster import start_ray
from infra.config import add_config_args, config_from_args
from infra.logs import setup_logging
from pipelines.recaption import RecaptionStopped, run_recaption

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reelforge recaption",
        description="Caption every clip of an ingest output with a vision-language model, into a caption set beside the shards.",
    )
    parser.add_argument("shards", metavar="SHARDS", help="an ingest output folder or URI (holds _SUCCESS and manifest.parquet)")
    parser.add_argument("--caption-set", required=True, metavar="NAME", help="the set's name: SHARDS/captions/NAME")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="captioning actors (default: caption.workers, else one per GPU / one)")
    parser.add_argument(
        "--materialize",
        metavar="OUT",
        default=None,
        help="after captioning, write new shards to OUT whose captions are the set's (clips without a usable caption are left out)",
    )
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"recaption: --workers must be >= 1, got {args.workers}")
    ray_before = _ray_connected()
    try:
        summary = run_recaption(
            cfg.caption,
            args.shards,
            args.caption_set,
            text_encoder=cfg.model.text_encoder,
            num_workers=args.workers,
            start_ray=start_ray,
        )
        materialized = None
        if args.materialize:
            from pipelines.materialize import materialize

            materialized = materialize(args.shards, args.caption_set, args.materialize)
    except (ValueError, RecaptionStopped) as exc:
        if _ray_connected() and not ray_before:
            sys.modules["ray"].shutdown()  # late worker log lines must not follow the one line that says why
        raise SystemExit(f"recaption: {exc}") from None
    print(summary_table(summary))
    if materialized:
        print(f"\nmaterialized {materialized['clips']} clips into {materialized['shards']} shards in {args.materialize} "
              f"({materialized['skipped']} clips without a usable caption left out)")  # fmt: skip
    if summary["ok"] == 0:
        logger.error("no clip got a usable caption; see the failures in %s/captions/%s/report.html", args.shards.rstrip("/"), args.caption_set)
        return 1
    return 0


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: this run and the whole set."""
    run = summary.get("last_run") or {}
    nothing_new = bool(summary.get("nothing_new"))

    def this(key: str) -> str:
        return "nothing new" if nothing_new and key == "captioned" else ("" if nothing_new else str(run.get(key, 0)))

    rows = [
        ("clips captioned", this("captioned"), f"{summary['captioned']} of {summary['clips']}"),
        ("ok", this("ok"), str(summary["ok"])),
        ("failed", this("failed"), str(summary["failed"])),
    ]
    rows += [(f"failed: {kind}", "", str(count)) for kind, count in summary["failure_reasons"].items()]
    rows += [
        ("boilerplate opening stripped", "", str(summary["stripped"])),
        ("cut at the token cap", "", str(summary["truncated"])),
        ("mean tokens per caption", "", str(summary["tokens_mean"])),
        ("wall time (s)", "" if nothing_new else f"{run.get('wall_s', 0):.1f}", ""),
    ]
    lines = [f"caption set {summary['set_id']}", "", "| | this run | set total |", "|---|---:|---:|"]
    lines += [f"| {name} | {value} | {total} |" for name, value, total in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
