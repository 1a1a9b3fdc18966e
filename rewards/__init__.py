"""Reward functions following TRL's contract ``(completions, **kwargs) -> list[float | None]``.

Baselines: `LanguageConsistencyReward` (DeepSeek-R1), `NgramRepetitionPenalty` (open-r1).
SAE-based, reading the ``sae_activations`` column the SAE trainers add: `SAECodeSwitchPenalty`,
`SAERepetitionPenalty`, `SAEProbePenalty`, `SAEFeatureReward`. The demo world's task: `WorldTopicReward`.
Judges to log failure rates at weight 0: `CodeSwitchJudge`, `LoopJudge`, `WorldSwitchJudge` (ground truth).
All are picklable classes with
``__name__``.
"""

from .judge_monitors import CodeSwitchJudge, LoopJudge
from .language_consistency import LanguageConsistencyReward
from .ngram_repetition import NgramRepetitionPenalty
from .registry import REWARD_FUNCS, get_reward_func, resolve_reward_func
from .sae_rewards import SAECodeSwitchPenalty, SAEFeatureReward, SAEProbePenalty, SAERepetitionPenalty
from .world_judges import WorldSwitchJudge
from .world_topic import WorldTopicReward

__all__ = [
    "REWARD_FUNCS",
    "CodeSwitchJudge",
    "LoopJudge",
    "LanguageConsistencyReward",
    "NgramRepetitionPenalty",
    "SAECodeSwitchPenalty",
    "SAEFeatureReward",
    "SAEProbePenalty",
    "SAERepetitionPenalty",
    "WorldSwitchJudge",
    "WorldTopicReward",
    "get_reward_func",
    "resolve_reward_func",
]
