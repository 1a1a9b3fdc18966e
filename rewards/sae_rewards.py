"""Rewards from SAE features of the rollouts, computed from the ``sae_activations`` column that the SAE
trainers add to every reward call (one `CompletionActivations` per completion, aligned to its tokens).

Write your own by reading the same column::

    def my_reward(completions, sae_activations, **kwargs):
        return [float(acts.values.sum()) for acts in sae_activations]
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

from qscope_rl.features.classifier import FeatureClassifier
from qscope_rl.features.detection import code_switch_scores, repetition_scores
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.features.probe import completion_probe_tail, probe_scores

from ._numbers import checked_number


def _activations(kwargs, name: str):
    """Each completion's activations, refusing non-finite ones: TRL sums rewards with nansum, so a NaN reward
    would vanish from the sum without a word."""
    if "sae_activations" not in kwargs:
        raise ValueError(f"{name} needs the `sae_activations` column, which SAEGRPOTrainer / SAERLOOTrainer add "
                         f"when `sae_source` is set")
    for i, acts in enumerate(kwargs["sae_activations"]):
        if not bool(torch.isfinite(acts.values).all()) or (acts.pre is not None
                                                          and not bool(torch.isfinite(acts.pre).all())):
            raise ValueError(f"{name}: the SAE activations of completion {i} hold NaN or infinite values: the "
                             "residual stream at the SAE's layer overflowed or diverged (check the model's dtype "
                             "and its loss); a reward read from them would be NaN, which TRL drops silently")
        yield acts


def _pack(pack: FeaturePack | str) -> FeaturePack:
    return pack if isinstance(pack, FeaturePack) else FeaturePack.load(pack)


class SAECodeSwitchPenalty:
    """``-weight * max_t ReLU(s_t - threshold)``, s_t = the summed activation of the unwanted language's
    features on completion token t (`code_switch_scores`).

    ``threshold``: per-token evidence that clean text in the wanted language reaches costs nothing, so the
    penalty adds no noise to clean rollouts; calibrate it with `qscope_rl.features.detection.calibrate_threshold`.
    ``use_pre=True`` scores the features' pre-activations, which rise one token before the switch.

    Example::

        SAECodeSwitchPenalty("packs/zh.json", weight=1.0)   # penalise Chinese in English rollouts
    """

    __name__ = "sae_code_switch"

    def __init__(self, feature_pack: FeaturePack | str, weight: float = 1.0, use_pre: bool = False,
                 threshold: float = 0.0):
        self.feature_pack = _pack(feature_pack)
        self.weight, self.use_pre = checked_number("weight", weight, at_least=0.0), use_pre
        self.threshold = checked_number("threshold", threshold)

    def __call__(self, completions, **kwargs) -> list[float]:
        rewards = []
        for acts in _activations(kwargs, self.__name__):
            scores = code_switch_scores(acts, self.feature_pack, use_pre=self.use_pre, threshold=self.threshold)
            excess = (scores.per_token[0] - self.threshold).clamp(min=0).masked_fill(~acts.mask[0], 0.0)
            rewards.append(-self.weight * float(excess.max()) if excess.numel() else 0.0)
        return rewards


class SAERepetitionPenalty:
    """``-weight * score``, score = the per-completion repetition score of a repetition feature pack.

    Qwen-Scope does NOT penalise repetition features directly (they also fire on benign repetition); this
    reward is here to compare against amplified sampling, as the demo's arms do.
    """

    __name__ = "sae_repetition"

    def __init__(self, feature_pack: FeaturePack | str, weight: float = 1.0):
        self.feature_pack = _pack(feature_pack)
        self.weight = checked_number("weight", weight, at_least=0.0)

    def __call__(self, completions, **kwargs) -> list[float]:
        return [-self.weight * float(repetition_scores(acts, self.feature_pack).per_completion[0])
                for acts in _activations(kwargs, self.__name__)]


class SAEProbePenalty:
    """``-weight * P(failure)``: the sigmoid of a completion probe's logit (`qscope_rl.features.probe`).

    For failures a feature pack separates poorly, such as loops on the demo world; the probe is fitted once on
    labelled texts (``fit_completion_probe``) and saved. The SAE trainers check at construction that it was
    fitted on their SAE.

    Example::

        SAEProbePenalty("loop_probe.safetensors", weight=1.0)
    """

    __name__ = "sae_probe"

    def __init__(self, probe: FeatureClassifier | str, weight: float = 1.0):
        self.probe = probe if isinstance(probe, FeatureClassifier) else FeatureClassifier.load(probe)
        completion_probe_tail(self.probe)  # a max_acts classifier is refused here, not at the first reward call
        self.weight = checked_number("weight", weight, at_least=0.0)

    def __call__(self, completions, **kwargs) -> list[float]:
        return [-self.weight * float(probe_scores(acts, self.probe).sigmoid()[0])
                for acts in _activations(kwargs, self.__name__)]


class SAEFeatureReward:
    """``sum_j w_j * reduce_t a_j(t)`` over completion tokens t: a generic weighted feature reward.

    ``features`` maps feature id to weight (negative weights penalise); ``reduce`` is "mean" or "max".

    Example::

        SAEFeatureReward({1234: 1.0, 99: -0.5}, reduce="max")
    """

    __name__ = "sae_feature"

    def __init__(self, features: Mapping[int, float], reduce: str = "mean"):
        if not features:
            raise ValueError("SAEFeatureReward needs at least one feature weight")
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        odd = [i for i in features if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if odd:
            raise ValueError(f"feature ids must be integers, got {odd[:10]}")
        self.ids = torch.tensor([int(i) for i in features])
        self.weights = torch.tensor([checked_number(f"the weight of feature {i}", w) for i, w in features.items()])
        self.reduce = reduce

    def __call__(self, completions, **kwargs) -> list[float]:
        rewards = []
        for acts in _activations(kwargs, self.__name__):
            per_token = acts.completion(0).features(self.ids)  # (T, f)
            if per_token.shape[0] == 0:
                rewards.append(0.0)
                continue
            pooled = per_token.mean(0) if self.reduce == "mean" else per_token.max(0).values
            rewards.append(float((pooled.cpu() * self.weights).sum()))
        return rewards
