"""A built world, loaded from its cache folder: model, tokenizer, SAE, corpus, prompts, task reward."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from .corpus import LANGS, CorpusSpec, Document, Lexicon
from .lexicon_judge import LexiconJudge
from .model import sample as _sample
from .task import Prompt, concept_map, topic_reward, topic_word_share

SPLITS = ("train", "heldout")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class World:
    """The embedded demo world (see `qscope_rl.world.build` for how it is made and what it reproduces).

    The model and tokenizer load lazily with `from_pretrained` (never `trust_remote_code`); the SAE
    is the Qwen-Scope folder `sae_dir` holding `layer{layer}.sae.pt`.
    """

    def __init__(self, path: str | Path, lexicon: Lexicon | None = None):
        self.path = Path(path)
        self.model_dir = self.path / "model"
        self._lexicon = lexicon

    @cached_property
    def recipe(self) -> dict:
        return json.loads((self.path / "recipe.json").read_text())

    @cached_property
    def stats(self) -> dict:
        return json.loads((self.path / "stats.json").read_text())

    @cached_property
    def corpus_spec(self) -> CorpusSpec:
        """How the world's corpus was generated (from recipe.json): new documents can follow it."""
        fields = self.recipe["corpus"]
        return CorpusSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @property
    def seed(self) -> int:
        return int(self.recipe.get("seed", 0))

    @cached_property
    def lexicon(self) -> Lexicon:
        if self._lexicon is None:
            text = (self.path / "lexicon.json").read_text(encoding="utf-8")
            self._lexicon = Lexicon.from_dict(json.loads(text))
        return self._lexicon

    @cached_property
    def model(self) -> Qwen3ForCausalLM:
        return Qwen3ForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        tok = PreTrainedTokenizerFast.from_pretrained(self.model_dir)
        tok.padding_side = "left"
        return tok

    @property
    def sae_dir(self) -> Path:
        return self.path / self.stats["sae_folder"]

    @property
    def temperature(self) -> float:
        """The world's decoding temperature (its recipe's `eval.temperature`; 1.0 for worlds built before it)."""
        return float(self.recipe.get("eval", {}).get("temperature", 1.0))

    @property
    def layer(self) -> int:
        return int(self.stats["layer"])

    @property
    def k(self) -> int:
        return int(self.stats["k"])

    @property
    def d_sae(self) -> int:
        return int(self.stats["d_sae"])

    @property
    def topics(self) -> list[str]:
        return list(self.lexicon.topics)

    @property
    def topic_vocab(self) -> dict[str, dict[str, list[str]]]:
        return self.lexicon.topic_vocab

    def documents(self, split: str = "train") -> list[Document]:
        self._check_split(split)
        return [Document.from_dict(d) for d in _read_jsonl(self.path / "corpus" / f"{split}.jsonl")]

    def prompts(self, split: str = "train", lang: str | None = None) -> list[Prompt]:
        self._check_split(split)
        rows = _read_jsonl(self.path / "corpus" / f"prompts_{split}.jsonl")
        return [Prompt(**r) for r in rows if lang is None or r["lang"] == lang]

    def task_reward(self, completion: str, topic: str) -> float:
        """The RL task's reward: distinct concepts of topic `topic` (in any language, each once) per word of the
        completion's answer sentence (see `qscope_rl.world.task`)."""
        return topic_reward(completion, self._topic_concepts[topic], self._zh_words)

    @cached_property
    def judge(self) -> LexiconJudge:
        """The ground-truth language judge (the world's lexicon): exact where script and lingua are not."""
        return LexiconJudge({lang: self.lexicon.words(lang) for lang in LANGS})

    def code_switch(self, text: str, lang: str, to: str | None = None) -> bool:
        """Ground truth: does `text`, meant to be in `lang`, use another of the world's languages (or `to`)?"""
        return self.judge.code_switch(text, lang, to)

    def topic_share(self, text: str, topic: str, lang: str) -> float:
        """Share of the text's words in topic `topic`'s vocabulary in `lang`: the world's topic judge."""
        return topic_word_share(text, self._topic_sets[topic][lang], self._zh_words)

    def sample(
        self,
        prompts: list[str],
        max_new_tokens: int = 48,
        temperature: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> list[str]:
        """Completions (only) of `prompts`, by batched HF generate with left padding, at `temperature` (default:
        the world's decoding temperature)."""
        temperature = self.temperature if temperature is None else temperature
        return _sample(self.model, self.tokenizer, prompts, max_new_tokens, temperature, seed, batch_size)

    @cached_property
    def _topic_sets(self) -> dict[str, dict[str, set[str]]]:
        return {t: {lang: set(words) for lang, words in v.items()} for t, v in self.topic_vocab.items()}

    @cached_property
    def _topic_concepts(self) -> dict[str, dict[str, int]]:
        return {t: concept_map(by_lang) for t, by_lang in self.topic_vocab.items()}

    @cached_property
    def _zh_words(self) -> set[str]:
        return self.lexicon.words("zh")

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {list(SPLITS)}")

    def __repr__(self) -> str:
        return f"World({str(self.path)!r})"
