"""The demo's report: numbers with 95% bootstrap intervals, the issue's targets checked plainly (fixed before
the run, see `TARGETS`), a markdown report, PNG plots, and the JSON.

`analyse(raw)` turns `run_demo`'s raw numbers (per seed and held-out prompt) into the report's numbers;
`checks(report)` compares them with the targets; `write_report` writes demo.json, demo.md and the plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from qscope_rl.plots import pyplot, save_figure

from .policy_measure import MEASURES
from .stats import bootstrap_draws, half_step, interval, overlap, ratio, resampled_means, summarize

FAILURES = ("code_switch_rate_zh", "code_switch_rate_es", "loop_rate")
SAE_ARMS = ("c", "d", "e", "g")
# The targets, fixed before the first run of the v2 world (issue 16); never tuned afterwards.
TARGETS = {
    "regime": "the regime holds: (a) >= 0.7x the untrained rate on each failure (zh switch, es switch, loop)",
    "d_vs_a": "(d) code-switch rate (any target) <= 0.3x (a)'s",
    "same_script": "es switch: the best SAE arm (c, d, g) below (b), 95% intervals not overlapping",
    "task": "task reward of every SAE arm (c, d, e, g) within 5% of (a)'s",
    "e_vs_a": "(e) loop rate <= 0.5x (a)'s (reported beside (f))",
    "amplified": "amplified samples of the untrained policy loop in >= 80% of cases",
    "sasft": "SASFT code-switch rate <= 0.3x plain SFT's, held-out perplexity within 5%",
}


def _matrix(runs: list[dict], key: str) -> np.ndarray:
    return np.array([r["measured"][key] for r in runs], dtype=float)


def analyse(raw: dict) -> dict:
    """Summaries (mean, 95% interval, per seed), ratios to (a) and to the untrained policy, half-steps."""
    seeds, n_prompts = len(raw["settings"]["seeds"]), len(raw["untrained"][0]["task_reward"])
    draws = bootstrap_draws(seeds, n_prompts, raw["settings"]["bootstrap"], seed=0)
    untrained = {m: np.array([u[m] for u in raw["untrained"]]) for m in MEASURES}
    report = {k: raw[k] for k in ("settings", "world", "amplified_heldout", "seconds", "seconds_prepare")}
    report["untrained"] = {m: summarize(untrained[m], draws) for m in MEASURES}
    arms = {}
    mats = {arm: {m: _matrix(row["runs"], m) for m in MEASURES} for arm, row in raw["arms"].items()}
    for arm, row in raw["arms"].items():
        out = {"label": row["label"], **{m: summarize(mats[arm][m], draws) for m in MEASURES}}
        out["vs_untrained"] = {m: ratio(mats[arm][m], untrained[m], draws) for m in FAILURES + ("code_switch_rate",)}
        if "a" in mats:
            out["vs_a"] = {m: ratio(mats[arm][m], mats["a"][m], draws) for m in MEASURES}
            out["half_step"] = {m: half_step(_curves(row, m), _curves(raw["arms"]["a"], m)) for m in
                                ("code_switch_rate_zh", "code_switch_rate_es", "loop_rate")}
        for key in ("reward_amplified", "reward_normal", "amplified_importance_weight"):
            values = [r[key] for r in row["runs"] if key in r]
            if values:
                out[key] = {"mean": float(np.mean(values)), "per_seed": values}
        out["curves"] = [r["curves"] for r in row["runs"]]
        out["seconds_per_run"] = float(np.mean([r["seconds"] for r in row["runs"]]))
        arms[arm] = out
    report["arms"] = arms
    report["amplify_choice"] = raw["settings"]["notes"].get("amplify")
    if raw.get("sft"):
        sft_mats = {meth: {m: _matrix(runs, m) for m in MEASURES} for meth, runs in raw["sft"].items()}
        sft = {}
        for meth, runs in raw["sft"].items():
            ppl = [r["perplexity"] for r in runs]
            sft[meth] = {**{m: summarize(sft_mats[meth][m], draws) for m in MEASURES},
                         "perplexity": {"mean": float(np.mean(ppl)), "per_seed": ppl,
                                        "ci": list(interval(_seed_bootstrap(ppl, draws)))}}
        if {"sft", "sasft"} <= set(sft):
            sft["ratio"] = {m: ratio(sft_mats["sasft"][m], sft_mats["sft"][m], draws) for m in MEASURES}
            ppl = sft["sasft"]["perplexity"]["mean"] / sft["sft"]["perplexity"]["mean"]
            sft["ratio"]["perplexity"] = {"value": ppl}
        report["sft"] = sft
    report["checks"] = checks(report)
    return report


def _seed_bootstrap(values: list[float], draws) -> np.ndarray:
    seed_idx = draws[0] % len(values)
    return np.asarray(values)[seed_idx].mean(1)


def _curves(row: dict, measure: str) -> list[list[float]]:
    return [r["curves"][measure] for r in row["runs"] if r["curves"].get(measure)]


def checks(report: dict) -> list[dict]:
    """Each target as {key, claim, value, detail, met}; skipped when a policy it needs did not run."""
    arms, out = report["arms"], []

    def add(key, value, met, detail):
        # an undefined ratio (a baseline of 0) meets nothing: there is no regime to compare against
        met = bool(met) and value is not None and math.isfinite(value)
        out.append({"key": key, "claim": TARGETS[key], "value": value, "met": met, "detail": detail})

    def worst(values):
        values = list(values)
        return math.nan if any(not math.isfinite(v) for v in values) else min(values)

    if "a" in arms:
        r = arms["a"]["vs_untrained"]
        low = worst(r[m]["value"] for m in FAILURES)
        add("regime", low, low >= 0.7, "; ".join(f"{m.replace('_rate', '')} {_fmt_ratio(r[m])}" for m in FAILURES))
    if {"a", "d"} <= set(arms):
        r = arms["d"]["vs_a"]["code_switch_rate"]
        add("d_vs_a", r["value"], r["value"] <= 0.3, _fmt_ratio(r))
    sae_cs = [a for a in ("c", "d", "g") if a in arms]
    if "b" in arms and sae_cs:
        best = min(sae_cs, key=lambda a: arms[a]["code_switch_rate_es"]["mean"])
        b, s = arms["b"]["code_switch_rate_es"], arms[best]["code_switch_rate_es"]
        met = s["mean"] < b["mean"] and not overlap(s["ci"], b["ci"])
        add("same_script", s["mean"], met, f"({best}) {_fmt(s)} vs (b) {_fmt(b)}")
    sae_all = [a for a in SAE_ARMS if a in arms]
    if "a" in arms and sae_all:
        ratios = {a: arms[a]["vs_a"]["task_reward"] for a in sae_all}
        low = worst(r["value"] for r in ratios.values())
        add("task", low, low >= 0.95, ", ".join(f"({a}) {_fmt_ratio(r)}" for a, r in ratios.items()))
    if {"a", "e"} <= set(arms):
        r = arms["e"]["vs_a"]["loop_rate"]
        detail = f"(e) {_fmt_ratio(r)}"
        if "f" in arms:
            detail += f"; (f) {_fmt_ratio(arms['f']['vs_a']['loop_rate'])}"
        add("e_vs_a", r["value"], r["value"] <= 0.5, detail)
    amp = report.get("amplified_heldout")
    if amp:
        choice = report.get("amplify_choice") or {}
        add("amplified", amp["loop_rate"], amp["loop_rate"] >= 0.8,
            f"{amp['n']} samples; pack {choice.get('pack')}, top {choice.get('top_n')}, alpha {choice.get('alpha')}")
    sft = report.get("sft", {})
    if "ratio" in sft:
        cs, ppl = sft["ratio"]["code_switch_rate"], sft["ratio"]["perplexity"]["value"]
        add("sasft", cs["value"], cs["value"] <= 0.3 and ppl <= 1.05,
            f"switch ratio {_fmt_ratio(cs)}; perplexity ratio {ppl:.3f}")
    return out


def _fmt(stat: dict, digits: int = 4) -> str:
    lo, hi = stat["ci"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _fmt_ratio(r: dict) -> str:
    if not math.isfinite(r["value"]):
        return "undefined (baseline 0)"
    lo, hi = r.get("ci", (math.nan, math.nan))
    return f"{r['value']:.2f}x [{lo:.2f}, {hi:.2f}]"


def markdown(report: dict) -> str:
    s, w = report["settings"], report["world"]
    n = s["eval_prompts"] * s["eval_samples_per_prompt"]
    lines = [
        f"# qscope-rl demo: {len(report['arms'])} arms x {len(s['seeds'])} seeds on the `{w['size']}` demo world "
        f"(world seed {w['seed']})",
        "",
        f"World recipe hash {w.get('recipe_hash', 'not recorded')}, built with CPU kernels "
        f"{w.get('cpu_kernels') or 'not recorded'} "
        f"(MKL honours the pinned AVX2 branch on Intel CPUs only: an AMD-built world is another world of the same "
        f"seed, and its report another report).",
        "",
        f"{s['max_steps']} GRPO steps per run, {s['prompts_per_step']} prompts x {s['num_generations']} rollouts per "
        f"step. Each policy is measured on {s['eval_prompts']} held-out English prompts x "
        f"{s['eval_samples_per_prompt']} "
        f"samples ({n} per seed), judged by the world's lexicon (ground truth; `zh` is what a script judge sees, "
        f"`es` what it cannot), the loop detector and the task reward. Mean over seeds {s['seeds']} with a 95% "
        f"bootstrap interval over prompts and seeds.",
        "",
        "| policy | switch to zh | switch to es | loop | task reward |",
        "|---|---|---|---|---|",
        "| untrained | " + " | ".join(_fmt(report["untrained"][m]) for m in (*FAILURES, "task_reward")) + " |",
    ]
    for arm, row in report["arms"].items():
        cells = " | ".join(_fmt(row[m]) for m in (*FAILURES, "task_reward"))
        lines.append(f"| ({arm}) {row['label']} | {cells} |")
    if "a" in report["arms"]:
        lines += ["", "Ratios to (a) (95% interval), and the first GRPO step at which the arm's rollout rate (10-step "
                  "moving average, mean over seeds) is at most half of (a)'s:", "",
                  "| arm | switch zh / (a) | switch es / (a) | loop / (a) | task / (a) | half of (a): zh | es | loop |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, row in report["arms"].items():
            hs = row["half_step"]
            lines.append(f"| ({arm}) | " + " | ".join(_fmt_ratio(row["vs_a"][m]) for m in (*FAILURES, "task_reward"))
                         + " | " + " | ".join("never" if hs[m] is None else str(hs[m]) for m in FAILURES) + " |")
        a = report["arms"]["a"]["vs_untrained"]
        lines += ["", "(a) against the untrained policy: " + ", ".join(
            f"{m.replace('_rate', '')} {_fmt_ratio(a[m])}" for m in FAILURES) + "."]
    amp, choice = report.get("amplified_heldout"), report.get("amplify_choice")
    if amp and choice:
        grid = ", ".join(f"{g['pack']} top {g.get('top_n', choice['top_n'])} x{g['alpha']:g}: {g['loop_rate']:.2f}"
                         for g in choice["grid"])
        lines += ["", f"Amplified sampling (e): the top {choice['top_n']} features of the `{choice['pack']}` pack at "
                  f"alpha {choice['alpha']:g}, the least steering of the grid to reach the target on "
                  f"{s['amplify_calibration_prompts']} training prompts (loop rate per pack, number of features and "
                  f"alpha: {grid}). On held-out prompts the amplified samples of the untrained policy loop in "
                  f"{amp['loop_rate']:.3f} of {amp['n']} and earn a task reward of {amp['task_reward']:.3f}."]
        for arm in ("e", "h", "i"):
            row = report["arms"].get(arm, {})
            if "reward_amplified" in row:
                weight = row.get("amplified_importance_weight")
                lines.append(f"During training, ({arm})'s amplified rollouts earned a total reward of "
                             f"{row['reward_amplified']['mean']:.3f}, the normal rollouts of the same groups "
                             f"{row['reward_normal']['mean']:.3f}" + (
                                 f"; the mean importance weight of their tokens was {weight['mean']:.3f}."
                                 if weight else " (no importance correction)."))
    sft = report.get("sft", {})
    if "sft" in sft and "sasft" in sft:
        lines += ["", f"SFT table: {s['sft_steps']} steps of {s['sft_batch_size']} English documents (a rare share "
                  f"switched into zh or es, as in the corpus) from the world model, plain SFT vs `SASFTTrainer` "
                  f"(lambda {s['sasft_lambda']}, the zh + es packs); same held-out measurement.", "",
                  "| method | switch to zh | switch to es | any switch | held-out perplexity | task reward |",
                  "|---|---|---|---|---|---|"]
        for meth in ("sft", "sasft"):
            r = sft[meth]
            lines.append(f"| {meth} | {_fmt(r['code_switch_rate_zh'])} | {_fmt(r['code_switch_rate_es'])} | "
                         f"{_fmt(r['code_switch_rate'])} | {_fmt(r['perplexity'], 3)} | {_fmt(r['task_reward'], 3)} |")
        ra = sft["ratio"]
        lines.append(f"| SASFT / SFT | {_fmt_ratio(ra['code_switch_rate_zh'])} | "
                     f"{_fmt_ratio(ra['code_switch_rate_es'])} "
                     f"| {_fmt_ratio(ra['code_switch_rate'])} | {ra['perplexity']['value']:.3f} | "
                     f"{_fmt_ratio(ra['task_reward'])} |")
    lines += ["", "Targets (fixed before the run):", "", "| target | measured | met? |", "|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['claim']} | {c['detail']} | {'yes' if c['met'] else '**NO**'} |")
    missed = [c["key"] for c in report["checks"] if not c["met"]]
    lines += ["", ("Not met: " + ", ".join(missed) + ".") if missed else "Every target was met.", "",
              f"Run time: {report['seconds']:.0f} s ({report['seconds_prepare']:.0f} s preparing: world, packs, "
              f"calibration, amplification grid, untrained measurement).", ""]
    return "\n".join(lines)


def plot_curves(report: dict, path: Path, window: int = 10) -> None:
    """Judged rates of each step's rollouts, per arm: mean over seeds, trailing moving average."""
    from .stats import moving_average

    plt = pyplot()
    measures = ("code_switch_rate_zh", "code_switch_rate_es", "loop_rate", "task_reward")
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4))
    for ax, measure in zip(axes, measures):
        for arm, row in report["arms"].items():
            runs = [np.asarray(c[measure], dtype=float) for c in row["curves"] if c.get(measure)]
            if not runs:
                continue
            steps = min(len(r) for r in runs)
            ax.plot(np.arange(1, steps + 1), moving_average(np.mean([r[:steps] for r in runs], 0), window),
                    label=f"({arm})")
        ax.axhline(report["untrained"][measure]["mean"], color="k", ls=":", lw=1, label="untrained (held-out)")
        ax.set(title=measure.replace("_", " ") + " of rollouts", xlabel="GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def plot_final(report: dict, path: Path) -> None:
    """Held-out rates per policy: bars = mean, error bars = 95% interval."""
    plt = pyplot()
    names = ["untrained", *[f"({a})" for a in report["arms"]]]
    rows = [report["untrained"], *report["arms"].values()]
    measures = (*FAILURES, "task_reward")
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4))
    for ax, measure in zip(axes, measures):
        means = np.array([r[measure]["mean"] for r in rows])
        lo = means - np.array([r[measure]["ci"][0] for r in rows])
        hi = np.array([r[measure]["ci"][1] for r in rows]) - means
        ax.bar(names, means, color="lightsteelblue", yerr=[lo, hi], capsize=3)
        ax.set(title=measure.replace("_", " ") + " (held-out)")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def write_report(raw: dict, out_dir: str | Path) -> tuple[dict, dict[str, Path]]:
    """Analyse `run_demo`'s output; write demo.json (raw + report), demo.md and the plots; return both."""
    report = analyse(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "demo.json", "markdown": out / "demo.md", "curves": out / "training_curves.png",
             "final": out / "held_out.png"}
    paths["json"].write_text(json.dumps({"report": report, "raw": raw}, indent=1, default=float) + "\n")
    paths["markdown"].write_text(markdown(report))
    plot_curves(report, paths["curves"])
    plot_final(report, paths["final"])
    return report, paths


__all__ = ["TARGETS", "analyse", "checks", "markdown", "resampled_means", "write_report"]
