"""The demo world's task reward, in TRL's reward contract (reads the ``topic`` dataset column)."""

from __future__ import annotations

from pathlib import Path

from ._text import completion_text


class WorldTopicReward:
    """Distinct on-topic words (either language) per completion word, by the demo world's lexicon
    (`World.task_reward`).

    ``world`` is a built world's folder or a size (``"default"``, ``"test"``) to build or load from the cache.

    Example::

        WorldTopicReward("test")(completions=["..."], topic=["cooking"])
    """

    __name__ = "world_topic"

    def __init__(self, world: str | Path = "default", cache_dir: str | None = None):
        self.world, self.cache_dir = str(world), cache_dir
        self._world = None  # loaded on first call: the reward pickles as two strings

    def __getstate__(self):
        return {"world": self.world, "cache_dir": self.cache_dir, "_world": None}

    def _load(self):
        if self._world is None:
            from qscope_rl.world import World, load_world

            self._world = World(self.world) if Path(self.world).is_dir() else load_world(self.world, self.cache_dir)
        return self._world

    def __call__(self, completions, topic=None, **kwargs) -> list[float]:
        if topic is None:
            raise ValueError(f"{self.__name__} needs the dataset column 'topic' (the world's prompts have it)")
        world = self._load()
        return [world.task_reward(completion_text(c), t) for c, t in zip(completions, topic, strict=True)]
