"""Measurements on the demo world, shared by the utility commands and `benchmarks/utilities.py`.

The world's ground truth (topics, languages, switch and loop positions) is what makes the utilities checkable:
these helpers turn it into the judged measures the benchmarks report (steering rates and perplexity, the
classification curve, topic-subset benchmarks with a known overlap, their Spearman).
"""

from __future__ import annotations

import random

from qscope_rl import judges
from qscope_rl.plots import pyplot, save_figure


def world_topic(world, text: str, lang: str) -> str | None:
    """The topic whose vocabulary (in ``lang``) makes up most of ``text``, by the world's ground truth."""
    shares = {t: world.topic_share(text, t, lang) for t in world.topics}
    best = max(shares, key=shares.get)
    return best if shares[best] > 0 else None


def clean_documents(world, split: str = "train"):
    return [d for d in world.documents(split) if d.switch_char is None and d.loop_char is None]


def topic_contrast(world, topic: str, n_texts: int = 300, seed: int = 0) -> tuple[list[str], list[str]]:
    """(up to ``n_texts`` clean training documents of ``topic``, up to twice as many of the other topics), seeded."""
    docs, rng = clean_documents(world), random.Random(seed)
    pos = [d.text for d in docs if d.topic == topic]
    neg = [d.text for d in docs if d.topic != topic]
    return _sample(pos, n_texts, rng), _sample(neg, 2 * n_texts, rng)


def world_topic_pack(world, sae, topic: str, n_texts: int = 300, top_k: int = 16, seed: int = 0):
    """Contrastive features of ``topic`` (its clean training documents vs the other topics')."""
    from qscope_rl.features.discovery import discover_contrastive_features

    pos, neg = topic_contrast(world, topic, n_texts, seed)
    return discover_contrastive_features(world.model, world.tokenizer, sae, pos, neg, top_k=top_k,
                                         rank_by="mean_diff", name=f"topic-{topic}")


def world_topic_vector(world, layer: int, topic: str, n_texts: int = 300, seed: int = 0):
    """DiffMean toward ``topic`` at ``layer``: the same documents as ``world_topic_pack``'s contrast."""
    from qscope_rl.tools.steering_vectors import diff_mean

    pos, neg = topic_contrast(world, topic, n_texts, seed)
    return diff_mean(world.model, world.tokenizer, pos, neg, layer)


def world_language_vector(world, layer: int, langs, lang: str = "en", n_texts: int = 300, seed: int = 0):
    """DiffMean from ``lang`` toward ``langs`` at ``layer``: up to ``n_texts`` clean training documents of each of
    ``langs`` against up to twice as many of ``lang`` (subtract it to steer toward ``lang``)."""
    from qscope_rl.tools.steering_vectors import diff_mean

    docs, rng = clean_documents(world), random.Random(seed)
    pos = [t for other in langs for t in _sample([d.text for d in docs if d.lang == other], n_texts, rng)]
    neg = _sample([d.text for d in docs if d.lang == lang], 2 * n_texts, rng)
    return diff_mean(world.model, world.tokenizer, pos, neg, layer)


def _sample(items: list, n: int, rng: random.Random) -> list:
    return rng.sample(items, min(n, len(items)))


# Demo "benchmarks" over 8 topics (indices), every one 4 topics and the same size, so that the true
# overlap(A -> B) = |topics(A) & topics(B)| / 4 takes the values 0, 1/4, 1/2, 3/4 across pairs.
DEMO_BENCHMARKS = {"A": (0, 1, 2, 3), "B": (0, 1, 2, 4), "C": (0, 1, 5, 6), "D": (0, 5, 6, 7),
                   "E": (4, 5, 6, 7), "F": (2, 3, 4, 5)}


def demo_benchmarks(world, per_topic: int = 12, seed: int = 0) -> tuple[dict[str, list[str]], dict]:
    """({name: texts}, {(a, b): true overlap}): held-out documents of each benchmark's topics."""
    topics = world.topics
    if len(topics) < 8:
        raise ValueError(f"the demo benchmarks need 8 topics, the world has {len(topics)}")
    docs, rng = world.documents("heldout"), random.Random(seed)
    by_topic = {t: [d.text for d in docs if d.topic == t] for t in topics}
    benchmarks = {name: [x for i in idx for x in rng.sample(by_topic[topics[i]], per_topic)]
                  for name, idx in DEMO_BENCHMARKS.items()}
    truth = {(a, b): len(set(ia) & set(ib)) / len(ia) for a, ia in DEMO_BENCHMARKS.items()
             for b, ib in DEMO_BENCHMARKS.items() if a != b}
    return benchmarks, truth


