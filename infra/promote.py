"""`reelforge promote NAME (--version N | --from-alias candidate) --alias champion [--tolerance 0.1] [--force] [--no-eval]`

Moves a registry alias to a model version (training/registry.py `promote`): the release step.
Serving and `reelforge generate` resolve `models:/NAME@champion` at load time, so moving the alias
is the whole deployment (and moving it back is the rollback).

With `--from-alias`, the move is gated (training/evaluation.py `promote_with_gate`): the candidate
and the version the alias points to now are evaluated offline on the same held-out prompts, clips
and seeds (`--data`, `--prompts`, `--clips`, `--steps`, `--seed` as for `reelforge eval`), the
comparison table goes to stderr, and a candidate worse than the champion on any metric beyond
`--tolerance` (a fraction of the champion's value, 0.1 = 10%) is refused in one line, exit status 1,
the alias unchanged. `--force` promotes it anyway and records that on the version (tags
`reelforge.promoted_with_force`, `reelforge.promote_force_reason`); `--no-eval` skips the gate.
When the alias points nowhere yet, the candidate alone is evaluated (its metrics recorded) and
promoted. `--version N` is an operator's explicit choice (a rollback, say) and is not gated.

The store is named as for `reelforge register`; errors are one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from infra.eval import add_eval_args, metrics_table, notes, settings_from_args
from infra.logs import setup_logging
from infra.register import add_store_args, run_command, store_uri
from training.evaluation import promote_with_gate, regressions
from training.registry import promote

REFUSED = 1  # exit status of a refused promotion (2 is a usage or lookup error)


class Refused(Exception):
    """The gate refused the candidate; the message is the one line to print."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge promote", description="Move a registry alias to a model version.")
    parser.add_argument("name", help="registered model name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--version", type=int, help="model version to promote (not gated)")
    source.add_argument(
        "--from-alias", help="promote the version this alias points to (e.g. candidate), if it evaluates no worse"
    )
    parser.add_argument("--alias", required=True, help="alias to move (e.g. champion)")
    parser.add_argument(
        "--tolerance", type=float, default=0.1,
        help="how much worse than the champion a metric may be, as a fraction of its value (default 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="promote even if the candidate is worse (recorded on the version)"
    )
    parser.add_argument("--no-eval", action="store_true", help="move the alias without evaluating")
    add_eval_args(parser)
    add_store_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    uri = store_uri(args)
    settings = settings_from_args(args)
    if args.tolerance < 0:
        raise SystemExit(f"error: --tolerance {args.tolerance} must be >= 0 (a fraction: 0.1 = 10%)")

    def action() -> str:
        if args.version is not None or args.no_eval:
            target = promote(args.name, args.alias, tracking_uri=uri, version=args.version, from_alias=args.from_alias)
            return f"{args.name}@{args.alias} -> version {target.version}"
        outcome = promote_with_gate(
            args.name, args.alias, args.from_alias, tracking_uri=uri, settings=settings,
            data_dir=args.data, tolerance=args.tolerance, force=args.force,
        )  # fmt: skip
        if outcome.candidate is not None:
            champion, candidate = outcome.champion, outcome.candidate
            worse = regressions(candidate.metrics, champion.metrics, args.tolerance) if champion else []
            results, roles = ([champion, candidate], ["champion", "candidate"]) if champion else ([candidate], ["candidate"])
            table = metrics_table(results, {metric for metric, _, _ in worse}, roles)
            print(table, *notes(candidate), sep="\n", file=sys.stderr)
        if not outcome.promoted:
            raise Refused(outcome.line)
        return outcome.line

    try:
        return run_command(action)
    except Refused as refusal:
        print(refusal, file=sys.stderr)
        return REFUSED


if __name__ == "__main__":
    sys.exit(main())
