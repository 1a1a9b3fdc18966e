"""How many training seeds `qscope-rl demo` needs to tell a working method from a no-op: power from its reports.

For each held-out measure, the between-seed CV of every arm's rate (3 seeds per arm in today's job), pooled over
the arms and the reports given (`qscope_rl.demo.stats.pooled_cv`); then the ratio of two arms' rates that today's
seeds resolve with 80% power at the 5% level, the seeds per arm that the issue's ratios (0.7, 0.5, 0.3) need, and
what the job would take at that many seeds: the fastest report's time (the least loaded machine) with its GRPO
runs, `workers` at a time, scaled to that many seeds. A planning figure, not a verdict: it treats seeds as the
only unit (the report's intervals also resample prompts), and a CV from 3 seeds is itself noisy.

    python benchmarks/demo_power.py docs/demo/demo.json docs/demo/world_seed_1/demo.json \\
        docs/demo/amd_world_seed_0/demo.json docs/demo/amd_world_seed_1/demo.json

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from qscope_rl.demo.stats import detectable_ratio, pooled_cv, seeds_needed

MEASURES = ("code_switch_rate", "code_switch_rate_zh", "code_switch_rate_es", "loop_rate", "task_reward")
RATIOS = (0.7, 0.5, 0.3)


def load_report(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: no demo report at {path}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not JSON ({err})") from None
    report = data.get("report", data)
    if not isinstance(report.get("arms"), dict) or not report["arms"]:
        raise SystemExit(f"error: {path} is not a `qscope-rl demo` report (no arms)")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="demo.json files written by `qscope-rl demo`")
    args = parser.parse_args(argv)
    reports = [load_report(p) for p in args.reports]
    seeds = min(len(r["settings"]["seeds"]) for r in reports)
    fastest = min(reports, key=lambda r: r["seconds"])
    arms, workers = len(fastest["arms"]), fastest["settings"].get("workers", 1)
    run_seconds = statistics.fmean(a["seconds_per_run"] for a in fastest["arms"].values() if "seconds_per_run" in a)

    def minutes(n: int) -> float:  # the fastest job, its GRPO runs scaled from its seeds to n
        return (fastest["seconds"] + arms * (n - len(fastest["settings"]["seeds"])) * run_seconds / workers) / 60

    print(f"{len(reports)} reports, {seeds} seeds per arm; time from the fastest report: {fastest['seconds']:.0f} s, "
          f"{arms} arms, {run_seconds:.0f} s per GRPO run, {workers} at a time")
    head = " ".join(f"{f'seeds {r}x':>9} {'minutes':>8}" for r in RATIOS)
    print(f"{'measure':<22} {'CV':>6} {f'resolved at {seeds}':>12}  {head}")
    out = {"reports": len(reports), "seeds": seeds, "arms": arms, "seconds_per_run": round(run_seconds, 1),
           "minutes_now": round(minutes(len(fastest["settings"]["seeds"])), 1)}
    for measure in MEASURES:
        per_seed = [a[measure]["per_seed"] for r in reports for a in r["arms"].values() if measure in a]
        if not per_seed:
            continue
        cv = pooled_cv(per_seed)
        need = {r: seeds_needed(cv, r) for r in RATIOS}
        cells = " ".join(f"{need[r]:>9} {minutes(need[r]):>8.0f}" for r in RATIOS)
        print(f"{measure:<22} {cv:>6.2f} {detectable_ratio(cv, seeds):>12.2f}  {cells}")
        out[measure] = {"cv": round(cv, 3), "resolved_ratio": round(detectable_ratio(cv, seeds), 3),
                        **{f"seeds_{r}": need[r] for r in RATIOS},
                        **{f"minutes_{r}": round(minutes(need[r]), 1) for r in RATIOS}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
