"""The demo world's corpus: real word lists, a small grammar, and documents with ground-truth labels.

Vocabulary comes from packages that ship real word lists, so nothing is downloaded:
- function words and content words: wordfreq's frequency lists for English, Chinese and Spanish
  (a word in both the English and the Spanish list belongs to neither, so the lexicon is ground truth);
- topic-neutral names: faker's en_US, zh_CN and es_ES person providers.

Content words are dealt out to topics at random, so a topic is a vocabulary cluster in each language
(synthetic, but statistically real: topic-T documents draw mostly on topic-T words). Documents are a
few sentences in one language: sentence 0 is what a prompt shows, sentence 1 is the "answer" the task
reward reads (see `task`; it ends with the answer mark ∎ instead of a full stop), and the failures start
later, in sentence 2 or after, as in the real case (a model that has answered goes on and drifts). A
small known share switch language mid-sentence (a burst of the topic's words in one of the other two
languages, then back: English <-> Chinese is visible to a Unicode-script judge, English <-> Spanish is
not), and a small known share fall into a repetition loop (a formulaic phrase repeated to the end, as a
looping LM does until it hits its length limit).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

LANGS = ("en", "zh", "es")
TOPIC_NAMES = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi",
)  # fmt: skip
END_MARK = {"en": ".", "zh": "。", "es": "."}
# The answer sentence ends with its own mark, in every language, as a math answer ends in \boxed{}: what follows
# it is the part of a completion the task reward never reads, and the LM can see where that part begins.
ANSWER_MARK = "\u220e"  # ∎
_FORMULA_WORDS = (2, 3)  # words after a loop phrase's opener
ANSWER_SENTENCE = 1  # the sentence after the prompt: the task's answer; failures start after it
# wordfreq ranks what people write online; keep the demo corpus free of the commonest profanity
_BLOCKLIST = {"shit", "damn", "fuck", "fucking", "fucked", "hell", "ass", "bitch", "sex", "porn", "dick"}
_WORD_RE = {"en": re.compile("[a-z]+"), "zh": re.compile("[\u4e00-\u9fff]+"), "es": re.compile("[a-záéíóúñü]+")}
_FAKER_LOCALE = {"en": "en_US", "zh": "zh_CN", "es": "es_ES"}


@dataclass(frozen=True)
class CorpusSpec:
    """How the corpus is generated. Every field changes the world, so every field is in the recipe hash."""

    n_topics: int = 8
    words_per_topic: int = 24  # per language
    general_words: int = 30  # topic-neutral content words per language (names included)
    function_words: int = 20  # per language: the most frequent words of wordfreq's list
    loop_phrases: int = 2  # per language, shared by every topic (formulas, as "I'm sorry, I'm sorry" is)
    n_train_docs: int = 9000
    n_heldout_docs: int = 900
    n_prompts: int = 256  # per split and language
    # Rare failures, as in real models: at the world's decoding temperature (0.7) the LM's own samples then
    # switch and loop at a few percent (design runs on world seed 0, T = 0.7: loop shares 0.05 / 0.08 gave
    # 1.2% / 2.3% looping samples; switch shares 0.04-0.05 gave 0.6-4% switching ones)
    switch_share: float = 0.05  # documents that switch language mid-sentence (to either other language)
    loop_share: float = 0.08  # documents that fall into a loop (exclusive with switching)
    topic_share: float = 0.75  # share of content slots filled with the topic's own words
    content_share: float = 0.5  # share of word slots that are content words (rest: function words)
    sentences: tuple[int, int] = (3, 4)
    sentence_words: tuple[int, int] = (5, 8)
    switch_words: tuple[int, int] = (2, 4)  # length of a foreign burst
    loop_repeats: tuple[int, int] = (5, 9)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.n_topics <= len(TOPIC_NAMES):
            raise ValueError(f"n_topics must be in [1, {len(TOPIC_NAMES)}], got {self.n_topics}")
        if self.switch_share + self.loop_share > 1:
            raise ValueError("switch_share + loop_share must be <= 1 (the failure modes are exclusive)")
        if self.sentence_words[0] < 3:
            raise ValueError("sentence_words[0] must be >= 3: failures start mid-sentence")
        if self.sentences[0] < ANSWER_SENTENCE + 2:
            raise ValueError(f"sentences[0] must be >= {ANSWER_SENTENCE + 2}: failures start after the prompt's "
                             f"sentence and the answer sentence")


@dataclass
class Lexicon:
    """Word lists of the world, per language: function words, general words, topic words, loop phrases."""

    topics: list[str]
    function: dict[str, list[str]]
    general: dict[str, list[str]]
    topic_vocab: dict[str, dict[str, list[str]]]  # {topic: {lang: words}}
    loop_phrases: dict[str, dict[str, list[list[str]]]]  # {topic: {lang: [phrase words]}}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Lexicon:
        return cls(**d)

    def words(self, lang: str) -> set[str]:
        """Every word the world knows in `lang` (used to segment Chinese)."""
        out = set(self.function[lang]) | set(self.general[lang])
        for vocab in self.topic_vocab.values():
            out |= set(vocab[lang])
        for phrases in self.loop_phrases.values():
            out |= {w for phrase in phrases[lang] for w in phrase}
        return out


@dataclass
class Document:
    """One document with ground truth: `spans` are (start_char, end_char, lang) covering the text.

    ``kind`` is "normal", "switch" or "loop"; ``switch_lang`` the language switched into; ``answer_end`` the
    end of the answer sentence (sentence 1, what the task reward reads); failures start after it.
    """

    text: str
    lang: str
    topic: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    switch_char: int | None = None  # first character of the first foreign-language span
    loop_char: int | None = None  # first character of the repeated phrase's first occurrence
    kind: str = "normal"
    switch_lang: str | None = None
    switch_end: int | None = None  # end of the first foreign-language span
    answer_end: int | None = None  # first character after the answer sentence's end mark

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Document:
        return cls(**{**d, "spans": [tuple(s) for s in d["spans"]]})


def _names(lang: str, n: int, rng: random.Random) -> list[str]:
    """Topic-neutral person names from faker's locale providers (real name lists), lowercased for Latin."""
    import importlib

    provider = importlib.import_module(f"faker.providers.person.{_FAKER_LOCALE[lang]}").Provider
    if lang == "zh":
        last, first = sorted(provider.last_names), sorted(provider.first_names)
        return sorted({rng.choice(last) + rng.choice(first) for _ in range(4 * n)})[:n]
    names = sorted({w.lower() for w in provider.first_names if _WORD_RE[lang].fullmatch(w.lower())})
    return rng.sample(names, n)


