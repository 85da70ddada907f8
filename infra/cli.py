"""The `reelforge` command line (also `python -m infra`).

Each subcommand is a module of infra/ that parses its arguments, validates, calls one entry
function of a package and reports what it returns: it exposes `main(argv) -> int`. This file only
dispatches, so adding a command is one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from infra import __version__

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("infra.ingest", "footage -> scene-split, filtered, captioned WebDataset shards"),
    "recaption": ("infra.recaption", "shards -> caption sets written by vision-language models"),
    "train": ("infra.train", "train a diffusion transformer on shards (Ray Train x DeepSpeed, or torchrun)"),
    "register": ("infra.register", "register a finished MLflow run's model"),
    "promote": ("infra.promote", "move a registry alias (e.g. candidate -> champion)"),
    "eval": ("infra.eval", "evaluate a registered model version offline (fidelity, flicker, flow, drift)"),
    "generate": ("infra.generate", "generate a video from a bundle or a registered model"),
    "serve": ("infra.serve", "serve a registered model over HTTP"),
    "submit": ("infra.submit", "submit ingest/recaption/train to a Ray cluster"),
    "config": ("infra.config_cmd", "show the resolved, validated config"),
    "demo-footage": ("infra.demo_footage", "write synthetic test footage with known cuts"),
    "demo": ("infra.demo", "run the whole chain on demo footage"),
}


def available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reelforge",
        description="Raw footage to a text-to-video diffusion model. `reelforge COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"reelforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in available_commands().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    commands = available_commands()
    if name not in commands:
        parser.error(f"unknown command {name!r}; choose from {', '.join(commands)}")
    module = importlib.import_module(commands[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
