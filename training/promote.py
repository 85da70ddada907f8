"""`reelforge promote NAME (--version N | --from-alias candidate) --alias champion`.

Moves a registry alias to a model version: the release step after a candidate has been
checked. Serving and `reelforge generate` resolve `models:/NAME@champion` at load time, so
moving the alias is the whole deployment (and moving it back is the rollback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from infra.logs import setup_logging
from training.registry import add_store_args, check_names, run_command, store_uri

logger = logging.getLogger(__name__)


def promote(
    name: str, alias: str, *, tracking_uri: str, version: int | None = None, from_alias: str | None = None
) -> Any:
    """Point `alias` of model `name` at `version`, or at the version `from_alias` points to now.
    Returns that ModelVersion; the version the alias left is logged."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if (version is None) == (from_alias is None):
        raise ValueError("give exactly one of version or from_alias")
    check_names(name, alias)
    client = MlflowClient(tracking_uri)
    if from_alias is not None:
        try:
            target = client.get_model_version_by_alias(name, from_alias)
        except MlflowException:
            raise ValueError(f"model {name!r} has no alias {from_alias!r}") from None
    else:
        try:
            target = client.get_model_version(name, str(version))
        except MlflowException:
            raise ValueError(f"model {name!r} has no version {version}") from None
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None  # first time this alias is set
    client.set_registered_model_alias(name, alias, target.version)
    logger.info("%s@%s: version %s -> %s", name, alias, previous or "(unset)", target.version)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge promote", description="Move a registry alias to a model version.")
    parser.add_argument("name", help="registered model name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--version", type=int, help="model version to promote")
    source.add_argument("--from-alias", help="promote the version this alias points to (e.g. candidate)")
    parser.add_argument("--alias", required=True, help="alias to move (e.g. champion)")
    add_store_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    uri = store_uri(args)

    def action() -> str:
        target = promote(args.name, args.alias, tracking_uri=uri, version=args.version, from_alias=args.from_alias)
        return f"{args.name}@{args.alias} -> version {target.version}"

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