def build_lexicon(spec: CorpusSpec) -> Lexicon:
    """Deal wordfreq's words out to function words, topics and a general pool, reproducibly."""
    from wordfreq import top_n_list

    rng = random.Random(spec.seed)
    topics = list(TOPIC_NAMES[: spec.n_topics])
    n_openers = spec.loop_phrases
    n_formula = n_openers * _FORMULA_WORDS[1]  # the words of the loop phrases after their openers
    n_content = spec.n_topics * spec.words_per_topic + spec.general_words + n_openers + n_formula
    function, general, per_topic, openers, formula = {}, {}, {}, {}, {}
    ranked = {lang: [w for w in top_n_list(lang, 20_000) if _WORD_RE[lang].fullmatch(w) and w not in _BLOCKLIST]
              for lang in LANGS}
    # a word written the same in English and Spanish ("no", "real", "hospital") belongs to neither language
    shared = set(ranked["en"]) & set(ranked["es"])
    names = {lang: _names(lang, spec.general_words // 3, rng) for lang in LANGS}
    shared |= set(names["en"]) & set(names["es"])
    for lang in LANGS:
        words = [w for w in ranked[lang] if w not in shared]
        if lang == "zh":  # single characters are mostly particles; content words have 2-4 characters
            content = [w for w in words if 2 <= len(w) <= 4]
            function[lang] = [w for w in words if len(w) == 1][: spec.function_words]
        else:
            content = [w for w in words if len(w) >= 3]
            function[lang] = words[: spec.function_words]
        # skip the most frequent content words (too generic to characterise a topic)
        pool = [w for w in content[100:] if w not in function[lang]][: 2 * n_content]
        pool = rng.sample(pool, n_content)
        lang_names = [w for w in names[lang] if w not in shared and w not in pool and w not in function[lang]]
        general[lang] = sorted(pool[: spec.general_words - len(lang_names)] + lang_names)
        openers[lang] = pool[spec.general_words : spec.general_words + n_openers]
        formula[lang] = pool[spec.general_words + n_openers : spec.general_words + n_openers + n_formula]
        rest = pool[spec.general_words + n_openers + n_formula :]
        per_topic[lang] = [rest[i :: spec.n_topics] for i in range(spec.n_topics)]

    topic_vocab = {t: {lang: per_topic[lang][i] for lang in LANGS} for i, t in enumerate(topics)}
    lexicon = Lexicon(topics, function, general, topic_vocab, loop_phrases={})
    # Loop phrases: a few formulas per language, shared by every topic, of 3-4 words used nowhere else (an
    # opener, then 2-3 formula words). Each word of a formula predicts the next one, so a tiny LM learns to
    # run the loop from bigrams, without the induction heads a 400-step model does not form (with topic and
    # function words in per-topic phrases, v2's LM never looped at a 5-15% corpus share); real LMs too loop
    # most on a few formulaic phrases. Only the opener is a choice, so the loop rate follows how often the
    # corpus starts one.
    phrases = {lang: [[openers[lang][n], *formula[lang][n * _FORMULA_WORDS[1] :][: rng.randint(*_FORMULA_WORDS)]]
                      for n in range(spec.loop_phrases)] for lang in LANGS}
    lexicon.loop_phrases = {t: {lang: [list(p) for p in phrases[lang]] for lang in LANGS} for t in topics}
    return lexicon


def _draw_words(
    lexicon: Lexicon,
    topic: str,
    lang: str,
    rng: random.Random,
    n: int,
    content_share: float,
    topic_share: float,
) -> list[str]:
    """n words in `lang`: content words (from the topic with prob. topic_share) and function words."""
    words = []
    for _ in range(n):
        if rng.random() < content_share:
            pool = lexicon.topic_vocab[topic][lang] if rng.random() < topic_share else lexicon.general[lang]
        else:
            pool = lexicon.function[lang]
        words.append(rng.choice(pool))
    return words


def _render(words: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, str]], list[int]]:
    """Join (word, lang) pairs into text, language spans and each word's start offset.

    Chinese words join without spaces; any pair involving a Latin word is separated by a space.
    The space before a foreign word stays in the preceding span, so a span starts at its first letter.
    """
    text, spans, starts = "", [], []
    for i, (word, lang) in enumerate(words):
        if i and not (lang == "zh" and words[i - 1][1] == "zh") and word not in (*END_MARK.values(), ANSWER_MARK):
            text += " "
        if not spans or spans[-1][2] != lang:
            if spans:
                spans[-1] = (spans[-1][0], len(text), spans[-1][2])
            spans.append((len(text), len(text), lang))
        starts.append(len(text))
        text += word
    if spans:
        spans[-1] = (spans[-1][0], len(text), spans[-1][2])
    return text, spans, starts


