"""Measure the lifecycle utilities (steer, classify, synthesize, redundancy) on the demo world, the way the
Qwen-Scope report measures them.

    python benchmarks/utilities.py [--world-size {default,test}] [--world-seed N | --world-dir DIR] [--plots DIR]

``--world-seed`` picks the world seed (``load_world(size, seed=N)``); ``--world-dir`` measures a built world's
folder instead.

Everything is judged by the world's ground truth (topic vocabularies, Unicode script, the corpus's labels), never
by the SAE. Every setting and measure is fixed up front, in the modules that run them:
- steer (`qscope_rl.demo.steering_experiment`): additive, clamp and conditional steering side by side for
  code-switch suppression and topic steering, plus pre_clamp (ours) for suppression and a dense DiffMean vector at
  the SAE's layer (AxBench's strongest baseline, the yardstick for the features), each mode's strength chosen
  on development prompts by a stated rule, held-out prompts run once; throughput = the same generate call with
  and without the steering hook, pairs in alternating order (ABBA), the median of the pairs' ratios, per mode.
- classify (`qscope_rl.demo.classify_tasks`): four tasks (topic, language, contains a switch, loops), macro-F1
  on balanced held-out documents vs seeds per class (mean of 3 draws) for the Qwen-Scope OR rule, the same
  rule with seed-chosen firing cuts, the rule with its cut and K chosen by 4-fold cross-validation on the seeds
  (ours), SAE + logistic, a dense probe and TF-IDF + logistic; and the rule's
  macro-F1 vs the share of the discovery pool it sees. Headline: the mean over the four tasks at 16 seeds/class.
- synthesize (`qscope_rl.demo.synthesis_experiment`): coverage of the target features at a matched budget, the
  samples each method needs to cover 90% of them, and the downstream topic classifier on the long tail.
- redundancy (`qscope_rl.demo.redundancy_benchmarks`): 14 benchmarks of held-out documents with known cell
  overlap; Spearman between the footprint redundancy R and the performance-based redundancy of a family of
  96 ablated models, over 10 draws of the documents; the reference's own reliability (its two halves of 48
  models against each other) and both measures against the redundancy the benchmarks were built with; the
  overlap matrix against the truth; an asymmetric pair; all of it for the report's last-token footprint (the
  headline) and for the any-token footprint (ours).
The last line is one JSON object with the headline numbers.
"""

from __future__ import annotations

import os

# passive OpenMP waits and one BLAS thread for scikit-learn: on a shared 2-core machine, spinning threads of
# concurrent processes slow each other down by orders of magnitude (set before torch / numpy are imported)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from qscope_rl.demo.classify_tasks import TASKS, world_classification
from qscope_rl.demo.measures import format_curve
from qscope_rl.demo.redundancy_benchmarks import (
    ASYMMETRIC_PAIR,
    benchmark_draws,
    designed_redundancy,
    min_cell_size,
    model_family_scores,
    reference_reliability,
    spearman,
)
from qscope_rl.demo.steering_experiment import code_switch_experiment, steering, topic_experiment
from qscope_rl.demo.synthesis_experiment import downstream, gain_interval, synthesis_setting
from qscope_rl.features.text_features import encode_texts
from qscope_rl.sae.loaders import load_sae
from qscope_rl.tools.classify import plot_curve
from qscope_rl.tools.redundancy import compare_footprints, footprints_of
from qscope_rl.tools.steered_generation import generate
from qscope_rl.tools.synthesize import (
    feature_coverage,
    plot_coverage_curves,
    plot_synthesis,
    random_contexts,
    synthesize,
    target_features,
    unguided,
)
from qscope_rl.world import SIZES, World, load_world
from qscope_rl.world.kernels import pin_kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import built_world  # noqa: E402

THROUGHPUT_PAIRS = 4
DRAWS = 10  # redundancy: draws of the benchmark documents (draw 0 is the headline, the rest show the spread)
# redundancy: the reference's ablated models. With 24 (until 2026-12-06) its halves agreed at Spearman 0.745, with 96
# at 0.826 (docs/utilities/v9/redundancy_amd_*_models.txt): a reference must agree with itself to be checked against
FAMILY = 96
SYNTH_ROUNDS = 16  # synthesize: attempts per target at most (the matched budget is what they use); at 8 the
# targeted run stalled at 87.5% on the default world (2026-12-02), leaving samples-to-90% undefined
UNGUIDED_CAP = 8  # the unguided run may use this many times the targeted run's samples to reach 90%


