"""`reelforge promote NAME (--version N | --from-alias candidate) --alias champion`.

Moves a registry alias to a model version (training/registry.py `promote`): the release step
after a candidate has been checked. Serving and `reelforge generate` resolve
`models:/NAME@champion` at load time, so moving the alias is the whole deployment (and moving it
back is the rollback). The store is named as for `reelforge register`; errors are one line
`error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from infra.logs import setup_logging
from infra.register import add_store_args, run_command, store_uri
from training.registry import promote


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
