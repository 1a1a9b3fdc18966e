"""`qscope-rl world build|info`: build the demo world or print its stats.
"""

from __future__ import annotations

import argparse
import json

from qscope_rl.world.build import SIZES, build_world, load_world


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default="default", help="which world (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="world seed: lexicon, corpus, LM, SAE and measurement (default: %(default)s)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache root; the world goes in <root>/world/<size>-<hash> "
        "(default: $QSCOPE_RL_CACHE, else ~/.cache/qscope-rl)",
    )


def _build(args: argparse.Namespace) -> int:
    path = build_world(args.size, cache_dir=args.cache_dir, force=args.force, seed=args.seed)
    stats = load_world(args.size, cache_dir=args.cache_dir, seed=args.seed).stats
    print(f"world {args.size} (seed {args.seed}) at {path}")
    for key in ("code_switch_rate_en_to_zh", "code_switch_rate_en_to_es", "code_switch_rate_zh", "code_switch_rate_es",
                "loop_rate", "loop_after_answer_share", "topic_reward_mean", "task_reward_clean", "task_reward_loop",
                "lingua_recall_en_to_es", "lingua_false_positive_rate_en", "d_sae", "sae_fvu", "sae_dead_fraction",
                "lm_heldout_loss", "build_seconds"):  # fmt: skip
        value = stats.get(key)
        print(f"  {key:30s} {'n/a' if value is None else format(value, '.4g')}")
    if "regime_checks" in stats:
        print("the regime (claims fixed before the build; the test world is not meant to meet them):")
        for check in stats["regime_checks"]:
            value = "n/a" if check["measured"] is None else format(check["measured"], ".4g")
            print(f"  {'met   ' if check['met'] else 'MISSED'} {check['claim']}: {value}")
    return 0


def _info(args: argparse.Namespace) -> int:
    world = load_world(args.size, cache_dir=args.cache_dir, seed=args.seed)
    if args.json:
        print(json.dumps(world.stats, indent=2))
    else:
        print(f"world {args.size} (seed {args.seed}) at {world.path}")
        for key, value in world.stats.items():
            print(f"  {key:28s} {value}")
    return 0


def register(subparsers) -> None:
    """Add the `world` subcommand (with `build` and `info`) to a `qscope-rl` subparsers object."""
    world = subparsers.add_parser("world", help="the embedded demo world (tiny trilingual Qwen3 + SAE)")
    actions = world.add_subparsers(dest="world_command", required=True)
    build = actions.add_parser("build", help="build the world unless cached (progress on stderr)")
    _add_common(build)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build)
    info = actions.add_parser("info", help="print the world's stats (builds it first if needed)")
    _add_common(info)
    info.add_argument("--json", action="store_true", help="print the stats as JSON")
    info.set_defaults(func=_info)

