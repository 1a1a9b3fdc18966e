"""`FeatureClassifier`: a classifier over per-text SAE features, without a trained head (Qwen-Scope, point 2).

It lives in the features wing because the completion probe (`probe.py`) saves one; fitting it on seed texts
and measuring it are the classify tool's (`qscope_rl.tools.classify`).

Two classifiers over per-text features (``max_acts``: each feature's max activation over the text's tokens):

- ``kind="rule"``, Qwen-Scope's rule: a feature fires on a text if its max activation is > 0; features are
  ranked by P(fire | class) - P(fire | other classes); a class's rule is an OR over its top K. Multi-class is
  one-vs-rest: the predicted class is the one with the largest share of its rule weight firing; a text on which
  no class's rule fires goes to the class whose seeds most often fire no rule (for two classes this is the
  report's binary rule: "not firing" means the other class). K is chosen per class in 1..10 by the rule's F1
  on the seed set itself (smallest K on ties), unless given.
  Departure from the report: the report is binary; the weighted one-vs-rest vote is ours.
  ``threshold="seed"`` (ours, off by default) replaces "fires = max activation > 0" by "max activation > t_j",
  t_j chosen per feature on the seeds to maximise P(fire | class) - P(fire | rest) (a one-feature stump,
  t_j >= 0): a small SAE whose features fire weakly on most texts keeps the rule's shape, an OR over K
  features with no trained head, but a feature then only "fires" when it fires as it does on the class.
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

from qscope_rl.sae.autoencoder import SparseAutoencoder

from .text_features import encode_texts, sae_fingerprint

FORMAT = "qscope-rl/classifier"
FORMAT_VERSION = "1"
KINDS = ("rule", "logistic")
THRESHOLDS = ("zero", "seed")
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
    # rule: ids_<c> (K,) feature ids, weights_<c> (K,) P(fire|c) - P(fire|rest), thresholds_<c> (K,) (0: > 0)
    # logistic: coef (C, d_sae), intercept (C,), mean (d_sae,), scale (d_sae,)
    features: str = "max_acts"  # how its per-text input was pooled ("tail_mean:<n>": `qscope_rl.features.probe`)
    selection: dict = field(default_factory=dict, repr=False)  # how `rule_selection.select_rule` chose it; not saved

    # -- fitting --------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, max_acts: Tensor, labels: Sequence[str], sae: SparseAutoencoder, kind: str = "rule", *,
            top_k: int | None = None, C: float = 1.0, threshold: str = "zero") -> FeatureClassifier:
        """Fit on per-text ``max_acts`` (n, d_sae) and their labels (at least two classes)."""
        if kind not in KINDS:
            raise ValueError(f"unknown classifier kind {kind!r}; expected one of {KINDS}")
        if threshold not in THRESHOLDS:
            raise ValueError(f"unknown rule threshold {threshold!r}; expected one of {THRESHOLDS}")
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
        clf = cls(kind, classes, sae_info(sae), fit(max_acts.float().cpu(), y, len(classes), top_k=top_k, C=C,
                                                    threshold=threshold))
        if kind == "rule":  # per class: share of its seeds on which no rule fires (the no-fire fallback)
            silent = ~clf.rule_fires(max_acts).any(1)
            clf.tensors["silent_share"] = torch.stack([silent[y == c].float().mean() for c in range(len(classes))])
        return clf

    @staticmethod
    def _fit_rule(max_acts: Tensor, y: Tensor, n_classes: int, *, top_k: int | None, threshold: str = "zero",
                  **_) -> dict[str, Tensor]:
        tensors = {}
        for c in range(n_classes):
            pos = y == c
            cut = seed_thresholds(max_acts, pos) if threshold == "seed" else torch.zeros(max_acts.shape[1])
            fires = max_acts > cut
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
            tensors[f"thresholds_{c}"] = cut[order].float()
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
            cut = self.tensors.get(f"thresholds_{c}", torch.zeros(len(ids)))  # files without them: > 0
            fired = (x[:, ids] > cut).float() @ w / w.sum()
            # ties (same share firing) go to the class whose features fire harder; never flips a fire / no-fire
            strength = torch.tanh(x[:, ids] @ w / w.sum()) * 1e-3
            scores.append(fired + strength * (fired > 0))
        scores = torch.stack(scores, 1)
        silent = (scores <= 0).all(1)  # no rule fires: the fallback, kept below 0 so that rule_fires stays False
        fallback = self.tensors.get("silent_share", torch.zeros(len(self.classes)))
        return torch.where(silent[:, None], fallback - 2, scores)

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
                                  "score it with qscope_rl.features.probe.probe_scores")
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


def seed_thresholds(max_acts: Tensor, pos: Tensor) -> Tensor:
    """(d_sae,) per feature, the cut t >= 0 maximising P(x > t | pos) - P(x > t | rest) on these texts.

    Every cut between two consecutive distinct values is tried (sorting each column once); the cut is placed
    halfway between them, and t = 0 (the report's "fires") when nothing better separates the classes.
    """
    x = max_acts.float()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.zeros(x.shape[1])
    values, order = x.sort(0, descending=True)  # (n, d)
    is_pos = pos[order].double()
    gain = is_pos.cumsum(0) / n_pos - (1 - is_pos).cumsum(0) / n_neg  # cut just below row i
    below = torch.cat([values[1:], torch.zeros(1, x.shape[1])])  # the next value down (0 below the last)
    valid = (values > below) & (values > 0)  # a cut between distinct values, above zero
    gain = torch.where(valid, gain, torch.full_like(gain, -torch.inf))
    best = gain.argmax(0)  # first (highest) cut on ties
    cols = torch.arange(x.shape[1])
    zero_gain = (x[pos] > 0).double().mean(0) - (x[~pos] > 0).double().mean(0)
    cut = (values[best, cols] + below[best, cols]) / 2
    better = gain[best, cols] > zero_gain + 1e-12
    return torch.where(better, cut, torch.zeros_like(cut)).clamp(min=0)


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
