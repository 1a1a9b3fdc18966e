"""``qscope-rl train --config RECIPE.yaml [--<field> <value> ...] [--dry-run [--json]]``: train from a recipe.

The same main as ``python -m qscope_rl.trainers.launch``, run in this process (for several processes use
``accelerate launch ... -m qscope_rl.trainers.launch``, see recipes/README.md).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    # Everything after `train` goes to the launcher's own parser (TrlParser: any config field can be overridden).
    # With prefix_chars="+" this subparser reads "--learning_rate" as a plain argument instead of rejecting it.
    train = subparsers.add_parser("train", help="train from a recipe YAML, or check it with --dry-run",
                                  add_help=False, prefix_chars="+")
    train.add_argument("argv", nargs=argparse.REMAINDER, help="--config RECIPE.yaml and overrides (--help for all)")
    train.set_defaults(func=_train)


def _train(args) -> int:
    from qscope_rl.trainers.launch import main

    return main(args.argv + (["--debug"] if getattr(args, "debug", False) else []))
