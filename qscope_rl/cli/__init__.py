"""The ``qscope-rl`` command line: one module per command group, each registering its own parsers.

A command module only parses arguments and calls the library; what several of them share (reading texts,
printing JSON, the model-and-SAE arguments) is in `common`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DEBUG_FLAG, run, split_debug

# Each module defines `register(subparsers)`; its parsers set `func(args) -> int | None`.
COMMAND_MODULES = ("qscope_rl.cli.sae", "qscope_rl.cli.world", "qscope_rl.cli.features", "qscope_rl.cli.utilities",
                   "qscope_rl.cli.demo", "qscope_rl.cli.train")

# Commands whose numbers must be the same on every machine (see `qscope_rl.world.kernels`).
PINNED_KERNEL_COMMANDS = ("world", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qscope-rl", description="Sparse-autoencoder features in TRL post-training.",
        epilog=f"{DEBUG_FLAG} (anywhere on the line, or QSCOPE_RL_DEBUG=1): show the traceback of an error.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a known error is one ``error: ...`` line on stderr and exit status 1 (see `errors`)."""
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    args.debug = debug
    if args.command in PINNED_KERNEL_COMMANDS:
        from qscope_rl.world.kernels import pin_kernels

        pin_kernels()  # before any kernel runs: worlds and demo runs then match across machines
    return run(args.func, args, debug)

