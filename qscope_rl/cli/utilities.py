"""``qscope-rl steer | classify | synthesize | redundancy``: the lifecycle utilities on the command line.

Without ``--model`` every command runs on the demo world (``--world``, default "test"), whose ground-truth
topic and language labels make the results checkable; with ``--model`` (HF path or id), ``--sae`` and
``--layer`` are required and texts come from files (JSONL with a "text" field, or plain lines). Every
command prints a readable table, or one JSON object with ``--json``; ``--plot PNG`` draws a figure.
The demo world's measures (judged rates, the classification curve, benchmarks of known overlap) come from
`qscope_rl.demo.measures`.
"""

from __future__ import annotations

import random

from .common import LoadedSources, add_source_args, fail, print_json, read_records
from .errors import check_writable, counts, non_negative_float, positive_int


def register(subparsers) -> None:
    _register_steer(subparsers)
    _register_classify(subparsers)
    _register_synthesize(subparsers)
    _register_redundancy(subparsers)


# -- steer --------------------------------------------------------------------------------------------


def _register_steer(subparsers) -> None:
    p = subparsers.add_parser("steer", help="generate with SAE features amplified or suppressed")
    add_source_args(p)
    what = p.add_argument_group("what to steer")
    what.add_argument("--feature", action="append", default=[], metavar="ID=STRENGTH",
                      help="feature and strength: raw alpha (-4.5) or relative to the pack's contrastive "
                           "activation difference (light / medium / strong = 0.5x / 2x / 10x, '-strong', '3x'); "
                           "repeatable")
    what.add_argument("--pack", default=None,
                      help="feature pack JSON; on the world also 'zh', 'en', 'repetition' or 'topic:<name>'")
    what.add_argument("--strength", default=None,
                      help="strength for the pack's features; negative values need '=': --strength=-medium")
    what.add_argument("--top", type=positive_int, default=8, help="use the pack's first N features (default 8)")
    what.add_argument("--mode", choices=("add", "clamp", "conditional"), default="add",
                      help="add: h + alpha d; clamp: set the feature's activation to the strength; conditional: "
                           "scale the feature's decoded contribution by the strength where it fires (0 removes it)")
    what.add_argument("--positions", default=None, help="token positions to steer: '0:8', '5:' or '3,4,5' "
                                                        "(default: all, prompt and generated)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts", default=None, help="file of prompts (JSONL text or lines)")
    gen.add_argument("--lang", default="en", help="world prompts: language (en / zh)")
    gen.add_argument("-n", "--n-prompts", type=positive_int, default=32, help="world prompts: how many")
    gen.add_argument("--max-new-tokens", type=positive_int, default=48)
    gen.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    gen.add_argument("--sweep", default=None, help="comma-separated strengths for the pack, e.g. "
                                                   "--sweep=-light,-medium,-strong (world: a metrics-vs-strength plot)")
    p.set_defaults(func=_steer)