def _sentence(lexicon: Lexicon, spec: CorpusSpec, topic: str, lang: str, rng: random.Random) -> list[str]:
    # English stays lowercase (as in wordfreq): capitals would double what a tiny LM must spell
    n = rng.randint(*spec.sentence_words)
    return _draw_words(lexicon, topic, lang, rng, n, spec.content_share, spec.topic_share)


def make_document(lexicon: Lexicon, spec: CorpusSpec, topic: str, lang: str, kind: str, rng: random.Random,
                  switch_lang: str | None = None) -> Document:
    """One document; kind is "normal", "switch" (into `switch_lang`, default: a random other language) or
    "loop". Failures start mid-sentence after the answer sentence (sentence 1), never inside it."""
    other = switch_lang or rng.choice([x for x in LANGS if x != lang])
    sentences = [_sentence(lexicon, spec, topic, lang, rng) for _ in range(rng.randint(*spec.sentences))]
    # the failure point: a mid-sentence word in a sentence after the answer
    s = rng.randrange(ANSWER_SENTENCE + 1, len(sentences))
    j = rng.randint(1, len(sentences[s]) - 2)
    words: list[tuple[str, str]] = []
    loop_index = answer_index = None
    for i, sentence in enumerate(sentences):
        for pos, word in enumerate(sentence):
            if (i, pos) == (s, j) and kind == "switch":
                n = rng.randint(*spec.switch_words)
                burst = _draw_words(lexicon, topic, other, rng, n, spec.content_share, spec.topic_share)
                words += [(w, other) for w in burst]
            elif (i, pos) == (s, j) and kind == "loop":  # the loop runs to the end of the document
                loop_index = len(words)
                phrase = rng.choice(lexicon.loop_phrases[topic][lang])
                words += [(w, lang) for _ in range(rng.randint(*spec.loop_repeats)) for w in phrase]
                break
            words.append((word, lang))
        if loop_index is not None:
            break
        words.append((ANSWER_MARK if i == ANSWER_SENTENCE else END_MARK[lang], lang))
        if i == ANSWER_SENTENCE:
            answer_index = len(words) - 1
    text, spans, starts = _render(words)
    foreign = next(((a, b, x) for a, b, x in spans if x != lang), None)
    return Document(
        text, lang, topic, spans,
        switch_char=None if foreign is None else foreign[0],
        loop_char=None if loop_index is None else starts[loop_index],
        kind=kind,
        switch_lang=None if foreign is None else foreign[2],
        switch_end=None if foreign is None else foreign[1],
        answer_end=starts[answer_index] + len(ANSWER_MARK),
    )  # fmt: skip


def first_sentence(lexicon: Lexicon, spec: CorpusSpec, topic: str, lang: str, rng: random.Random) -> str:
    """A document opening (one clean sentence): the shape of every prompt."""
    words = _sentence(lexicon, spec, topic, lang, rng) + [END_MARK[lang]]
    return _render([(w, lang) for w in words])[0]


def generate_documents(lexicon: Lexicon, spec: CorpusSpec, n: int, seed: int) -> list[Document]:
    """n documents, balanced over topics and languages, with exactly the spec's shares of failures
    (switches split evenly over the other two languages)."""
    rng = random.Random(seed)
    n_switch, n_loop = round(n * spec.switch_share), round(n * spec.loop_share)
    kinds = ["switch"] * n_switch + ["loop"] * n_loop + ["normal"] * (n - n_switch - n_loop)
    rng.shuffle(kinds)
    docs, switches = [], 0
    for i, kind in enumerate(kinds):
        topic, lang = lexicon.topics[i % len(lexicon.topics)], LANGS[(i // len(lexicon.topics)) % len(LANGS)]
        target = None
        if kind == "switch":
            target = [x for x in LANGS if x != lang][switches % 2]
            switches += 1
        docs.append(make_document(lexicon, spec, topic, lang, kind, rng, switch_lang=target))
    return docs
