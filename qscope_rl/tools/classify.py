"""Few-shot data classification from a small seed set with SAE features (Qwen-Scope, point 2).

`fit_classifier` encodes seed texts and fits a `FeatureClassifier` (the rule or the logistic kind, see
`qscope_rl.features.classifier`); `few_shot_curve` measures macro-F1 against the number of seeds beside the
usual probing baselines, `discovery_share_curve` the F1 kept when the rule sees only a share of the discovery
data (Qwen-Scope: 10% of it recovers about 99% of the F1), and `plot_curve` draws either.

    clf = fit_classifier(model, tokenizer, sae, seed_texts, seed_labels)
    labels = clf.predict_texts(model, tokenizer, sae, new_texts)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from qscope_rl.features.classifier import ClassifierError, FeatureClassifier, fit_ovr_logistic, macro_f1
from qscope_rl.features.rule_selection import select_rule
from qscope_rl.features.text_features import encode_texts
from qscope_rl.plots import pyplot, save_figure
from qscope_rl.sae.autoencoder import SparseAutoencoder

__all__ = ["METHODS", "ClassifierError", "FeatureClassifier", "discovery_share_curve", "few_shot_curve",
           "fit_classifier", "macro_f1", "plot_curve"]


def fit_classifier(model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], labels: Sequence[str],
                   kind: str = "rule", *, top_k: int | None = None, C: float = 1.0, threshold: str = "zero",
                   **encode_kwargs) -> FeatureClassifier:
    """Encode seed ``texts`` with the SAE and fit a ``FeatureClassifier`` of ``kind`` on their labels."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    feats = encode_texts(model, tokenizer, sae, texts, desc="classify: encode seeds", **encode_kwargs)
    return FeatureClassifier.fit(feats.max_acts, labels, sae, kind, top_k=top_k, C=C, threshold=threshold)


# -- measuring: macro-F1 against the number of seeds, beside the usual probing baselines --------------

# sae_rule: the Qwen-Scope rule as reported (fires = max activation > 0); sae_rule_seed_threshold: the same OR
# rule with each feature's firing cut chosen on the seeds (ours, see qscope_rl.features.classifier);
# sae_rule_cv: the rule with its cut and K chosen by cross-validation on the seeds (ours, features.rule_selection)
METHODS = ("sae_rule", "sae_rule_seed_threshold", "sae_rule_cv", "sae_logistic", "dense_probe", "tfidf_logistic")
CV_FOLDS = 4


