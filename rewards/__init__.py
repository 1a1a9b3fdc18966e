"""Reward functions following TRL's contract ``(completions, **kwargs) -> list[float | None]``.

Baselines: `LanguageConsistencyReward` (DeepSeek-R1), `NgramRepetitionPenalty` (open-r1).
SAE-based, reading the ``sae_activations`` column the SAE trainers add: `SAECodeSwitchPenalty`,
`SAERepetitionPenalty`, `SAEFeatureReward`. All are picklable classes with ``__name__``.
"""

from .language_consistency import LanguageConsistencyReward
from .ngram_repetition import NgramRepetitionPenalty
from .registry import REWARD_FUNCS, get_reward_func
from .sae_rewards import SAECodeSwitchPenalty, SAEFeatureReward, SAERepetitionPenalty

__all__ = [
    "REWARD_FUNCS",
    "LanguageConsistencyReward",
    "NgramRepetitionPenalty",
    "SAECodeSwitchPenalty",
    "SAEFeatureReward",
    "SAERepetitionPenalty",
    "get_reward_func",
]
