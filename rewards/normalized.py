"""Per-reward running normalisation, opt-in: wrap one reward function, keep TRL's reward contract.

GRPO's advantages are centred per group, but rewards are summed with ``reward_weights`` before that: a reward
on a scale of 0.01 (an SAE penalty) next to one on a scale of 1 (a verifier) barely counts whatever its weight.
Normalising each reward by its own running statistics (mechreward's normalisation; TRL's ``scale_rewards``
normalises only the summed reward) makes the weights mean what they say.
"""

from __future__ import annotations

import inspect
import math
from collections import deque

from ._numbers import checked_number
from ._sync import gather_floats

METHODS = ("zscore", "rank")


def build_reward(reward, kwargs: dict | None = None):
    """A reward function as given, or built from its registry name / dotted path with ``kwargs``."""
    if isinstance(reward, str):
        from .registry import get_reward_func  # the registry lists this module's classes too

        return get_reward_func(reward, **(kwargs or {}))
    if kwargs:
        raise ValueError(f"settings {sorted(kwargs)} apply to a reward given by name, not to a built one")
    return reward


class NormalizedReward:
    """``reward`` normalised by the statistics of its last ``window`` values (the current batch included).

    - ``method="zscore"``: ``(r - mean) / (std + eps)``;
    - ``method="rank"``: the mid-rank percentile of ``r`` among those values, in [0, 1] (ties share a rank;
      robust to outliers and to the reward's scale).

    ``None`` rewards (TRL's "not applicable") pass through and are not counted. Under torch.distributed the
    values of every process are pooled, so every rank normalises alike. ``__name__`` is the wrapped reward's
    name plus the method (``sae_code_switch_zscore``), so TRL logs the normalised values under their own name;
    the raw batch mean is logged as ``<name>/raw_mean`` through TRL's ``log_metric``. The statistics live in
    the object: they start afresh when training resumes from a checkpoint.

    ``reward`` is a reward function, or a registry name / dotted path built with ``reward_kwargs`` (so a recipe
    can name it: ``reward_funcs: [normalized]``, ``reward_kwargs: {normalized: {reward: sae_code_switch,
    reward_kwargs: {feature_pack: zh.json}, method: rank}}``).

    Example::

        reward_funcs = [accuracy, NormalizedReward(SAECodeSwitchPenalty("zh.json"), method="rank")]
    """

    def __init__(self, reward, method: str = "zscore", window: int = 1024, eps: float = 1e-6,
                 name: str | None = None, reward_kwargs: dict | None = None):
        reward = build_reward(reward, reward_kwargs)
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {METHODS}")
        if window < 2:
            raise ValueError(f"window must be >= 2 values, got {window}")
        eps = checked_number("eps", eps, above=0.0)  # it divides by std + eps
        if not callable(reward):
            raise TypeError(f"reward must be a reward function, got {type(reward).__name__}")
        if inspect.iscoroutinefunction(reward) or inspect.iscoroutinefunction(type(reward).__call__):
            raise TypeError("NormalizedReward wraps synchronous reward functions; this one is async")
        self.reward, self.method, self.window, self.eps = reward, method, window, eps
        self.__name__ = name or f"{getattr(reward, '__name__', type(reward).__name__)}_{method}"
        self.history: deque[float] = deque(maxlen=window)
        # The SAE trainers check a reward's pack or probe against their SAE and track its features: pass them on.
        self.feature_pack = getattr(reward, "feature_pack", None)
        self.probe = getattr(reward, "probe", None)

    def __call__(self, completions, **kwargs) -> list[float | None]:
        raw = self.reward(completions=completions, **kwargs)
        if len(raw) != len(completions):
            raise ValueError(f"{self.__name__}: the wrapped reward returned {len(raw)} values for "
                             f"{len(completions)} completions")
        pooled, mine = gather_floats([math.nan if r is None else r for r in raw])
        present = [v for v in pooled if not math.isnan(v)]
        self.history.extend(present)
        if present and callable(kwargs.get("log_metric")):
            kwargs["log_metric"](f"{self.__name__}/raw_mean", sum(present) / len(present))
        return [None if math.isnan(v) else self.normalize(v) for v in pooled[mine]]

    def normalize(self, value: float) -> float:
        """``value`` under the current statistics (call after the batch was added to them)."""
        values = self.history
        if self.method == "rank":
            below = sum(1 for v in values if v < value)
            ties = sum(1 for v in values if v == value)
            return (below + 0.5 * ties) / len(values)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return (value - mean) / (std + self.eps)