def bench_steer(world, sae, plots: Path | None) -> dict:
    model, tok = world.model, world.tokenizer
    print("\n## steer: suppress the unwanted-language features on English prompts (dev: up to 128 train prompts, "
          "test: up to 256 held-out)")
    t0 = time.perf_counter()
    cs = code_switch_experiment(world, sae)
    print(f"headline mode (chosen on dev): {cs['headline']} ({time.perf_counter() - t0:.0f}s)")
    print("\n## steer: amplify a topic's top 8 contrastive features, prompts of the other topics "
          "(dev 24, test 64 per topic)")
    t0 = time.perf_counter()
    topic = topic_experiment(world, sae)
    print(f"headline mode (chosen on dev): {topic['headline']} ({time.perf_counter() - t0:.0f}s)")
    t0 = time.perf_counter()

    texts = [p.text for p in world.prompts("heldout", "en")[:128]]

    def timed(alphas, mode) -> float:
        t0 = time.perf_counter()
        with steering(model, sae, alphas, mode) if alphas is not None else contextlib.nullcontext():
            # exactly 48 new tokens in both arms: an earlier end-of-text in one arm would read as a speed-up
            generate(model, tok, texts, batch_size=len(texts), min_new_tokens=48, temperature=world.temperature,
                     progress=False)
        return time.perf_counter() - t0

    ratios = {}
    for mode, alphas in cs["alphas"].items():
        pairs = []
        for r in range(THROUGHPUT_PAIRS):
            order = (False, True) if r % 2 == 0 else (True, False)
            times = {steered: timed(alphas if steered else None, mode) for steered in order}
            pairs.append((times[False], times[True]))
        ratios[mode] = statistics.median(p / st for p, st in pairs)
    print("throughput steered / unsteered (median of " f"{THROUGHPUT_PAIRS} ABBA pairs, {len(texts)} x 48 tokens): "
          + ", ".join(f"{m} {r:.3f}" for m, r in ratios.items()) + f" (goal >= 0.95; {time.perf_counter() - t0:.0f}s)")
    head, thead = cs["modes"][cs["headline"]], topic["modes"][topic["headline"]]
    out = {"steer_cs_mode": cs["headline"], "steer_cs_reduction": head["reduction"],
           "steer_cs_reduction_ci": head["reduction_ci"],
           "steer_cs_ppl_ratio": head["ppl_ratio"], "steer_topic_mode": topic["headline"],
           "steer_topic_success": thead["topic_share"], "steer_topic_ppl_ratio": thead["ppl_ratio"],
           "steer_throughput_ratio": ratios[cs["headline"]]}
    for mode in cs["modes"]:
        out[f"steer_cs_reduction_{mode}"] = cs["modes"][mode]["reduction"]
        out[f"steer_cs_ppl_ratio_{mode}"] = cs["modes"][mode]["ppl_ratio"]
        out[f"steer_throughput_ratio_{mode}"] = ratios[mode]
        out[f"steer_cs_loop_rate_{mode}"] = cs["modes"][mode]["loop_rate"]
        out[f"steer_cs_distinct_2_{mode}"] = cs["modes"][mode]["distinct_2"]
    out["steer_cs_loop_rate_unsteered"] = cs["unsteered"]["loop_rate"]
    out["steer_cs_distinct_2_unsteered"] = cs["unsteered"]["distinct_2"]
    for mode in topic["modes"]:
        out[f"steer_topic_success_{mode}"] = topic["modes"][mode]["topic_share"]
        out[f"steer_topic_ppl_ratio_{mode}"] = topic["modes"][mode]["ppl_ratio"]
    return out


