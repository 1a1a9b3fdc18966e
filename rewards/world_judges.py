"""The demo world's ground-truth judges as weight-0 reward functions, to watch failures during training.

`WorldSwitchJudge` reads the world's lexicon (exact for every language pair, Spanish included, where the
script judge is blind); TRL logs its mean each step as ``rewards/judge_switch_<to>/mean``.
"""

from __future__ import annotations

from pathlib import Path

from ._text import completion_text


class WorldSwitchJudge:
    """1.0 when the completion uses another of the world's languages than its prompt's (or exactly `to`)."""

    def __init__(self, world: str | Path, to: str | None = None, language_column: str = "lang"):
        self.world, self.to, self.language_column = str(world), to, language_column
        self.__name__ = f"judge_switch_{to}" if to else "judge_switch"
        self._world = None

    def __getstate__(self):
        return {**self.__dict__, "_world": None}

    def __call__(self, completions, **kwargs) -> list[float]:
        if self.language_column not in kwargs:
            raise ValueError(f"{self.__name__} needs the dataset column {self.language_column!r}")
        if self._world is None:
            from qscope_rl.world import World

            self._world = World(self.world)
        return [float(self._world.code_switch(completion_text(c), lang, self.to))
                for c, lang in zip(completions, kwargs[self.language_column], strict=True)]
