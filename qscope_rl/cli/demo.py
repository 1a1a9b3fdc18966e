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
        "demo", help="train GRPO under eight arms and SFT vs SASFT on the demo world; report failure rates",
        description="Build or load the demo world, measure the untrained policy, train GRPO under arms a-h "
        "(same seeds, same budget) and plain SFT vs SASFT, measure every policy on held-out prompts with 95% "
        "bootstrap intervals, check the targets, and write demo.json, demo.md and PNG plots. --quick is a "
        "smoke run on the test world.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: test-size world, one seed, 3 steps")
    parser.add_argument("--world", default=None, help=f"world size {list(SIZES)} or a built world's folder "
                        "(default: default; test with --quick)")
    parser.add_argument("--world-seed", type=non_negative_int, default=None,
                        help="world seed of the world size (default: 0), as `qscope-rl world build --seed N`")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=None,
                        help="seeds (default: 0 1 2; 0 with --quick)")
    parser.add_argument("--arms", default=None, help="which arms, e.g. 'ad' (default: abcdefgh; arm i runs on request)")
    parser.add_argument("--no-sft", action="store_true", help="skip the SFT table (plain SFT vs SASFT)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="runs side by side, one thread each (default: 2); changes no number, only the time")
    parser.add_argument("--from-log", default=None, metavar="RUNS_JSONL",
                        help="write the report from a runs.jsonl of an earlier (possibly interrupted) run instead of "
                        "running: only the seeds that finished every arm are used")
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
        "size": args.world, "seeds": tuple(args.seeds) if args.seeds else None, "world_seed": args.world_seed,
        "arms": tuple(args.arms) if args.arms else None, "max_steps": args.steps, "cache_dir": args.cache_dir,
        "sft": False if args.no_sft else None, "workers": args.workers,
    }.items() if v is not None}  # fmt: skip
    check_writable(args.out, "--out", folder=True)
    try:
        settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    from pathlib import Path

    from qscope_rl.demo.main_job import raw_from_log

    if args.from_log:
        try:
            raw = raw_from_log(args.from_log)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {err}") from err
    else:
        raw = run_demo(settings, runs_log=Path(args.out) / "runs.jsonl")
    report, paths = write_report(raw, args.out)
    if args.json:
        print(json.dumps(report, indent=1, default=float))
    else:
        print(markdown(report))
    print("report: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