def _positions(text: str | None):
    if text is None:
        return None
    if ":" in text:
        start, _, stop = text.partition(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    return [int(x) for x in text.split(",") if x.strip()]


def _load_pack(loaded, name: str, seed: int):
    from qscope_rl.demo.measures import world_topic_pack
    from qscope_rl.features.feature_pack import FeaturePack

    if loaded.world is not None and name in ("zh", "en", "repetition"):
        from qscope_rl.world.packs import world_packs

        return world_packs(loaded.world)[name]
    if loaded.world is not None and name.startswith("topic:"):
        topic = name.split(":", 1)[1]
        if topic not in loaded.world.topics:
            raise SystemExit(f"error: unknown topic {topic!r}; the world has {loaded.world.topics}")
        return world_topic_pack(loaded.world, loaded.sae, topic, seed=seed)
    pack = FeaturePack.load(name)
    pack.check_compatible(loaded.sae)
    return pack


def _strength_maps(args, loaded, pack) -> list[tuple[str, dict[int, float]]]:
    """[(label, {feature: alpha})] for every strength asked (one, or each of the sweep)."""
    from qscope_rl.tools.steered_generation import merge_strengths, parse_strength, relative_strengths

    explicit: dict[int, float] = {}
    for item in args.feature:
        feature, sep, strength = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --feature {item!r}: expected ID=STRENGTH")
        value, relative = parse_strength(strength)
        if relative and pack is None:
            raise SystemExit(f"error: --feature {item!r}: a relative strength needs --pack (the feature's "
                             f"contrastive activation difference comes from it)")
        alphas = relative_strengths(pack, strength, features=[int(feature)]) if relative else {int(feature): value}
        explicit = merge_strengths(explicit, alphas)
    strengths = args.sweep.split(",") if args.sweep else [args.strength] if args.strength else []
    if pack is not None and not strengths and not explicit:
        raise SystemExit("error: --pack needs --strength (or --sweep)")
    if pack is None and not explicit:
        raise SystemExit("error: give --feature ID=STRENGTH and/or --pack with --strength")
    if not strengths:
        return [(",".join(args.feature), explicit)]
    return [(s, merge_strengths(explicit, relative_strengths(pack, s, top=args.top))) for s in strengths]


def _steer(args) -> int:
    from qscope_rl.demo.measures import plot_steering_sweep, steering_metrics
    from qscope_rl.tools.steered_generation import generate, steer

    empty = [i for i, text in enumerate(args.prompt, 1) if not text.strip()]
    if empty:
        raise SystemExit(f"error: --prompt number {empty[0]} is empty")
    texts = list(args.prompt) + ([r["text"] for r in read_records(args.prompts)] if args.prompts else [])
    loaded = LoadedSources(args)
    pack = _load_pack(loaded, args.pack, args.seed) if args.pack else None
    runs = _strength_maps(args, loaded, pack)
    prompt_objs = None
    if not texts:
        if loaded.world is None:
            raise SystemExit("error: with --model give --prompt or --prompts")
        prompt_objs = loaded.world.prompts("heldout", args.lang)[: args.n_prompts]
        texts = [p.text for p in prompt_objs]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    target = args.pack.split(":", 1)[1] if args.pack and args.pack.startswith("topic:") else None
    try:
        results = {"unsteered": {"completions": generate(loaded.model, loaded.tokenizer, texts, **kw)}}
    except ValueError as err:
        raise fail(err) from err
    for label, alphas in runs:
        try:
            with steer(loaded.model, loaded.sae, alphas, mode=args.mode, positions=_positions(args.positions)):
                completions = generate(loaded.model, loaded.tokenizer, texts, **kw)
        except ValueError as err:
            raise fail(err) from err
        results[label] = {"features": {str(k): v for k, v in alphas.items()}, "completions": completions}
    if prompt_objs is not None:
        for res in results.values():
            res["metrics"] = steering_metrics(loaded.world, prompt_objs, res["completions"], loaded.model,
                                              loaded.tokenizer, target)
    if args.plot and prompt_objs is not None:
        plot_steering_sweep(results, args.plot)
    if args.json:
        print_json({"prompts": texts, "runs": results})
        return 0
    for label, res in results.items():
        metrics = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in res.get("metrics", {}).items())
        print(f"\n== {label}  {metrics}")
        for prompt, completion in list(zip(texts, res["completions"]))[:5]:
            print(f"  {prompt[:60]!r} -> {completion[:80]!r}")
    return 0


# -- classify -----------------------------------------------------------------------------------------


def _register_classify(subparsers) -> None:
    p = subparsers.add_parser("classify", help="few-shot classification with SAE features (fit / predict / eval)")
    p.add_argument("action", choices=("fit", "predict", "eval"),
                   help="fit: seeds -> classifier file; predict: classifier + texts -> labels; eval: the world's "
                        "macro-F1 vs seed count against dense and TF-IDF probes")
    add_source_args(p)
    p.add_argument("--kind", choices=("rule", "logistic"), default="rule")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="rule: features per class (default: chosen in 1..10)")
    p.add_argument("--threshold", choices=("zero", "seed"), default="zero",
                   help="rule: a feature fires when its max activation is > 0 (zero, the Qwen-Scope rule) or > a "
                        "cut chosen per feature on the seeds (seed)")
    p.add_argument("--texts", default=None, help="fit: JSONL with text and label; predict: texts (JSONL or lines)")
    p.add_argument("--classifier", default=None, help="classifier file (.safetensors) to write (fit) or read")
    p.add_argument("--seeds-per-class", type=counts, default="4,16,64",
                   help="eval: seed counts (comma-separated); fit on the world: the first is used")
    p.add_argument("--repeats", type=positive_int, default=3, help="eval: seed draws averaged per count")
    p.add_argument("--n-test", type=positive_int, default=400, help="eval: held-out documents to score")
    p.set_defaults(func=_classify)


