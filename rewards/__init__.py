"""Reward functions following TRL's contract ``(completions, **kwargs) -> list[float | None]``.

Baselines: `LanguageConsistencyReward` (DeepSeek-R1), `NgramRepetitionPenalty` (open-r1).
SAE-based, reading the ``sae_activations`` column the SAE trainers add: `SAECodeSwitchPenalty`,
`SAERepetitionPenalty`, `SAEProbePenalty`, `SAEFeatureReward`. The demo world's task: `WorldTopicReward`.
Judges to log failure rates at weight 0: `CodeSwitchJudge`, `LoopJudge`, `WorldSwitchJudge` (the world's ground
truth). Composition and guards: `NormalizedReward` (per-reward running z-score or rank, opt-in), `RewardHackingGuard`
(an SAE penalty watched against a judge). All are picklable classes with ``__name__``.
"""

from .hacking_guard import RewardHackingGuard
from .judge_monitors import CodeSwitchJudge, LoopJudge
from .language_consistency import LanguageConsistencyReward
from .ngram_repetition import NgramRepetitionPenalty
from .normalized import NormalizedReward
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
    "NormalizedReward",
    "RewardHackingGuard",
    "SAECodeSwitchPenalty",
    "SAEFeatureReward",
    "SAEProbePenalty",
    "SAERepetitionPenalty",
    "WorldSwitchJudge",
    "WorldTopicReward",
    "get_reward_func",
    "resolve_reward_func",
]
