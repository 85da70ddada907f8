"""`reelforge config show [--config F] [--set k=v ...]`: print the resolved, validated config."""

from __future__ import annotations

import argparse
import sys

from infra.config import add_config_args, config_from_args, to_yaml
from model.storage import config_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge config", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config as YAML, with its hash")
    add_config_args(show)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    sys.stdout.write(f"# config hash: {config_hash(cfg)}\n{to_yaml(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
