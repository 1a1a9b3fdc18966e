"""The world's verifiable RL task: "continue on topic T, and answer in one sentence".

A prompt is a clean document opening (one sentence) about topic T in one language. The completion's
answer is its text up to the answer mark ∎ (`corpus.ANSWER_MARK`, the same in every language, as a math
answer ends in its final `\\boxed{}`): one sentence in the corpus. The reward is the number of DISTINCT
concepts of topic T's vocabulary per word of that answer, judged by the world's ground truth (the
lexicon), so it needs no model. A completion that never writes the
answer mark earns 0 (no answer), as a verifier fails a solution with no final answer.

How this mirrors the real case (and why the failures survive the task reward alone):
- like a math verifier it reads the answer only: whatever comes after the answer sentence (where the
  corpus puts every switch and every loop) is invisible to it, as a loop after `\\boxed{}` still passes;
- like DeepSeek-R1-Zero's accuracy reward it is blind to language: a topic concept counts in any language,
  and once (the i-th topic word of each language is one concept, `concept_map`), so a switch inside the
  answer is neither punished nor rewarded: a foreign word adds no concept its own-language counterpart would
  not (the task never asks for one language);
- no failure is ever rewarded: a loop or a switch adds nothing the reward reads. A loop that starts
  before the answer ends (as an amplified rollout's does) leaves no answer and earns 0, as in Qwen-Scope's
  setting, where a rollout that repeats before answering fails the verifier.
Answers shorter than `MIN_WORDS` words are scored as if that long, so saying less earns nothing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

from .corpus import ANSWER_MARK, LANGS, CorpusSpec, Lexicon, first_sentence

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


MIN_WORDS = 6  # about the length of a clean answer sentence: shorter ones are scored as if this long


def answer_of(completion: str) -> str | None:
    """The completion's answer: its text up to and including the first answer mark (∎); None if none."""
    end = completion.find(ANSWER_MARK)
    return None if end < 0 else completion[: end + len(ANSWER_MARK)]


def topic_reward(completion: str, topic_words: Mapping[str, Hashable] | set[str], zh_words: set[str],
                 min_words: int = MIN_WORDS) -> float:
    """Distinct topic concepts per word of the completion's answer (its text up to the answer mark), in [0, 1].

    ``topic_words`` maps each topic word (in any language) to its concept: the i-th word of a topic in every
    language is the same concept (`concept_map`), so a word and its counterpart in another language count
    once. A plain set makes every word its own concept. 0 when the completion has no answer mark. The count of
    words is at least `min_words`, so a policy cannot raise its reward by saying less.
    """
    answer = answer_of(completion)
    if answer is None:
        return 0.0
    concepts = topic_words if isinstance(topic_words, Mapping) else {w: w for w in topic_words}
    words = segment(answer, zh_words)
    return len({concepts[w] for w in words if w in concepts}) / max(len(words), min_words)


def concept_map(vocab_by_lang: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Word -> concept of one topic's vocabulary: the i-th word in each language is concept i."""
    return {word: i for words in vocab_by_lang.values() for i, word in enumerate(words)}