def _classify(args) -> int:
    from qscope_rl.tools.classify import ClassifierError, FeatureClassifier, fit_classifier

    if args.action == "fit":
        check_writable(args.classifier, "--classifier")
    loaded = LoadedSources(args)
    try:
        if args.action == "fit":
            return _classify_fit(args, loaded, fit_classifier)
        if args.action == "predict":
            if not (args.classifier and args.texts):
                raise SystemExit("error: classify predict needs --classifier and --texts")
            clf = FeatureClassifier.load(args.classifier, sae=loaded.sae)
            texts = [r["text"] for r in read_records(args.texts)]
            labels = clf.predict_texts(loaded.model, loaded.tokenizer, loaded.sae, texts)
            if args.json:
                print_json([{"text": t, "label": y} for t, y in zip(texts, labels)])
            else:
                for t, y in zip(texts, labels):
                    print(f"{y}\t{t[:100]}")
            return 0
        return _classify_eval(args, loaded)
    except (ClassifierError, ValueError) as err:
        raise fail(err) from err


def _classify_fit(args, loaded, fit_classifier) -> int:
    if args.texts:
        rows = read_records(args.texts)
        if any("label" not in r for r in rows):
            raise SystemExit(f"error: {args.texts}: every line needs a 'label' field to fit on")
        texts, labels = [r["text"] for r in rows], [str(r["label"]) for r in rows]
    elif loaded.world is not None:
        n = args.seeds_per_class[0]
        docs, rng = loaded.world.documents("train"), random.Random(args.seed)
        chosen = [d for t in loaded.world.topics for d in rng.sample([d for d in docs if d.topic == t], n)]
        texts, labels = [d.text for d in chosen], [d.topic for d in chosen]
    else:
        raise SystemExit("error: with --model, classify fit needs --texts (JSONL with text and label)")
    clf = fit_classifier(loaded.model, loaded.tokenizer, loaded.sae, texts, labels, args.kind, top_k=args.top_k,
                         threshold=args.threshold)
    if args.classifier:
        clf.save(args.classifier)
    summary = {"kind": clf.kind, "classes": clf.classes, "n_seeds": len(texts), "saved_to": args.classifier}
    if clf.kind == "rule":
        summary["rules"] = {c: [[i, round(w, 4)] for i, w in r] for c, r in clf.rules().items()}
    if args.json:
        print_json(summary)
    else:
        print(f"fitted a {clf.kind} classifier on {len(texts)} seeds, classes {clf.classes}"
              + (f"; saved to {args.classifier}" if args.classifier else ""))
        for c, r in summary.get("rules", {}).items():
            print(f"  {c:<10} OR over features {[i for i, _ in r]}")
    return 0


def _classify_eval(args, loaded) -> int:
    from qscope_rl.demo.measures import format_curve, world_classify_curve
    from qscope_rl.tools.classify import plot_curve

    if loaded.world is None:
        raise SystemExit("error: classify eval runs on the demo world (it needs ground-truth labels)")
    seeds = list(args.seeds_per_class)
    curve, n_train, n_test = world_classify_curve(loaded.world, loaded.sae, seeds, args.repeats, args.n_test,
                                                  args.seed)
    if args.plot:
        plot_curve(curve, args.plot, title=f"topic classification, demo world ({args.world})")
    if args.json:
        print_json({"macro_f1": curve, "n_train_pool": n_train, "n_test": n_test})
    else:
        print(format_curve(curve))
    return 0


# -- synthesize ---------------------------------------------------------------------------------------


def _register_synthesize(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="generate data for features a dataset never activates")
    add_source_args(p)
    p.add_argument("--dataset", default=None, help="the dataset (JSONL text or lines); world: --dataset-size "
                                                   "random training documents")
    p.add_argument("--dataset-size", type=positive_int, default=64)
    p.add_argument("--reference", default=None, help="texts of the domain (contexts, typical activations, and "
                                                     "with --domain alive the features to aim at); world: "
                                                     "held-out documents")
    p.add_argument("--prompts", default=None, help="openings to generate from; world: its training prompts")
    p.add_argument("--domain", default="alive",
                   help="'alive': features that fire on the reference texts; or a feature pack JSON; or 'all'")
    p.add_argument("--strategy", choices=("context", "steer", "both"), default="both")
    p.add_argument("--per-target", type=positive_int, default=4, help="at most this many candidates per target")
    p.add_argument("--strength", type=float, default=4.0, help="steer: alpha = strength x typical activation")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--unguided", action="store_true", help="also run plain sampling at the same budget")
    p.add_argument("--out", default=None, help="write the kept texts here as JSONL (datasets format)")
    p.set_defaults(func=_synthesize)


