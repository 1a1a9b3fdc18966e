"""Few-shot data classification with SAE features, without training a head (Qwen-Scope, point 2).

Two classifiers over per-text features (``max_acts``: each feature's max activation over the text's tokens):

- ``kind="rule"``, Qwen-Scope's rule: a feature fires on a text if its max activation is > 0; features are
  ranked by P(fire | class) - P(fire | other classes); a class's rule is an OR over its top K. Multi-class is
  one-vs-rest: the predicted class is the one with the largest share of its rule weight firing. K is chosen
  per class in 1..10 by the rule's F1 on the seed set itself (smallest K on ties), unless given.
  Departure from the report: the report is binary; the weighted one-vs-rest vote is ours.
- ``kind="logistic"``: one-vs-rest L2 logistic regressions on standardised ``max_acts`` (scikit-learn).

A fitted classifier saves to one safetensors file (tensors + JSON metadata, never pickle) that records the
SAE it was fitted on; loading or predicting against another SAE raises ``ClassifierError``.

    clf = fit_classifier(model, tokenizer, sae, seed_texts, seed_labels)
    labels = clf.predict_texts(model, tokenizer, sae, new_texts)
    clf.save("topics.safetensors"); clf = FeatureClassifier.load("topics.safetensors", sae=sae)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .plots import pyplot, save_figure
from .sae.autoencoder import SparseAutoencoder
from .text_features import encode_texts, sae_fingerprint

FORMAT = "qscope-rl/classifier"
FORMAT_VERSION = "1"
KINDS = ("rule", "logistic")
MAX_RULE_K = 10  # Qwen-Scope keeps the top 1-10 features


class ClassifierError(ValueError):
    """A classifier file is missing or corrupt, or does not fit the SAE it is used with."""


def sae_info(sae: SparseAutoencoder) -> dict:
    """What identifies an SAE: recorded in a classifier and checked on load."""
    return {"source": str(sae.source or ""), "layer": sae.layer, "d_sae": sae.d_sae, "d_in": sae.d_in,
            "fingerprint": sae_fingerprint(sae)}


def macro_f1(true: Sequence, pred: Sequence, classes: Sequence | None = None) -> float:
    """Unweighted mean over classes of the per-class F1 (a class never predicted nor present counts 0)."""
    classes = sorted(set(true)) if classes is None else list(classes)
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(true, pred))
        fp = sum(t != c and p == c for t, p in zip(true, pred))
        fn = sum(t == c and p != c for t, p in zip(true, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _binary_f1(pred: Tensor, target: Tensor) -> Tensor:
    """F1 of each column of pred (n, m) bool against target (n,) bool -> (m,)."""
    tp = (pred & target[:, None]).sum(0).double()
    return 2 * tp / (pred.sum(0) + target.sum()).double().clamp(min=1)


@dataclass
class FeatureClassifier:
    """A fitted SAE-feature classifier; see the module docstring. Build it with ``fit`` or ``fit_classifier``."""

    kind: str
    classes: list[str]
    sae: dict  # sae_info of the SAE it was fitted on
    tensors: dict[str, Tensor] = field(default_factory=dict)
    # rule: ids_<c> (K,) feature ids, weights_<c> (K,) P(fire|c) - P(fire|rest)
    # logistic: coef (C, d_sae), intercept (C,), mean (d_sae,), scale (d_sae,)
    features: str = "max_acts"  # how its per-text input was pooled ("tail_mean:<n>": `qscope_rl.probe`)

    # -- fitting --------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, max_acts: Tensor, labels: Sequence[str], sae: SparseAutoencoder, kind: str = "rule", *,
            top_k: int | None = None, C: float = 1.0) -> FeatureClassifier:
        """Fit on per-text ``max_acts`` (n, d_sae) and their labels (at least two classes)."""
        if kind not in KINDS:
            raise ValueError(f"unknown classifier kind {kind!r}; expected one of {KINDS}")
        labels = [str(x) for x in labels]
        if max_acts.ndim != 2 or max_acts.shape[1] != sae.d_sae:
            raise ValueError(f"max_acts must be (n, d_sae={sae.d_sae}), got {tuple(max_acts.shape)}")
        if len(labels) != len(max_acts) or not labels:
            raise ValueError(f"need one label per text and at least one text: {len(max_acts)} texts, "
                             f"{len(labels)} labels")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"classification needs at least two classes, got {classes}")
        if top_k is not None and not 1 <= top_k <= sae.d_sae:
            raise ValueError(f"top_k must be in 1..{sae.d_sae}, got {top_k}")
        y = torch.tensor([classes.index(x) for x in labels])
        fit = cls._fit_rule if kind == "rule" else cls._fit_logistic
        return cls(kind, classes, sae_info(sae), fit(max_acts.float().cpu(), y, len(classes), top_k=top_k, C=C))

    @staticmethod
    def _fit_rule(max_acts: Tensor, y: Tensor, n_classes: int, *, top_k: int | None, **_) -> dict[str, Tensor]:
        fires = max_acts > 0
        tensors = {}
        for c in range(n_classes):
            pos = y == c
            score = fires[pos].double().mean(0) - fires[~pos].double().mean(0)  # P(fire|c) - P(fire|rest)
            order = torch.sort(score, descending=True, stable=True).indices
            order = order[score[order] > 0][:MAX_RULE_K if top_k is None else top_k]
            if len(order) == 0:  # nothing fires more on this class: keep the best feature anyway
                order = torch.sort(score, descending=True, stable=True).indices[:1]
            if top_k is None:  # K by the OR rule's F1 on the seeds (cumulative OR over the ranked features)
                f1 = _binary_f1(fires[:, order].cummax(1).values, pos)
                order = order[: int(torch.argmax(f1)) + 1]  # argmax returns the first (smallest K) maximum
            tensors[f"ids_{c}"] = order.long()
            tensors[f"weights_{c}"] = score[order].float().clamp(min=1e-6)
        return tensors

    @staticmethod
    def _fit_logistic(max_acts: Tensor, y: Tensor, n_classes: int, *, C: float, **_) -> dict[str, Tensor]:
        coef, intercept, mean, scale = fit_ovr_logistic(max_acts, y, n_classes, C=C)
        return {"coef": coef, "intercept": intercept, "mean": mean, "scale": scale}

    # -- predicting -----------------------------------------------------------------------------------

    def decision(self, max_acts: Tensor) -> Tensor:
        """Per-class scores (n, C); the prediction is their argmax. Rule: weighted share of the class's
        features that fire (> 0 means the class's OR rule fires); logistic: the one-vs-rest logits."""
        d_sae = self.sae["d_sae"]
        if max_acts.ndim != 2 or max_acts.shape[1] != d_sae:
            raise ValueError(f"max_acts must be (n, d_sae={d_sae}), got {tuple(max_acts.shape)}")
        x = max_acts.float().cpu()
        if self.kind == "logistic":
            return ((x - self.tensors["mean"]) / self.tensors["scale"]) @ self.tensors["coef"].T \
                + self.tensors["intercept"]
        scores = []
        for c in range(len(self.classes)):
            ids, w = self.tensors[f"ids_{c}"], self.tensors[f"weights_{c}"]
            fired = (x[:, ids] > 0).float() @ w / w.sum()
            # ties (same share firing) go to the class whose features fire harder; never flips a fire / no-fire
            strength = torch.tanh(x[:, ids] @ w / w.sum()) * 1e-3
            scores.append(fired + strength * (fired > 0))
        return torch.stack(scores, 1)

    def rule_fires(self, max_acts: Tensor) -> Tensor:
        """(n, C) bool: the binary Qwen-Scope OR rule of each class (rule classifiers only)."""
        if self.kind != "rule":
            raise ValueError("rule_fires is defined for kind='rule' classifiers")
        return self.decision(max_acts) > 0

    def predict(self, max_acts: Tensor) -> list[str]:
        return [self.classes[i] for i in self.decision(max_acts).argmax(1).tolist()]

    def rules(self) -> dict[str, list[tuple[int, float]]]:
        """Rule classifiers: per class, its OR features and their P(fire|c) - P(fire|rest), best first."""
        if self.kind != "rule":
            raise ValueError("rules() is defined for kind='rule' classifiers")
        return {c: list(zip(self.tensors[f"ids_{i}"].tolist(), self.tensors[f"weights_{i}"].tolist()))
                for i, c in enumerate(self.classes)}

    def check_sae(self, sae: SparseAutoencoder) -> None:
        """Raise ClassifierError naming every difference between the fitted-on SAE and ``sae``."""
        mine, theirs = self.sae, sae_info(sae)
        problems = [f"{key} {mine[key]!r} != {theirs[key]!r}" for key in ("d_sae", "d_in", "layer", "fingerprint")
                    if mine.get(key) is not None and theirs[key] is not None and mine[key] != theirs[key]]
        if problems:
            raise ClassifierError(f"this classifier was fitted on another SAE ({mine['source']!r}, layer "
                                  f"{mine['layer']}): classifier vs SAE {', '.join(problems)}")

    def predict_texts(self, model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], **kwargs) -> list[str]:
        """Encode ``texts`` with ``sae`` (checked to be the fitted-on SAE) and predict their classes."""
        self.check_sae(sae)
        if self.features != "max_acts":
            raise ClassifierError(f"this classifier reads {self.features!r} features, not per-text max_acts: "
                                  "score it with qscope_rl.probe.probe_scores")
        return self.predict(encode_texts(model, tokenizer, sae, texts, desc="classify: encode", **kwargs).max_acts)

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                "classes": json.dumps(self.classes, ensure_ascii=False), "sae": json.dumps(self.sae),
                "features": self.features}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, sae: SparseAutoencoder | None = None) -> FeatureClassifier:
        """Load a saved classifier; with ``sae``, check that it is the SAE the classifier was fitted on."""
        path = Path(path)
        if not path.is_file():
            raise ClassifierError(f"classifier file {path} does not exist")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for invalid files
            raise ClassifierError(f"{path} is not a safetensors classifier file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ClassifierError(f"{path} is not a qscope-rl classifier (metadata format={meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ClassifierError(f"{path} has version {meta.get('version')!r}; this qscope-rl reads "
                                  f"{FORMAT_VERSION}")
        clf = cls(meta["kind"], json.loads(meta["classes"]), json.loads(meta["sae"]), tensors,
                  meta.get("features", "max_acts"))
        if sae is not None:
            clf.check_sae(sae)
        return clf


def fit_ovr_logistic(x: Tensor, y: Tensor, n_classes: int, *, C: float = 1.0):
    """One-vs-rest L2 logistic regressions on standardised x: (coef (C, d), intercept (C,), mean, scale)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = ((x - mean) / scale).double().numpy()
    coef, intercept = [], []
    for c in range(n_classes):
        lr = LogisticRegression(C=C, max_iter=2000).fit(z, (y == c).numpy())
        coef.append(torch.from_numpy(lr.coef_[0]).float())
        intercept.append(float(lr.intercept_[0]))
    return torch.stack(coef), torch.tensor(intercept), mean.float(), scale.float()


def fit_classifier(model, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], labels: Sequence[str],
                   kind: str = "rule", *, top_k: int | None = None, C: float = 1.0, **encode_kwargs
                   ) -> FeatureClassifier:
    """Encode seed ``texts`` with the SAE and fit a ``FeatureClassifier`` of ``kind`` on their labels."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    feats = encode_texts(model, tokenizer, sae, texts, desc="classify: encode seeds", **encode_kwargs)
    return FeatureClassifier.fit(feats.max_acts, labels, sae, kind, top_k=top_k, C=C)


# -- measuring: macro-F1 against the number of seeds, beside the usual probing baselines --------------

METHODS = ("sae_rule", "sae_logistic", "dense_probe", "tfidf_logistic")


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
    import random

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    classes = sorted(set(train_labels))
    by_class = {c: [i for i, x in enumerate(train_labels) if x == c] for c in classes}
    short = {c: len(v) for c, v in by_class.items() if len(v) < max(seeds_per_class)}
    if short:
        raise ValueError(f"not enough training texts for {max(seeds_per_class)} seeds per class: {short}")
    results: dict[str, dict[int, list[float]]] = {m: {n: [] for n in seeds_per_class} for m in methods}
    rng = random.Random(seed)
    for n in seeds_per_class:
        for _ in range(repeats):
            idx = [i for c in classes for i in rng.sample(by_class[c], n)]
            labels = [train_labels[i] for i in idx]
            for method in methods:
                pred = _fit_predict(method, sae, train, train_texts, idx, labels, test, test_texts)
                results[method][n].append(macro_f1(test_labels, pred, classes))
    return {m: {n: sum(v) / len(v) for n, v in per_n.items()} for m, per_n in results.items()}


def _fit_predict(method, sae, train, train_texts, idx, labels, test, test_texts) -> list[str]:
    if method in ("sae_rule", "sae_logistic"):
        clf = FeatureClassifier.fit(train.max_acts[idx], labels, sae, "rule" if method == "sae_rule" else "logistic")
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


def plot_curve(curve: dict[str, dict[int, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Macro-F1 against seeds per class, one line per method, as a PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, per_n in curve.items():
        ax.plot(list(per_n), list(per_n.values()), marker="o", label=method)
    ax.set(xscale="log", xlabel="seeds per class", ylabel="macro-F1", ylim=(0, 1.02), title=title)
    ax.minorticks_off()  # log-scale minor labels would clutter the few seed counts
    ax.set_xticks(list(next(iter(curve.values()))), labels=[str(n) for n in next(iter(curve.values()))])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
