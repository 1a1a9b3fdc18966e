"""The world's verifiable RL task: "continue on topic T".

A prompt is a clean document opening (one sentence) about topic T in one language. The reward is
the number of DISTINCT words of topic T's vocabulary per word of the completion, judged by the world's
ground truth (the lexicon), so it needs no model. Like a math verifier it is blind to language: a topic
word counts in either language, so the task never asks for one language (nor did DeepSeek-R1-Zero's accuracy
reward, under which language mixing appeared). A loop that repeats the same
topic words says nothing new and earns nothing new (as a looping answer to a math problem reaches no
answer). Completions shorter than `MIN_WORDS` are scored as if that long, so saying less earns nothing.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from .corpus import LANGS, CorpusSpec, Lexicon, first_sentence

_WORD_OR_HAN_RUN = re.compile("[A-Za-z\u00c0-\u024f']+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


@dataclass
class Prompt:
    text: str
    lang: str
    topic: str

    def to_dict(self) -> dict:
        return asdict(self)


def make_prompts(lexicon: Lexicon, spec: CorpusSpec, n_per_lang: int, seed: int) -> list[Prompt]:
    """n_per_lang prompts in each language, topics balanced; disjoint seeds give disjoint splits."""
    rng = random.Random(seed)
    return [
        Prompt(first_sentence(lexicon, spec, lexicon.topics[i % len(lexicon.topics)], lang, rng), lang,
               lexicon.topics[i % len(lexicon.topics)])
        for lang in LANGS
        for i in range(n_per_lang)
    ]  # fmt: skip


def segment(text: str, zh_words: set[str], max_len: int = 4) -> list[str]:
    """Word list of a mixed text: Latin words lowercased; Chinese runs cut by forward maximum matching
    against the world's Chinese lexicon (unknown characters become one-character words)."""
    words = []
    for run in _WORD_OR_HAN_RUN.findall(text):
        if run.isascii() or not re.match("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]", run):
            words.append(run.lower())
            continue
        i = 0
        while i < len(run):
            n = next((n for n in range(min(max_len, len(run) - i), 1, -1) if run[i : i + n] in zh_words), 1)
            words.append(run[i : i + n])
            i += n
    return words


def topic_word_share(completion: str, topic_words: set[str], zh_words: set[str]) -> float:
    """Share of the completion's words found in `topic_words`; 0.0 for a completion with no words."""
    words = segment(completion, zh_words)
    return sum(w in topic_words for w in words) / len(words) if words else 0.0


MIN_WORDS = 16  # about the length of a clean continuation: shorter ones are scored as if this long


def topic_reward(completion: str, topic_words: set[str], zh_words: set[str], min_words: int = MIN_WORDS) -> float:
    """Distinct words of `topic_words` per word of the completion, in [0, 1].

    The count of words is at least `min_words`, so a policy cannot raise its reward by saying less.
    """
    words = segment(completion, zh_words)
    return len({w for w in words if w in topic_words}) / max(len(words), min_words)
