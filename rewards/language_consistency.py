"""DeepSeek-R1's language-consistency reward: the share of completion words in the target language."""

from __future__ import annotations

from qscope_rl.judges import LANGUAGES, lingua_target_share, target_language_share

from ._text import completion_text

JUDGES = {"script": target_language_share, "lingua": lingua_target_share}


class LanguageConsistencyReward:
    """Reward = share of word units written in the target language, in [0, 1].

    ``judge="script"`` (default) tells languages apart by Unicode script: exact for English vs Chinese, blind
    to English vs Spanish. ``judge="lingua"`` asks lingua's mixed-language detector, as people do where the
    script is shared; it is fallible (it guesses from character statistics). The target is fixed
    (``target="en"``) or read per example from a dataset column (default ``lang``).

    Example::

        reward = LanguageConsistencyReward(target="en")
        reward(completions=["all english", "mixed 中文"])  # [1.0, 0.5]
        LanguageConsistencyReward(target="en", judge="lingua")  # also sees Spanish in English text
    """

    __name__ = "language_consistency"

    def __init__(self, target: str | None = None, language_column: str = "lang", judge: str = "script"):
        if target is not None and target not in LANGUAGES:
            raise ValueError(f"unknown target language {target!r}; expected one of {list(LANGUAGES)}")
        if judge not in JUDGES:
            raise ValueError(f"unknown judge {judge!r}; expected one of {list(JUDGES)}")
        self.target, self.language_column, self.judge = target, language_column, judge
        if judge != "script":  # TRL logs rewards by name: two judges side by side need two names
            self.__name__ = f"language_consistency_{judge}"

    def __call__(self, completions, **kwargs) -> list[float]:
        if self.target is not None:
            targets = [self.target] * len(completions)
        elif self.language_column in kwargs:
            targets = kwargs[self.language_column]
        else:
            raise ValueError(f"{self.__name__}: no target language: pass target= or give the dataset a "
                             f"{self.language_column!r} column")
        share = JUDGES[self.judge]
        return [share(completion_text(c), t) for c, t in zip(completions, targets, strict=True)]