def bench_classify(world, sae, plots: Path | None) -> dict:
    print("\n## classify: four tasks with ground truth, balanced held-out test sets, mean of 3 seed draws")
    res = world_classification(world, sae, TASKS, progress=False)
    out = {}
    for task, r in res.items():
        print(f"\n### {task}: {len(r['classes'])} classes, discovery pool {r['pool']}, test {r['test']}")
        print(format_curve(r["curve"]))
        shares = r["shares"]
        print("rule macro-F1 vs share of the discovery pool: " + " | ".join(
            f"{method}: " + ", ".join(f"{s:.0%} {v:.3f}" for s, v in shares[method].items()) for method in shares))
        for method in r["curve"]:
            out[f"classify_f1_{method}_16_{task}"] = r["curve"][method][16]
        for method, suffix in (("sae_rule", ""), ("sae_rule_cv", "_cv")):
            full = shares[method][1.0]
            out[f"classify_rule{suffix}_share10_recovery_{task}"] = shares[method][0.1] / full if full > 0 else float(
                "nan")
        if plots:
            plot_curve(r["curve"], plots / f"classify_f1_{task}.png", title=f"demo world: {task}")
            plot_curve(shares, plots / f"classify_share_{task}.png", title=f"demo world: {task}",
                       xlabel="share of the discovery pool")
    for method in next(iter(res.values()))["curve"]:
        out[f"classify_f1_{method}_16"] = statistics.fmean(out[f"classify_f1_{method}_16_{t}"] for t in TASKS)
    for suffix in ("", "_cv"):
        out[f"classify_rule{suffix}_share10_recovery"] = statistics.fmean(
            out[f"classify_rule{suffix}_share10_recovery_{t}"] for t in TASKS)
    out["classify_f1_sae_rule_16"], out["classify_f1_dense_probe_16"] = \
        out.pop("classify_f1_sae_rule_16"), out.pop("classify_f1_dense_probe_16")
    print(f"\nmean over the four tasks at 16 seeds/class: rule {out['classify_f1_sae_rule_16']:.3f} (goal >= 0.90), "
          f"rule with seed cuts {out['classify_f1_sae_rule_seed_threshold_16']:.3f}, rule with cut and K chosen by "
          f"4-fold cross-validation on the seeds {out['classify_f1_sae_rule_cv_16']:.3f}, dense probe "
          f"{out['classify_f1_dense_probe_16']:.3f} (gap goal <= 3 points); 10% of the discovery pool keeps "
          f"{out['classify_rule_share10_recovery']:.1%} of the rule's F1 (report: about 99%; cross-validated rule "
          f"{out['classify_rule_cv_share10_recovery']:.1%})")
    return out