def few_shot_curve(sae: SparseAutoencoder, train, train_texts: Sequence[str], train_labels: Sequence[str],
                   test, test_texts: Sequence[str], test_labels: Sequence[str], *,
                   seeds_per_class: Sequence[int] = (4, 16, 64), repeats: int = 3, seed: int = 0,
                   methods: Sequence[str] = METHODS) -> dict[str, dict[int, float]]:
    """Macro-F1 on the test texts of each method fitted on n seeds per class, mean over ``repeats`` draws.

    ``train`` / ``test`` are the ``TextFeatures`` of the texts. Baselines (landscape.md: report them beside
    any SAE probe): a dense linear probe (the same one-vs-rest logistic regression on the mean residual at
    the SAE's layer) and TF-IDF (character 1-3-grams within words, as the Chinese texts have no spaces)
    + logistic regression. Every method sees the same seed draws.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    classes, by_class = _by_class(train_labels)
    short = {c: len(v) for c, v in by_class.items() if len(v) < max(seeds_per_class)}
    if short:
        raise ValueError(f"not enough training texts for {max(seeds_per_class)} seeds per class: {short}")
    return _curve(sae, train, train_texts, train_labels, test, test_texts, test_labels, methods, repeats, seed,
                  {n: dict.fromkeys(classes, n) for n in seeds_per_class})


def discovery_share_curve(sae: SparseAutoencoder, train, train_texts: Sequence[str], train_labels: Sequence[str],
                          test, test_texts: Sequence[str], test_labels: Sequence[str], *,
                          shares: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0), repeats: int = 3, seed: int = 0,
                          methods: Sequence[str] = ("sae_rule",)) -> dict[str, dict[float, float]]:
    """Macro-F1 when each method sees only a share of the discovery data (the training texts), stratified by
    class (at least one text per class), mean over ``repeats`` draws; share 1.0 is the whole pool."""
    bad = [s for s in shares if not 0 < s <= 1]
    if bad:
        raise ValueError(f"shares must be in (0, 1], got {bad}")
    _, by_class = _by_class(train_labels)
    plan = {s: {c: max(1, round(s * len(v))) for c, v in by_class.items()} for s in shares}
    return _curve(sae, train, train_texts, train_labels, test, test_texts, test_labels, methods, repeats, seed, plan)


def _by_class(labels: Sequence[str]) -> tuple[list[str], dict[str, list[int]]]:
    classes = sorted(set(labels))
    return classes, {c: [i for i, x in enumerate(labels) if x == c] for c in classes}


def _curve(sae, train, train_texts, train_labels, test, test_texts, test_labels, methods, repeats, seed, plan):
    """{method: {point: mean macro-F1}}; ``plan`` maps each point to the texts per class to draw there."""
    import random

    classes, by_class = _by_class(train_labels)
    results: dict[str, dict] = {m: {point: [] for point in plan} for m in methods}
    rng = random.Random(seed)
    for point, per_class in plan.items():
        for _ in range(repeats if any(n < len(by_class[c]) for c, n in per_class.items()) else 1):
            idx = [i for c in classes for i in rng.sample(by_class[c], per_class[c])]
            labels = [train_labels[i] for i in idx]
            for method in methods:
                pred = _fit_predict(method, sae, train, train_texts, idx, labels, test, test_texts)
                results[method][point].append(macro_f1(test_labels, pred, classes))
    return {m: {p: sum(v) / len(v) for p, v in per.items()} for m, per in results.items()}


def _fit_predict(method, sae, train, train_texts, idx, labels, test, test_texts) -> list[str]:
    if method == "sae_rule_cv":
        folds = min(CV_FOLDS, min(labels.count(c) for c in set(labels)))
        return select_rule(train.max_acts[idx], labels, sae, folds=folds).predict(test.max_acts)
    if method.startswith("sae_"):
        kind = "logistic" if method == "sae_logistic" else "rule"
        threshold = "seed" if method == "sae_rule_seed_threshold" else "zero"
        clf = FeatureClassifier.fit(train.max_acts[idx], labels, sae, kind, threshold=threshold)
        return clf.predict(test.max_acts)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(x) for x in labels])
    if method == "dense_probe":
        coef, intercept, mean, scale = fit_ovr_logistic(train.mean_hidden[idx].float(), y, len(classes))
        scores = ((test.mean_hidden.float() - mean) / scale) @ coef.T + intercept
        return [classes[i] for i in scores.argmax(1).tolist()]
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    # the usual TF-IDF baseline: sparse, unscaled features, one-vs-rest like the other methods
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    x = vec.fit_transform([train_texts[i] for i in idx])
    x_test = vec.transform(list(test_texts))
    scores = torch.stack([torch.from_numpy(LogisticRegression(max_iter=2000).fit(x, (y == c).numpy())
                                           .decision_function(x_test)) for c in range(len(classes))], 1)
    return [classes[i] for i in scores.argmax(1).tolist()]


def plot_curve(curve: dict[str, dict[int, float]], path: str | os.PathLike, title: str = "",
               xlabel: str = "seeds per class") -> Path:
    """Macro-F1 against seeds per class (or share of the discovery data), one line per method, as a PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, per_n in curve.items():
        ax.plot(list(per_n), list(per_n.values()), marker="o", label=method)
    ax.set(xscale="log", xlabel=xlabel, ylabel="macro-F1", ylim=(0, 1.02), title=title)
    ax.minorticks_off()  # log-scale minor labels would clutter the few seed counts
    ax.set_xticks(list(next(iter(curve.values()))), labels=[str(n) for n in next(iter(curve.values()))])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