def _synthesize(args) -> int:
    from qscope_rl.features.feature_pack import FeaturePack
    from qscope_rl.tools.synthesize import feature_coverage, plot_synthesis, synthesize, target_features, unguided

    check_writable(args.out, "--out")
    loaded = LoadedSources(args)
    m, tok, sae, world = loaded.model, loaded.tokenizer, loaded.sae, loaded.world
    rng = random.Random(args.seed)
    if args.dataset:
        data = [r["text"] for r in read_records(args.dataset)]
    elif world is not None:
        data = [d.text for d in rng.sample(world.documents("train"), args.dataset_size)]
    else:
        raise SystemExit("error: with --model, synthesize needs --dataset")
    reference = [r["text"] for r in read_records(args.reference)] if args.reference else \
        [d.text for d in world.documents("heldout")] if world is not None else None
    prompts = [r["text"] for r in read_records(args.prompts)] if args.prompts else \
        [p.text for p in world.prompts("train")] if world is not None else None
    if prompts is None:
        raise SystemExit("error: with --model, synthesize needs --prompts")
    try:
        coverage = feature_coverage(m, tok, sae, data)
        if args.domain == "alive":
            if reference is None:
                raise SystemExit("error: --domain alive needs --reference texts")
            domain = feature_coverage(m, tok, sae, reference) > 0
        elif args.domain == "all":
            domain = None
        else:
            domain = FeaturePack.load(args.domain)
            domain.check_compatible(sae)
        targets = target_features(coverage, domain)
        result = synthesize(m, tok, sae, targets, prompts, strategy=args.strategy, reference=reference,
                            per_target=args.per_target, strength=args.strength, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
        base = unguided(m, tok, sae, targets, prompts, result.n_generated, max_new_tokens=args.max_new_tokens,
                        seed=args.seed) if args.unguided else None
    except ValueError as err:
        raise fail(err) from err
    if args.out:
        result.save_jsonl(args.out)
    summary = {"dataset_texts": len(data), "features_active_in_dataset": int((coverage > 0).sum()),
               "targets": len(result.targets), "covered": len(result.covered), "coverage": result.coverage,
               "generated": result.n_generated, "kept": len(result.rows), "out": args.out}
    if base is not None:
        summary |= {"unguided_coverage": base.coverage,
                    "efficiency_vs_unguided": result.coverage_per_sample / max(base.coverage_per_sample, 1e-12)}
    if args.plot:
        plot_synthesis(result, base, args.plot)
    if args.json:
        print_json(summary)
    else:
        for key, value in summary.items():
            print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    return 0


# -- redundancy ---------------------------------------------------------------------------------------


def _register_redundancy(subparsers) -> None:
    p = subparsers.add_parser("redundancy", help="footprint redundancy and overlap of evaluation sets")
    add_source_args(p)
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE",
                   help="a benchmark's texts (JSONL text or lines); repeatable. World default: six topic-subset "
                        "benchmarks with known overlap")
    p.add_argument("--per-topic", type=positive_int, default=12, help="world benchmarks: documents per topic")
    p.set_defaults(func=_redundancy)


def _redundancy(args) -> int:
    from qscope_rl.demo.measures import demo_benchmarks, overlap_spearman
    from qscope_rl.tools.redundancy import compare_benchmarks

    given: dict[str, str] = {}
    for item in args.benchmark:  # checked before the model loads
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --benchmark {item!r}: expected NAME=FILE")
        if name in given:
            raise SystemExit(f"error: --benchmark {name!r} is given twice ({given[name]} and {path}); give each "
                             f"benchmark its own name")
        given[name] = path
    loaded = LoadedSources(args)
    truth = None
    if given:
        benchmarks = {name: [r["text"] for r in read_records(path)] for name, path in given.items()}
    elif loaded.world is not None:
        benchmarks, truth = demo_benchmarks(loaded.world, args.per_topic, args.seed)
    else:
        raise SystemExit("error: with --model, give --benchmark NAME=FILE (two or more)")
    try:
        report = compare_benchmarks(loaded.model, loaded.tokenizer, loaded.sae, benchmarks)
    except ValueError as err:
        raise fail(err) from err
    out = report.to_dict()
    if truth is not None:
        out["spearman_vs_true_overlap"] = overlap_spearman(report, truth)
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print_json(out)
    else:
        print(report.table())
        if truth is not None:
            print(f"Spearman(estimated, true overlap) over ordered pairs: {out['spearman_vs_true_overlap']:.3f}")
    return 0
