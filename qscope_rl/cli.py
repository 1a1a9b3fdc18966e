"""The ``qscope-rl`` command line: one subcommand per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Each module defines `register(subparsers)`; its parsers set `func(args) -> int | None`.
COMMAND_MODULES = ("qscope_rl.cli_sae", "qscope_rl.world.cli", "qscope_rl.cli_features", "qscope_rl.cli_utilities",
                   "qscope_rl.cli_demo", "qscope_rl.cli_train")


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


def read_records(path: str, field: str = "text") -> list[dict]:
    """Records from JSONL (objects with ``field``) or plain text (one ``{field: line}`` per line)."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: file {path} does not exist")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({err})") from err
            if field not in record:
                raise SystemExit(f"error: {path}:{n} has no {field!r} field")
            rows.append(record)
        else:
            rows.append({field: line})
    if not rows:
        raise SystemExit(f"error: {path} holds no texts")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