def bench_synthesize(world, sae, plots: Path | None, rounds: int = SYNTH_ROUNDS) -> dict:
    model, tok = world.model, world.tokenizer
    setting = synthesis_setting(world)
    real = [d.text for d in setting["real"]]
    reference = setting["reference"]
    coverage = feature_coverage(model, tok, sae, real, progress=False)
    domain = feature_coverage(model, tok, sae, reference, progress=False) > 0
    targets = target_features(coverage, domain)
    print(f"\n## synthesize: {len(real)} real docs ({sum(d.lang != 'en' for d in setting['real'])} in the tail "
          f"language) activate {int((coverage > 0).sum())} features; {int(domain.sum())} alive on "
          f"{len(reference)} reference docs; {len(targets)} targets")
    prompts = [p.text for p in world.prompts("train", "en")]
    result = synthesize(model, tok, sae, targets, prompts, reference=reference, strategy="both",
                        per_target=rounds, temperature=world.temperature)
    n90 = result.samples_to(0.9)
    random_prompts = random_contexts(tok, reference, UNGUIDED_CAP * (n90 or result.n_generated), seed=1)
    base = unguided(model, tok, sae, targets, random_prompts, len(random_prompts), stop_at=0.9, seed=1,
                    temperature=world.temperature)
    base_n90 = base.samples_to(0.9)
    matched = base.coverage_at(result.n_generated)
    if n90 is None:
        efficiency = float("nan")
        note = "targeted never reached 90%"
    elif base_n90 is None:
        efficiency = len(random_prompts) / n90
        note = f"unguided never reached 90% in {len(random_prompts)} samples: a lower bound"
    else:
        efficiency, note = base_n90 / n90, "both reached 90%"
    print(f"{'method':<18} {'generated':>9} {'kept':>5} {'covered':>8} {'coverage':>9} {'to 90%':>7}")
    print(f"{'feature-targeted':<18} {result.n_generated:>9} {len(result.rows):>5} {len(result.covered):>8} "
          f"{result.coverage:>9.3f} {n90 or '-':>7}")
    print(f"{'unguided (same)':<18} {result.n_generated:>9} {'':>5} {round(matched * len(targets)):>8} "
          f"{matched:>9.3f}")
    print(f"{'unguided (longer)':<18} {base.n_generated:>9} {'':>5} {len(base.covered):>8} {base.coverage:>9.3f} "
          f"{base_n90 or '-':>7}")
    print(f"coverage at a matched budget: {result.coverage:.1%} vs {matched:.1%} (goal >= 95%); samples to 90%: "
          f"unguided / targeted = {efficiency:.1f}x ({note}; goal >= 5x)")
    # downstream: the same number of synthetic texts in both arms (the targeted run's kept texts)
    kept = [r["completion"] for r in result.rows]
    arms = {"real+targeted": kept, "real+random": [r["completion"] for r in base.rows[:len(kept)]]}
    down = downstream(world, setting, arms, boot=500)
    print(f"\ndownstream: TF-IDF + logistic topic classifier, macro-F1 on {len(setting['tail_test'])} held-out "
          f"tail-language docs (95% bootstrap intervals)")
    for name in ("real", "twice_real", "real+random", "real+targeted"):
        r = down[name]
        print(f"  {name:<14} n_train {r['n_train']:>4}  F1 {r['f1']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    for name in arms:
        per_topic = [down[name]["synthetic_topics"].get(t, 0) for t in world.topics]
        print(f"  {name}: {sum(per_topic)} of {len(arms[name])} synthetic texts labelled, per topic {min(per_topic)} "
              f"to {max(per_topic)} ({', '.join(map(str, per_topic))}): macro-F1 weighs every topic alike")
    gain = gain_interval(down, "real+targeted", ["twice_real", "real+random"])
    print(f"  gain of real+targeted over the better of twice_real / real+random ({gain['against']}): "
          f"{gain['gain']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}]")
    if plots:
        plot_synthesis(result, base, str(plots / "synthesis_coverage.png"))
        plot_coverage_curves({"feature-targeted": result, "unguided": base}, plots / "synthesis_curves.png")
    return {"synth_rounds": rounds, "synth_targets": len(targets), "synth_coverage": result.coverage,
            "synth_coverage_unguided": matched,
            "synth_budget": result.n_generated, "synth_samples_to_90": n90, "synth_unguided_samples_to_90": base_n90,
            "synth_efficiency_samples_to_90": efficiency, "synth_downstream_gain": gain["gain"],
            "synth_downstream_gain_ci": gain["ci"],
            **{f"synth_downstream_f1_{k}": down[k]["f1"] for k in ("real", "twice_real", "real+random",
                                                                   "real+targeted")}}


def redundancy_draws(world, prints, draws) -> dict:
    """Over the draws: Spearman(R, performance-based redundancy), Spearman(overlap, true overlap), Spearman(R,
    designed redundancy); with the first draw's report and performance-based redundancies."""
    rhos, overlap_rhos, r_designed, first = [], [], [], None
    designed = designed_redundancy(world)
    for index, truth, perf in draws:
        report = compare_footprints({n: [prints[i] for i in idx] for n, idx in index.items()})
        rhos.append(spearman(report.redundancy, perf))
        r_designed.append(spearman(report.redundancy, [designed[n] for n in report.names]))
        pos = {n: i for i, n in enumerate(report.names)}
        pairs = sorted(truth)
        overlap_rhos.append(spearman([truth[p] for p in pairs],
                                     [float(report.overlap[pos[a], pos[b]]) for a, b in pairs]))
        first = first or (report, perf, truth)
    a, b = ASYMMETRIC_PAIR
    report, perf, truth = first
    pos = {n: i for i, n in enumerate(report.names)}
    ab, ba = float(report.overlap[pos[a], pos[b]]), float(report.overlap[pos[b], pos[a]])
    return {"rhos": rhos, "overlap_rhos": overlap_rhos, "report": report, "perf": perf, "truth": truth,
            "asymmetric": (ab, ba), "r_designed": r_designed}


def reference_checks(world, scores, draws) -> dict:
    """Over the draws: the performance-based redundancy's reliability (its two halves of the model family against
    each other) and its Spearman with the designed redundancy."""
    designed = designed_redundancy(world)
    reliability, validity = [], []
    for draw, (index, _, perf) in enumerate(draws):
        reliability.append(reference_reliability(scores, index, seed=draw))
        validity.append(spearman(perf, [designed[n] for n in index]))
    mean_sd = lambda xs: f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"  # noqa: E731
    print(f"the reference itself: its two halves ({scores.shape[1] // 2} models each) rank the benchmarks at Spearman "
          f"{reliability[0]:.3f} (over {DRAWS} draws {mean_sd(reliability)}; a reference this noisy caps any "
          f"measure's agreement with it); against the designed redundancy (fewer distinct cells = more redundant) "
          f"{validity[0]:.3f} ({mean_sd(validity)})")
    return {"redundancy_reference_reliability": reliability[0],
            "redundancy_reference_reliability_mean": statistics.fmean(reliability),
            "redundancy_reference_spearman_designed": validity[0],
            "redundancy_reference_spearman_designed_mean": statistics.fmean(validity)}


def bench_redundancy(world, sae, plots: Path | None, models: int = FAMILY) -> dict:
    docs = world.documents("heldout")
    texts = [d.text for d in docs]
    print(f"\n## redundancy: footprints and a family of {models} ablated models on {len(texts)} held-out documents")
    feats = encode_texts(world.model, world.tokenizer, sae, texts, progress=False)
    prints = {where: footprints_of(feats, where) for where in ("last", "any")}  # the report's, ours
    scores = model_family_scores(world, texts, n_models=models, progress=False)
    # 48 documents per benchmark (v1 default world), at most what the smallest (topic, language) cell holds
    per_benchmark = min(48 if len(docs) >= 800 else 16, min_cell_size(world))
    a, b = ASYMMETRIC_PAIR
    draws = benchmark_draws(world, scores, per_benchmark, DRAWS)  # shared by both footprints and the checks
    out = reference_checks(world, scores, draws)
    for where, suffix in (("last", ""), ("any", "_any")):
        r = redundancy_draws(world, prints[where], draws)
        rhos, overlap_rhos, report, perf, truth = r["rhos"], r["overlap_rhos"], r["report"], r["perf"], r["truth"]
        ab, ba = r["asymmetric"]
        print(f"\n### footprint at {'the last token (the report)' if where == 'last' else 'any token (ours)'}")
        print(report.table())
        print(f"\n{'benchmark':<12} {'R':>6} {'perf-R':>7}")
        for name, red, p in zip(report.names, report.redundancy, perf):
            print(f"{name:<12} {red:>6.3f} {p:>7.3f}")
        asymmetric = ab >= 2 * ba
        print(f"Spearman(R, performance-based redundancy) over {len(report.names)} benchmarks: {rhos[0]:.3f} "
              f"(goal >= 0.9); over {DRAWS} draws {statistics.fmean(rhos):.3f} ± {statistics.stdev(rhos):.3f} "
              f"(min {min(rhos):.3f}, max {max(rhos):.3f})")
        print(f"Spearman(R, designed redundancy): {r['r_designed'][0]:.3f}; over {DRAWS} draws "
              f"{statistics.fmean(r['r_designed']):.3f} ± {statistics.stdev(r['r_designed']):.3f}")
        print(f"Spearman(overlap, true cell overlap) over the {len(truth)} ordered pairs: {overlap_rhos[0]:.3f}; "
              f"over {DRAWS} draws {statistics.fmean(overlap_rhos):.3f} ± {statistics.stdev(overlap_rhos):.3f}")
        print(f"asymmetric pair: overlap({a} -> {b}) = {ab:.2f}, overlap({b} -> {a}) = {ba:.2f} (true 1.00 / "
              f"{truth[(b, a)]:.2f}; report GSM8K -> MATH 0.63, MATH -> GSM8K 0.10): "
              f"{'reproduced' if asymmetric else 'not reproduced'} (goal: the first at least twice the second)")
        if plots:
            report.plot(plots / f"redundancy_overlap{suffix}.png",
                        title=f"overlap(row -> column), footprint at {where} token")
        out |= {f"redundancy_spearman{suffix}": rhos[0], f"redundancy_spearman{suffix}_mean": statistics.fmean(rhos),
                f"redundancy_spearman{suffix}_std": statistics.stdev(rhos),
                f"redundancy_overlap_spearman{suffix}": overlap_rhos[0],
                f"redundancy_spearman_designed{suffix}": r["r_designed"][0],
                f"redundancy_spearman_designed{suffix}_mean": statistics.fmean(r["r_designed"]),
                f"redundancy_overlap_spearman{suffix}_mean": statistics.fmean(overlap_rhos),
                f"redundancy_asymmetric{suffix}": [ab, ba], f"redundancy_asymmetric{suffix}_reproduced": asymmetric}
    return {"redundancy_benchmarks": len(report.names), **out}


BENCHES = {"steer": bench_steer, "classify": bench_classify, "synthesize": bench_synthesize,
           "redundancy": bench_redundancy}


def bench_world(size: str, seed: int, world_dir: str | None) -> World:
    """The world to measure: a built folder, else the cached (or freshly built) world of ``size`` and ``seed``."""
    if world_dir:
        if seed:
            raise SystemExit("error: --world-seed and --world-dir exclude each other (the folder fixes the seed)")
        return built_world(world_dir)
    return load_world(size, seed=seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", "--world", choices=SIZES, default="default",
                        help="demo world size (default: default)")
    parser.add_argument("--world-seed", type=int, default=0, help="world seed (default 0, the preset)")
    parser.add_argument("--world-dir", default=None, help="a built world folder (instead of --world-size)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--plots", default=None, help="write PNG figures into this folder")
    parser.add_argument("--synth-rounds", type=int, default=SYNTH_ROUNDS,
                        help=f"synthesize: attempts per target at most (default {SYNTH_ROUNDS})")
    parser.add_argument("--redundancy-models", type=int, default=FAMILY,
                        help=f"redundancy: ablated models in the reference's family, >= 6 (default {FAMILY})")
    args = parser.parse_args(argv)
    pin_kernels()  # the same numbers on every machine (qscope_rl.world.kernels), with 2 threads
    torch.set_num_threads(2)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.world_seed < 0:
        raise SystemExit(f"error: --world-seed must be >= 0, got {args.world_seed}")
    if args.redundancy_models < 6:
        raise SystemExit(f"error: --redundancy-models must be >= 6 (two halves of 3), got {args.redundancy_models}")
    world = bench_world(args.world_size, args.world_seed, args.world_dir)
    sae = load_sae(world.sae_dir, layer=world.layer)
    plots = Path(args.plots) if args.plots else None
    if plots:
        plots.mkdir(parents=True, exist_ok=True)
    print(f"world at {world.path}: d_model={world.stats['d_model']}, SAE d_sae={sae.d_sae} "
          f"k={sae.k} at layer {world.layer}")
    results = {"world_size": world.stats.get("size", args.world_size), "world_seed": world.stats.get("seed", 0)}
    for name in args.only.split(","):
        if name not in BENCHES:
            raise SystemExit(f"error: unknown benchmark {name!r}; choose from {list(BENCHES)}")
        t, cpu = time.perf_counter(), time.process_time()
        options = {"synthesize": {"rounds": args.synth_rounds}, "redundancy": {"models": args.redundancy_models}}
        results |= BENCHES[name](world, sae, plots, **options.get(name, {}))
        # CPU seconds beside wall seconds: on a shared machine the wall time is mostly other jobs' load
        print(f"({name}: {time.perf_counter() - t:.0f}s wall, {time.process_time() - cpu:.0f}s CPU)")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    def clean(v):  # NaN (a measure that is undefined on this run) prints as null: the line stays strict JSON
        if isinstance(v, float):
            return None if v != v else round(v, 4)
        return [clean(x) for x in v] if isinstance(v, list) else v

    print(json.dumps({k: clean(v) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
