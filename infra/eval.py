"""`reelforge eval models:/NAME@ALIAS|models:/NAME/N [--data SHARDS] [--prompts N] [--clips N] [--steps S] [--seed N]`

Offline evaluation of one registered version (training/evaluation.py), the same one `reelforge
promote --from-alias` runs on both versions before it moves an alias: conditioning fidelity
(PSNR/SSIM of the frames the model was given), flicker, optical-flow smoothness and drift across the
windows of a long video, on held-out clips of `--data` (default: the shards the version trained on,
when the training output folder is still readable here) and text prompts. Prints a table; records
the metrics in MLflow as a run linked to the version's logged model, and as version tags
`reelforge.eval.<metric>` (docs/evaluation.md). The store is named as for `reelforge register`;
errors are one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence

from infra.logs import setup_logging
from infra.register import add_store_args, run_command, store_uri
from training.evaluation import HIGHER_IS_BETTER, EvalResult, EvalSettings, evaluate_version


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """What to evaluate on: shared by `reelforge eval` and `reelforge promote`."""
    defaults = EvalSettings()
    parser.add_argument(
        "--data", metavar="SHARDS", help="shards to take held-out clips from (default: the version's training shards)"
    )
    parser.add_argument(
        "--prompts", type=int, default=defaults.prompts, help=f"text prompts, one long video each (default {defaults.prompts})"
    )
    parser.add_argument(
        "--clips", type=int, default=defaults.clips, help=f"held-out clips, each in every trained mode (default {defaults.clips})"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"sampling steps per window (default {defaults.steps})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="first seed; item i of the evaluation uses seed + i")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    try:
        return EvalSettings(prompts=args.prompts, clips=args.clips, steps=args.steps, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def metrics_table(results: list[EvalResult], worse: Collection[str] = (), roles: Sequence[str] = ()) -> str:
    """A markdown table, one column per evaluated version (headed by its role, if given, e.g.
    champion); rows in `worse` are marked."""
    labels = [f"{role} {r.name} v{r.version}".strip() for role, r in zip([*roles, *[""] * len(results)], results)]
    header = "| metric | better | " + " | ".join(labels) + " |"
    lines = [header, "|---|---|" + "---:|" * len(results)]
    for metric, higher in HIGHER_IS_BETTER.items():
        if not any(metric in r.metrics for r in results):
            continue
        cells = " | ".join(f"{r.metrics[metric]:.4g}" if metric in r.metrics else "-" for r in results)
        mark = " **worse**" if metric in worse else ""
        lines.append(f"| {metric}{mark} | {'higher' if higher else 'lower'} | {cells} |")
    return "\n".join(lines)


def notes(result: EvalResult) -> list[str]:
    """Where the clips came from, and whether the version has seen them."""
    lines = [f"evaluated on: {len(result.plan.prompts)} prompt(s); {result.plan.note}"]
    if result.seen_in_training:
        lines.append(
            f"note: version {result.version} trained on these shards without holding these clips out (data.held_out), so it saw them"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge eval", description="Evaluate a registered model version offline.")
    parser.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    add_eval_args(parser)
    add_store_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    uri = store_uri(args)
    settings = settings_from_args(args)

    def action() -> str:
        result = evaluate_version(args.model, tracking_uri=uri, settings=settings, data_dir=args.data)
        logged = f"logged to MLflow run {result.run_id} and tags reelforge.eval.* of {result.name} version {result.version}"
        return "\n".join([metrics_table([result]), *notes(result), logged])

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
