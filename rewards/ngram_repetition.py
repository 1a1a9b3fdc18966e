"""open-r1's n-gram repetition penalty (Yeo et al. 2025): ``max_penalty * (1 - unique / total n-grams)``."""

from __future__ import annotations

from qscope_rl.judges import ngram_repeat_ratio

from ._numbers import checked_number
from ._text import completion_text


class NgramRepetitionPenalty:
    """Penalty in [max_penalty, 0]: 0 for no repeated n-gram, max_penalty when every n-gram repeats.

    Words are the judges' units (Latin words, single Han characters), so Chinese is measured per character.

    Example::

        NgramRepetitionPenalty(n=2, max_penalty=-1.0)(completions=["a b a b a"])  # [-0.5]
    """

    __name__ = "ngram_repetition"

    def __init__(self, n: int = 3, max_penalty: float = -1.0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.max_penalty = n, checked_number("max_penalty", max_penalty, at_most=0.0)

    def __call__(self, completions, **kwargs) -> list[float]:
        return [self.max_penalty * ngram_repeat_ratio(completion_text(c), self.n) for c in completions]
