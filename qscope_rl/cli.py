"""The ``qscope-rl`` command line: one subcommand per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Each module defines `register(subparsers)`; its parsers set `func(args) -> int | None`.
COMMAND_MODULES = ("qscope_rl.cli_sae", "qscope_rl.world.cli", "qscope_rl.cli_features", "qscope_rl.cli_utilities")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qscope-rl", description="Sparse-autoencoder features in TRL post-training."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