def steering_metrics(world, prompts, completions, base_model, tokenizer, target_topic: str | None = None, *,
                     per_sample: bool = False) -> dict:
    """Judge completions on the world: code-switch rate by the world's lexicon (the ground truth, which sees the
    same-script Spanish switch), per target language and as a Unicode-script judge sees it; the share judged on
    ``target_topic``; the unsteered model's perplexity on them; ``n``, the number of completions.

    Beside the perplexity, what it cannot see: repetitive text is predictable, so a steered model that loops
    scores a lower perplexity than the unsteered one. ``loop_rate`` (completions ending in a loop,
    `judges.has_loop`), ``distinct_2`` (each completion's distinct unit bigrams over its bigrams, summed over
    completions: repetition within a sample, not shared phrases across samples) and ``mean_units`` (mean length
    in `judges.units`). ``per_sample``: also ``switched``, each completion's code-switch flag (for intervals)."""
    from qscope_rl.tools.steered_generation import perplexity

    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"steering_metrics: {len(prompts)} prompts for {n} completions; pass one prompt per "
                         f"completion (repeat a prompt for each of its samples)")
    if n == 0:
        raise ValueError("steering_metrics: no completions to judge (every rate would be 0 / 0)")
    pairs = list(zip(prompts, completions))
    split = [judges.units(c) for c in completions]
    bigrams = [[tuple(u[i:i + 2]) for i in range(len(u) - 1)] for u in split]
    foreign = [world.judge.foreign(c, p.lang) for p, c in pairs]  # each completion judged once, every target
    out = {"n": n,
           "code_switch_rate": sum(map(bool, foreign)) / n,
           "code_switch_rate_script": sum(judges.script_code_switch(c, p.lang) for p, c in pairs) / n,
           "perplexity": perplexity(base_model, tokenizer, [p.text for p in prompts], completions),
           "loop_rate": sum(map(judges.has_loop, split)) / n,
           "distinct_2": sum(len(set(b)) for b in bigrams) / max(sum(map(len, bigrams)), 1),
           "mean_units": sum(map(len, split)) / n}
    for lang in sorted({lang for p in prompts for lang in world.judge.langs if lang != p.lang}):
        out[f"code_switch_rate_{lang}"] = sum(lang in f for f in foreign) / n
    if per_sample:
        out["switched"] = [bool(f) for f in foreign]
    if target_topic is not None:
        out["topic_share"] = sum(world_topic(world, c, p.lang) == target_topic for p, c in pairs) / n
    return out


def plot_steering_sweep(results: dict, path: str) -> None:
    """Judged rates (left axis) and perplexity (right axis) of each steering strength, as a PNG."""
    plt = pyplot()

    labels = list(results)
    metrics = [m for m in ("code_switch_rate", "topic_share") if m in results[labels[0]]["metrics"]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.5))
    for m in metrics:
        ax.plot(labels, [results[x]["metrics"][m] for x in labels], marker="o", label=m)
    ax.set(ylabel="rate", ylim=(0, 1.02), xlabel="strength")
    twin = ax.twinx()
    twin.plot(labels, [results[x]["metrics"]["perplexity"] for x in labels], "k--", marker="s", label="perplexity")
    twin.set_ylabel("unsteered perplexity")
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    save_figure(fig, path, rect=(0, 0, 1, 0.9))


def world_classify_curve(world, sae, seeds, repeats: int = 3, n_test: int = 400, seed: int = 0):
    """Macro-F1 vs seeds per class on the world's topics: (curve, train pool size, test size)."""
    from qscope_rl.features.text_features import encode_texts
    from qscope_rl.tools.classify import few_shot_curve

    rng = random.Random(seed)
    train_docs = world.documents("train")
    pool = [d for t in world.topics for d in rng.sample([d for d in train_docs if d.topic == t], max(seeds))]
    test = rng.sample(world.documents("heldout"), min(n_test, len(world.documents("heldout"))))
    ftrain = encode_texts(world.model, world.tokenizer, sae, [d.text for d in pool], desc="classify: train pool")
    ftest = encode_texts(world.model, world.tokenizer, sae, [d.text for d in test], desc="classify: test")
    curve = few_shot_curve(sae, ftrain, [d.text for d in pool], [d.topic for d in pool], ftest,
                     [d.text for d in test], [d.topic for d in test], seeds_per_class=seeds, repeats=repeats,
                     seed=seed)
    return curve, len(pool), len(test)


def format_curve(curve: dict) -> str:
    seeds = list(next(iter(curve.values())))
    lines = [f"{'macro-F1':<16}" + "".join(f"{f'{n}/class':>10}" for n in seeds)]
    lines += [f"{m:<16}" + "".join(f"{v[n]:>10.3f}" for n in seeds) for m, v in curve.items()]
    return "\n".join(lines)


def overlap_spearman(report, truth: dict) -> float:
    """Spearman correlation between the estimated and the true overlap over all ordered pairs."""
    from scipy.stats import spearmanr

    index = {n: i for i, n in enumerate(report.names)}
    pairs = sorted(truth)
    est = [float(report.overlap[index[a], index[b]]) for a, b in pairs]
    return float(spearmanr([truth[p] for p in pairs], est).statistic)
