"""The ``qscope-rl`` command line: one module per command group, each registering its own parsers.

A command module only parses arguments and calls the library; what several of them share (reading texts,
printing JSON, the model-and-SAE arguments) is in `common`.
"""

from __future__ import annotations

import argparse
import importlib

# Each module defines `register(subparsers)`; its parsers set `func(args) -> int | None`.
COMMAND_MODULES = ("qscope_rl.cli.sae", "qscope_rl.cli.world", "qscope_rl.cli.features", "qscope_rl.cli.utilities",
                   "qscope_rl.cli.demo", "qscope_rl.cli.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qscope-rl", description="Sparse-autoencoder features in TRL post-training."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)

