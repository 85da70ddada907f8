"""`reelforge register --run-id ID [--name NAME] [--alias A] [--bundle DIR]`: register a training
run's model (training/registry.py `register`) and point an alias at the version.

A run that has no logged model yet is logged first, from `--bundle DIR` or else from the run's
`bundle/` artifact; with neither it stops with a one-line error.

The tracking store is `--tracking-uri`, else `mlflow.tracking_uri` (`--set`), else
`$MLFLOW_TRACKING_URI`, else the SQLite store of the training output folder `--out DIR`.
The model registry lives in the same store. `reelforge promote` names its store the same way.
Bad values, unknown runs, versions or aliases print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from infra.config import add_config_args, config_from_args
from infra.logs import setup_logging
from model.errors import one_line
from training.registry import register
from training.tracking import resolve_tracking_uri


def add_store_args(parser: argparse.ArgumentParser) -> None:
    """--tracking-uri / --out plus --config/--set: the ways to name the MLflow store."""
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking/registry URI (default: mlflow.tracking_uri, $MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--out", metavar="DIR", help="training output folder whose embedded store (mlflow.db) to use")
    add_config_args(parser)


def store_uri(args: argparse.Namespace) -> str:
    """The store named on the command line; exits with one line when there is none."""
    if args.tracking_uri:
        return args.tracking_uri
    cfg = config_from_args(args)
    if args.out is not None and not (Path(args.out) / "mlflow.db").is_file() and not cfg.mlflow.tracking_uri:
        raise SystemExit(f"error: --out {args.out}: no mlflow.db there (not a training output folder?)")
    try:
        return resolve_tracking_uri(cfg.mlflow, args.out)
    except ValueError as exc:
        raise SystemExit(f"error: {exc} (--tracking-uri or --out DIR)") from None


def run_command(action: Callable[[], str]) -> int:
    """Run a command's action: print its one-line result and return 0, or print a one-line error
    (bad value, unknown run / version / alias) and return 2."""
    from mlflow.exceptions import MlflowException

    try:
        print(action())
    except (ValueError, MlflowException) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge register", description="Register a training run's model.")
    parser.add_argument("--run-id", required=True, help="MLflow run id of the training run")
    parser.add_argument("--name", help="registered model name (default: registry.model_name)")
    parser.add_argument("--alias", help="alias for the new version (default: registry.alias, 'candidate')")
    parser.add_argument("--bundle", metavar="DIR", help="bundle folder to log if the run has no logged model")
    add_store_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    uri = store_uri(args)
    name = args.name or cfg.registry.model_name
    alias = args.alias or cfg.registry.alias

    def action() -> str:
        model_version = register(args.run_id, name, alias, tracking_uri=uri, bundle_dir=args.bundle)
        return f"registered {name} version {model_version.version} as @{alias} (models:/{name}@{alias})"

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
