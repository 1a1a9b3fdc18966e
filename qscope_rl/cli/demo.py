"""`qscope-rl demo`: the end-to-end run on the demo world (see `qscope_rl.demo`)."""

from __future__ import annotations

import argparse
import json
import sys

from qscope_rl.world import SIZES

from .errors import check_writable, non_negative_int, positive_int

DEFAULT_OUT = "qscope-rl-demo"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train GRPO under six arms on the demo world and report code-switch and loop rates",
        description="Build or load the demo world, measure the untrained policy, train GRPO under arms a-f "
        "(same seeds, same budget), measure every arm on held-out prompts, and write demo.json, demo.md and "
        "PNG plots. The default budget fits in about 15 minutes on 2 CPU cores; --quick is a smoke run.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: test-size world, one seed, 3 steps")
    parser.add_argument("--world", default=None, help=f"world size {list(SIZES)} or a built world's folder "
                        "(default: default; test with --quick)")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=None,
                        help="seeds (default: 0 1 2; 0 with --quick)")
    parser.add_argument("--arms", default=None, help="which arms, e.g. 'ad' (default: abcdef)")
    parser.add_argument("--steps", type=positive_int, default=None, help="GRPO steps per run")
    parser.add_argument("--out", default=DEFAULT_OUT, help="report folder (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="world cache root (default: $QSCOPE_RL_CACHE, else "
                        "~/.cache/qscope-rl)")
    parser.add_argument("--json", action="store_true", help="print the report's JSON to stdout")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from qscope_rl.demo.main_job import DemoSettings, run_demo
    from qscope_rl.demo.report import markdown, write_report

    overrides = {k: v for k, v in {
        "size": args.world, "seeds": tuple(args.seeds) if args.seeds else None,
        "arms": tuple(args.arms) if args.arms else None, "max_steps": args.steps, "cache_dir": args.cache_dir,
    }.items() if v is not None}  # fmt: skip
    check_writable(args.out, "--out", folder=True)
    try:
        settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    result = run_demo(settings)
    paths = write_report(result, args.out)
    if args.json:
        print(paths["json"].read_text())
    else:
        print(markdown(json.loads(paths["json"].read_text())))
    print("report: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
