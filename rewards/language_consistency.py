"""DeepSeek-R1's language-consistency reward: the share of completion words in the target language."""

from __future__ import annotations

from qscope_rl.judges import LANGUAGES, target_language_share

from ._text import completion_text


class LanguageConsistencyReward:
    """Reward = share of word units written in the target language (Unicode-script judge), in [0, 1].

    The target is fixed (``target="en"``) or read per example from a dataset column (default ``lang``).

    Example::

        reward = LanguageConsistencyReward(target="en")
        reward(completions=["all english", "mixed 中文"])  # [1.0, 0.5]
    """

    __name__ = "language_consistency"

    def __init__(self, target: str | None = None, language_column: str = "lang"):
        if target is not None and target not in LANGUAGES:
            raise ValueError(f"unknown target language {target!r}; expected one of {list(LANGUAGES)}")
        self.target, self.language_column = target, language_column

    def __call__(self, completions, **kwargs) -> list[float]:
        if self.target is not None:
            targets = [self.target] * len(completions)
        elif self.language_column in kwargs:
            targets = kwargs[self.language_column]
        else:
            raise ValueError(f"{self.__name__}: no target language: pass target= or give the dataset a "
                             f"{self.language_column!r} column")
        return [target_language_share(completion_text(c), t) for c, t in zip(completions, targets, strict=True)]
