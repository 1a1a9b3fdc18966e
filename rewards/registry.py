"""Reward functions by name: a plain dict, with a dotted-import-path fallback for your own."""

from __future__ import annotations

from qscope_rl.registry import resolve

from .hacking_guard import RewardHackingGuard
from .judge_monitors import CodeSwitchJudge, LoopJudge
from .language_consistency import LanguageConsistencyReward
from .ngram_repetition import NgramRepetitionPenalty
from .normalized import NormalizedReward
from .sae_rewards import SAECodeSwitchPenalty, SAEFeatureReward, SAEProbePenalty, SAERepetitionPenalty
from .world_topic import WorldTopicReward

REWARD_FUNCS = {
    "language_consistency": LanguageConsistencyReward,
    "ngram_repetition": NgramRepetitionPenalty,
    "sae_code_switch": SAECodeSwitchPenalty,
    "sae_repetition": SAERepetitionPenalty,
    "sae_feature": SAEFeatureReward,
    "sae_probe": SAEProbePenalty,
    "world_topic": WorldTopicReward,
    "judge_code_switch": CodeSwitchJudge,
    "judge_loop": LoopJudge,
    "normalized": NormalizedReward,
    "reward_hacking_guard": RewardHackingGuard,
}


def resolve_reward_func(name: str):
    """The class or function a reward name stands for (registry name or dotted path), not yet built."""
    return resolve(name, REWARD_FUNCS, "reward")


def get_reward_func(name: str, **kwargs):
    """Build a reward by registry name (``"ngram_repetition"``) or dotted path (``"my_pkg.rewards:MyReward"``
    or ``"my_pkg.rewards.my_function"``). Classes are instantiated with ``kwargs``; functions are returned."""
    obj = resolve_reward_func(name)
    if isinstance(obj, type):
        return obj(**kwargs)
    if kwargs:
        raise ValueError(f"reward {name!r} is a function: it takes no settings, got {sorted(kwargs)}")
    return obj
