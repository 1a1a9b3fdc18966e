"""The demo's report: the issue's targets checked plainly, a markdown table, PNG plots, and the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qscope_rl.plots import pyplot, save_figure

MEASURES = ("code_switch_rate", "loop_rate", "task_reward")


def checks(result: dict) -> list[dict]:
    """Each target of the demo as {claim, value, target, met}; skipped when an arm it needs did not run."""
    arms, untrained = result["arms"], result["untrained"]

    def mean(arm: str, key: str) -> float:
        return arms[arm][key]["mean"]

    out = []
    if "d" in arms:
        base = untrained["code_switch_rate"]["mean"]
        out.append({"claim": "(d) code-switch rate <= 0.3x the untrained rate", "target": 0.3,
                    "value": _ratio(mean("d", "code_switch_rate"), base),
                    "met": mean("d", "code_switch_rate") <= 0.3 * base})
    if {"b", "d"} <= set(arms):
        out.append({"claim": "(d) code-switch rate <= (b)'s", "value": mean("d", "code_switch_rate"),
                    "target": mean("b", "code_switch_rate"),
                    "met": mean("d", "code_switch_rate") <= mean("b", "code_switch_rate")})
    for arm in ("c", "d"):
        if {"a", arm} <= set(arms):
            ratio = _ratio(mean(arm, "task_reward"), mean("a", "task_reward"))
            out.append({"claim": f"({arm}) task reward within 5% of (a)'s", "value": ratio, "target": 0.95,
                        "met": ratio >= 0.95})
    if {"a", "e"} <= set(arms):
        e, a = mean("e", "loop_rate"), mean("a", "loop_rate")
        # the rates themselves too: with (a) at 0 the ratio is 0/0 or inf and says little on its own
        out.append({"claim": "(e) loop rate <= 0.5x (a)'s", "value": _ratio(e, a), "target": 0.5, "met": e <= 0.5 * a,
                    "detail": f"(e) {e:.4f} vs (a) {a:.4f}"})
    return out


def loop_ratios(result: dict) -> dict[str, float]:
    """Held-out loop rate of each arm as a ratio to (a)'s: (e) side by side with its baseline (f)."""
    arms = result["arms"]
    if "a" not in arms:
        return {}
    return {arm: _ratio(row["loop_rate"]["mean"], arms["a"]["loop_rate"]["mean"]) for arm, row in arms.items()}


def _ratio(x: float, base: float) -> float:
    return x / base if base > 0 else (0.0 if x == 0 else float("inf"))


def markdown(result: dict) -> str:
    seeds, s = result["settings"]["seeds"], result["settings"]
    lines = [
        f"# qscope-rl demo: {len(result['arms'])} arms x {len(seeds)} seeds on the `{result['world']['size']}` "
        f"demo world",
        "",
        f"{s['max_steps']} GRPO steps per run, {s['prompts_per_step']} prompts x {s['num_generations']} rollouts "
        f"per step; measured on {s['eval_prompts']} held-out English prompts x {s['eval_samples_per_prompt']} "
        f"samples by the independent judges (Unicode script, loop detector) and the world's task reward. "
        f"Mean ± standard deviation over seeds {seeds}; per-seed values in `demo.json`.",
        "",
        "| arm | code-switch rate | loop rate | task reward | rollouts while training: code-switch | loop |",
        "|---|---|---|---|---|---|",
        "| untrained | " + " | ".join(_cell(result["untrained"][m]) for m in MEASURES) + " | | |",
    ]
    for arm, row in result["arms"].items():
        cells = [_cell(row[m]) for m in (*MEASURES, "rollout_code_switch_rate", "rollout_loop_rate")]
        lines.append(f"| ({arm}) {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met? |", "|---|---|---|"]
    for check in checks(result):
        detail = f"; {check['detail']}" if "detail" in check else ""
        value = f"{check['value']:.4f}" if math.isfinite(check["value"]) else "undefined"
        lines.append(f"| {check['claim']} | {value} (target {check['target']:.4f}{detail}) | "
                     f"{'yes' if check['met'] else '**NO**'} |")
    ratios = loop_ratios(result)
    if ratios and result["arms"]["a"]["loop_rate"]["mean"] == 0:
        lines += ["", "(a)'s held-out loop rate is 0, so no arm can be compared to it as a ratio; loop rates: "
                  + ", ".join(f"({a}) {row['loop_rate']['mean']:.4f}" for a, row in result["arms"].items()) + "."]
    elif ratios:
        lines += ["", "Loop rate as a ratio to (a)'s: " + ", ".join(f"({a}) {r:.2f}" for a, r in ratios.items()) + "."]
    amplified = result["arms"].get("e", {})
    if "reward_amplified" in amplified and "reward_normal" in amplified:
        lines += ["", f"(e)'s amplified rollouts earned a total reward of {_cell(amplified['reward_amplified'])} "
                  f"over training, the normal rollouts of the same groups {_cell(amplified['reward_normal'])}."]
    missed = [c["claim"] for c in checks(result) if not c["met"]]
    lines += ["", "Not met: " + "; ".join(missed) + "." if missed else "Every target was met.",
              "", f"Run time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def plot_curves(result: dict, path: Path, smooth: int = 5) -> None:
    """Judged rates of each step's rollouts, per arm: mean over seeds, shaded min-max, moving average."""
    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.4))
    for ax, measure in zip(axes, MEASURES):
        for arm, row in result["arms"].items():
            runs = [np.asarray(c[measure], dtype=float) for c in row["curves"] if c[measure]]
            if not runs:
                continue
            steps = min(len(r) for r in runs)
            stack = np.stack([_moving_average(r[:steps], smooth) for r in runs])
            x = np.arange(1, steps + 1)
            (line,) = ax.plot(x, stack.mean(0), label=f"({arm})")
            ax.fill_between(x, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.15)
        ax.axhline(result["untrained"][measure]["mean"], color="k", ls=":", lw=1, label="untrained (held-out)")
        ax.set(title=measure.replace("_", " ") + " of rollouts", xlabel="GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def plot_final(result: dict, path: Path) -> None:
    """Held-out rates after training per arm: bars = mean over seeds, dots = seeds."""
    plt = pyplot()

    names = ["untrained", *[f"({a})" for a in result["arms"]]]
    rows = [result["untrained"], *result["arms"].values()]
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.4))
    for ax, measure in zip(axes, MEASURES):
        ax.bar(names, [r[measure]["mean"] for r in rows], color="lightsteelblue")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r[measure]["per_seed"]), r[measure]["per_seed"], "k.", ms=4)
        ax.set(title=measure.replace("_", " ") + " (held-out)")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _moving_average(values, window: int):
    import numpy as np

    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """demo.json, demo.md, training_curves.png and held_out.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "demo.json", "markdown": out / "demo.md", "curves": out / "training_curves.png",
             "final": out / "held_out.png"}
    result = {**result, "checks": checks(result)}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot_curves(result, paths["curves"])
    plot_final(result, paths["final"])
    return paths
