"""The independent judges as reward functions, to watch failure rates during training.

Give them weight 0 (``reward_weights``): they change nothing, and TRL still logs their mean every step as
``rewards/judge_code_switch/mean`` and ``rewards/judge_loop/mean``, the judged rates on the policy's own rollouts.
"""

from __future__ import annotations

from qscope_rl.judges import LANGUAGES, has_loop, script_code_switch

from ._text import completion_text


class CodeSwitchJudge:
    """1.0 when the completion leaves its target language (Unicode-script judge), else 0.0."""

    __name__ = "judge_code_switch"

    def __init__(self, target: str | None = None, language_column: str = "lang"):
        if target is not None and target not in LANGUAGES:
            raise ValueError(f"unknown target language {target!r}; expected one of {list(LANGUAGES)}")
        self.target, self.language_column = target, language_column

    def __call__(self, completions, **kwargs) -> list[float]:
        targets = kwargs.get(self.language_column) if self.target is None else [self.target] * len(completions)
        if targets is None:
            raise ValueError(f"{self.__name__}: no target language: pass target= or give the dataset a "
                             f"{self.language_column!r} column")
        return [float(script_code_switch(completion_text(c), t)) for c, t in zip(completions, targets, strict=True)]


class LoopJudge:
    """1.0 when the completion ends in a loop (a span repeated 3+ times at the end), else 0.0."""

    __name__ = "judge_loop"

    def __init__(self, min_repeats: int = 3, min_units: int = 3):
        self.min_repeats, self.min_units = min_repeats, min_units

    def __call__(self, completions, **kwargs) -> list[float]:
        return [float(has_loop(completion_text(c), self.min_repeats, self.min_units)) for c in completions]
