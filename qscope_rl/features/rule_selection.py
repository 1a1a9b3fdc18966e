"""Choose the Qwen-Scope OR rule's settings (top K, firing cut) by cross-validation on the seeds.

`FeatureClassifier.fit(kind="rule")` picks each class's K by the rule's F1 on the very seeds it ranked the
features on, and the firing cut is fixed by the caller: with 16 seeds a class both choices are fitted to the
seeds. ``select_rule`` (ours; the report fixes K in 1-10 and "fires" = max activation > 0) instead scores every
(cut, K) pair, ``threshold`` in {"zero", "seed"} x one K for all classes in 1..10, by the macro-F1 of the rule's
out-of-fold predictions over stratified folds of the seeds, then refits on all seeds with the best pair. Ties
go to the report's cut ("zero"), then to the smallest K. Only the seeds are used: held-out data never are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from qscope_rl.sae.autoencoder import SparseAutoencoder

from .classifier import MAX_RULE_K, THRESHOLDS, FeatureClassifier, macro_f1


def stratified_folds(labels: Sequence[str], folds: int, seed: int = 0) -> list[int]:
    """A fold id per text: each class's texts shuffled and dealt round robin, so every fold holds every class."""
    counts = {c: list(labels).count(c) for c in set(labels)}
    if folds < 2 or folds > min(counts.values()):
        raise ValueError(
            f"cross-validation needs 2 <= folds <= the smallest class's size "
            f"({min(counts.values())}: {counts}), got folds={folds}"
        )
    rng = random.Random(seed)
    fold = [0] * len(labels)
    for c in sorted(counts):
        idx = [i for i, x in enumerate(labels) if x == c]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            fold[i] = j % folds
    return fold


def truncated(clf: FeatureClassifier, k: int, max_acts: Tensor, labels: Sequence[str]) -> FeatureClassifier:
    """The rule keeping each class's best ``k`` features (the same ranking; fitting with top_k=k gives it),
    its no-fire fallback recomputed on the texts it was fitted on."""
    tensors = dict(clf.tensors)
    for c in range(len(clf.classes)):
        for name in ("ids", "weights", "thresholds"):
            tensors[f"{name}_{c}"] = clf.tensors[f"{name}_{c}"][:k]
    out = FeatureClassifier(clf.kind, clf.classes, clf.sae, tensors)
    y = torch.tensor([clf.classes.index(x) for x in labels])
    silent = ~out.rule_fires(max_acts).any(1)
    out.tensors["silent_share"] = torch.stack([silent[y == c].float().mean() for c in range(len(clf.classes))])
    return out


def select_rule(
    max_acts: Tensor,
    labels: Sequence[str],
    sae: SparseAutoencoder,
    *,
    folds: int = 4,
    seed: int = 0,
    ks: Sequence[int] = tuple(range(1, MAX_RULE_K + 1)),
    thresholds: Sequence[str] = THRESHOLDS,
) -> FeatureClassifier:
    """The OR rule refitted on all seeds with the (cut, K) of best cross-validated macro-F1 (module docstring).

    The returned classifier's ``selection`` holds the choice: ``threshold``, ``top_k``, ``cv_f1`` and ``grid``,
    {(threshold, K): cross-validated macro-F1}.
    """
    labels = [str(x) for x in labels]
    fold = stratified_folds(labels, folds, seed)
    classes = sorted(set(labels))
    x = max_acts.float().cpu()
    grid = {}
    for threshold in thresholds:
        pred = {k: [None] * len(labels) for k in ks}
        for f in range(folds):
            train = [i for i in range(len(labels)) if fold[i] != f]
            held = [i for i in range(len(labels)) if fold[i] == f]
            train_labels = [labels[i] for i in train]
            full = FeatureClassifier.fit(x[train], train_labels, sae, "rule", top_k=max(ks), threshold=threshold)
            for k in ks:
                for i, p in zip(held, truncated(full, k, x[train], train_labels).predict(x[held])):
                    pred[k][i] = p
        for k in ks:
            grid[(threshold, k)] = macro_f1(labels, pred[k], classes)
    order = {t: i for i, t in enumerate(("zero", "seed"))}
    best = max(grid, key=lambda key: (round(grid[key], 12), -order.get(key[0], 9), -key[1]))
    clf = FeatureClassifier.fit(x, labels, sae, "rule", top_k=best[1], threshold=best[0])
    clf.selection = {"threshold": best[0], "top_k": best[1], "cv_f1": grid[best], "grid": grid}
    return clf
