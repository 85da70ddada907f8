"""`reelforge ingest SRC... --out DIR`: raw footage → scene-split, filtered, captioned WebDataset shards.

    reelforge ingest footage/ --out shards/ --config ingest/demo
    reelforge ingest s3://bucket/raw --out s3://bucket/shards --set clips.fps=12 --workers 32

The job is `pipelines.ingest.run_ingest`; this module parses, validates, reports. Bad arguments
and a job that cannot finish print one line `ingest: ...` and exit 1; an output where no source
was processed successfully prints the summary and exits 1; otherwise 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from infra.cluster import start_ray
from infra.config import add_config_args, config_from_args
from infra.logs import setup_logging
from pipelines.ingest import DEFAULT_MAX_ATTEMPTS, IngestStopped, run_ingest
from pipelines.output import REJECTS, OutputDir

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reelforge ingest",
        description="Scene-split, filter, caption and shard raw footage into WebDataset tars.",
    )
    parser.add_argument("src", nargs="+", metavar="SRC", help="files, folders, globs or file:// s3:// gs:// URIs")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder or URI (shards, manifest, report)")
    parser.add_argument(
        "--new-output",
        action="store_true",
        help="delete this command's files in --out first (shards, tables, report, _work/); other files stay",
    )
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="max processing actors (default: cluster CPUs)")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help=f"workers a source may kill (crash, OOM) before it is rejected as 'crash' (default {DEFAULT_MAX_ATTEMPTS})",
    )
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"ingest: --workers must be >= 1, got {args.workers}")
    if args.max_attempts < 1:
        raise SystemExit(f"ingest: --max-attempts must be >= 1, got {args.max_attempts}")
    ray_before = _ray_connected()
    try:
        stats = run_ingest(
            cfg.ingest(),
            args.src,
            args.out,
            new_output=args.new_output,
            num_workers=args.workers,
            max_attempts=args.max_attempts,
            # No num_cpus: a local instance gets every CPU; RAY_ADDRESS (ray job submit) joins a cluster.
            start_ray=start_ray,
        )
    except (ValueError, IngestStopped) as exc:
        if _ray_connected() and not ray_before:
            # Disconnect from the Ray this command started or joined: log lines its workers still
            # send (other sources' retries) would otherwise arrive after the one line that says why.
            sys.modules["ray"].shutdown()
        raise SystemExit(f"ingest: {exc}") from None
    print(summary_table(stats))
    if stats["sources"]["ok"] == 0:
        logger.error("no source was processed successfully; see %s", OutputDir(args.out).path(REJECTS))
        return 1
    return 0


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a bad argument must not pay for Ray
    return ray is not None and ray.is_initialized()


def summary_table(stats: dict[str, Any]) -> str:
    """The end-of-run markdown table: this run and the whole output folder. A rerun that found
    nothing new (`run_ingest` returns the stored stats.json with `nothing_new`) says so in the
    "this run" column instead of repeating the figures of the run that wrote them."""
    run, sources = stats["last_run"], stats["sources"]
    nothing_new = bool(stats.get("nothing_new"))

    def this(value: str) -> str:
        return "" if nothing_new else value

    rows = [
        ("sources ok / rejected", "nothing new" if nothing_new else f"{run['sources'] - run['sources_rejected']} / {run['sources_rejected']}",
         f"{sources['ok']} / {sources['rejected']}"),
        # Processed, yet no clip kept: counted apart from whole-source rejects, and named below.
        ("sources without a kept clip", this(str(run.get("sources_without_clips", 0))), str(stats.get("sources_without_clips", "?"))),
        ("clips kept", this(str(run["clips_kept"])), str(stats["clips"]["kept"])),
    ]  # fmt: skip
    clip_stages, source_stages = stats["clips"]["rejected_by_stage"], stats["sources_rejected_by_stage"]
    stages = sorted(set(run["rejected_by_stage"]) | set(clip_stages) | set(source_stages))
    total_by_stage = {s: clip_stages.get(s, 0) + source_stages.get(s, 0) for s in stages}
    for stage in stages:
        rows.append((f"rejected: {stage}", this(str(run["rejected_by_stage"].get(stage, 0))), str(total_by_stage[stage])))
    rows += [
        ("hours in (source)", this(f"{run['source_seconds'] / 3600:.3f}"), f"{stats['source_seconds'] / 3600:.3f}"),
        ("hours out (clips)", this(f"{run['clip_seconds'] / 3600:.3f}"), f"{stats['clip_seconds'] / 3600:.3f}"),
        ("wall time (s)", this(f"{run['wall_s']:.1f}"), ""),
        ("source s per wall s", this(str(run["source_seconds_per_wall_s"])), ""),
        ("shards", this(str(len(run["new_shards"]))), str(len(stats["shards"]))),
    ]
    lines = ["| | this run | output total |", "|---|---:|---:|"]
    lines += [f"| {name} | {value} | {total} |" for name, value, total in rows]
    if not nothing_new:
        lines += _named_sources(run)
    return "\n".join(lines)


def _named_sources(run: dict[str, Any]) -> list[str]:
    """Tables naming this run's sources rejected whole (with the reason) and those that yield no kept
    clip (with their clip rejects by stage): lost sources deserve a name on screen, not only a count."""
    lines: list[str] = []
    rejected = run.get("rejected_sources") or []
    if rejected:
        lines += ["", "| source rejected in this run | stage | reason |", "|---|---|---|"]
        lines += [f"| {r['uri']} | {r['stage']} | {_cell(r['reason'])} |" for r in rejected]
        if run["sources_rejected"] > len(rejected):
            lines.append(f"| ... and {run['sources_rejected'] - len(rejected)} more (rejects.parquet) | | |")
    empty = run.get("no_clip_sources") or []
    if empty:
        lines += ["", "| source without a kept clip in this run | clips rejected, by stage |", "|---|---|"]
        for source in empty:
            by_stage = ", ".join(f"{stage} {count}" for stage, count in source["rejected_by_stage"].items())
            lines.append(f"| {source['uri']} | {_cell(by_stage) or 'no clip at all'} |")
        if run["sources_without_clips"] > len(empty):
            lines.append(f"| ... and {run['sources_without_clips'] - len(empty)} more (sources.parquet, clips_kept 0) | |")
    return lines


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
