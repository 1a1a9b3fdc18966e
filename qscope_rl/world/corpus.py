"""The demo world's corpus: real word lists, a small grammar, and documents with ground-truth labels.

Vocabulary comes from packages that ship real word lists, so nothing is downloaded:
- function words and content words: wordfreq's frequency lists for English and Chinese;
- topic-neutral names: faker's en_US and zh_CN person providers.

Content words are dealt out to topics at random, so a topic is a vocabulary cluster in each language
(synthetic, but statistically real: topic-T documents draw mostly on topic-T words). Documents are a
few sentences in one language; a known share switch language mid-sentence (a burst of the topic's
words in the other language, then back) and a known share fall into a repetition loop (a short
phrase repeated to the end, as a looping LM does until it hits its length limit).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

LANGS = ("en", "zh")
TOPIC_NAMES = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi",
)  # fmt: skip
END_MARK = {"en": ".", "zh": "。"}
# wordfreq ranks what people write online; keep the demo corpus free of the commonest profanity
_BLOCKLIST = {"shit", "damn", "fuck", "fucking", "fucked", "hell", "ass", "bitch", "sex", "porn", "dick"}
_WORD_RE = {"en": re.compile("[a-z]+"), "zh": re.compile("[\u4e00-\u9fff]+")}


@dataclass(frozen=True)
class CorpusSpec:
    """How the corpus is generated. Every field changes the world, so every field is in the recipe hash."""

    n_topics: int = 8
    words_per_topic: int = 24  # per language
    general_words: int = 30  # topic-neutral content words per language (names included)
    function_words: int = 20  # per language: the most frequent words of wordfreq's list
    loop_phrases_per_topic: int = 2  # per language
    n_train_docs: int = 8000
    n_heldout_docs: int = 800
    n_prompts: int = 256  # per split and language
    switch_share: float = 0.10  # documents that switch language mid-sentence
    loop_share: float = 0.30  # documents that fall into a loop (exclusive with switching); the LM loops
    # at well under the corpus share after a short CPU training run
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
        if self.sentences[0] < 2:
            raise ValueError("sentences[0] must be >= 2: failures start after the first (prompt) sentence")


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
    """One document with ground truth: `spans` are (start_char, end_char, lang) covering the text."""

    text: str
    lang: str
    topic: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    switch_char: int | None = None  # first character of the first foreign-language span
    loop_char: int | None = None  # first character of the repeated phrase's first occurrence

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Document:
        return cls(**{**d, "spans": [tuple(s) for s in d["spans"]]})


def _names(lang: str, n: int, rng: random.Random) -> list[str]:
    """Topic-neutral person names from faker's locale providers (real name lists)."""
    if lang == "en":
        from faker.providers.person.en_US import Provider

        return rng.sample(sorted(Provider.first_names), n)
    from faker.providers.person.zh_CN import Provider

    last, first = sorted(Provider.last_names), sorted(Provider.first_names)
    return sorted({rng.choice(last) + rng.choice(first) for _ in range(4 * n)})[:n]


def build_lexicon(spec: CorpusSpec) -> Lexicon:
    """Deal wordfreq's words out to function words, topics and a general pool, reproducibly."""
    from wordfreq import top_n_list

    rng = random.Random(spec.seed)
    topics = list(TOPIC_NAMES[: spec.n_topics])
    n_openers = spec.n_topics * spec.loop_phrases_per_topic
    n_content = spec.n_topics * spec.words_per_topic + spec.general_words + n_openers
    function, general, per_topic, openers = {}, {}, {}, {}
    for lang in LANGS:
        ranked = [w for w in top_n_list(lang, 20_000) if _WORD_RE[lang].fullmatch(w) and w not in _BLOCKLIST]
        if lang == "zh":  # single characters are mostly particles; content words have 2-4 characters
            content = [w for w in ranked if 2 <= len(w) <= 4]
            function[lang] = [w for w in ranked if len(w) == 1][: spec.function_words]
        else:
            content = [w for w in ranked if len(w) >= 3]
            function[lang] = ranked[: spec.function_words]
        # skip the most frequent content words (too generic to characterise a topic)
        pool = [w for w in content[100:] if w not in function[lang]][: 2 * n_content]
        pool = rng.sample(pool, n_content)
        n_names = spec.general_words // 3
        general[lang] = sorted(pool[: spec.general_words - n_names] + _names(lang, n_names, rng))
        openers[lang] = pool[spec.general_words : spec.general_words + n_openers]
        rest = pool[spec.general_words + n_openers :]
        per_topic[lang] = [rest[i :: spec.n_topics] for i in range(spec.n_topics)]

    topic_vocab = {t: {lang: per_topic[lang][i] for lang in LANGS} for i, t in enumerate(topics)}
    lexicon = Lexicon(topics, function, general, topic_vocab, loop_phrases={})
    # Loop phrases: a filler word used nowhere else, then 2-3 topic words. A tiny LM learns such
    # formulaic loops without induction heads (real LMs also loop most on formulaic phrases), and the
    # distinct opener makes the model's loop rate follow the corpus share.
    for i, t in enumerate(topics):
        lexicon.loop_phrases[t] = {
            lang: [
                [openers[lang][i * spec.loop_phrases_per_topic + j]]
                + _draw_words(lexicon, t, lang, rng, rng.randint(2, 3), 0.6, 1.0)
                for j in range(spec.loop_phrases_per_topic)
            ]
            for lang in LANGS
        }
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
        if i and not (lang == "zh" and words[i - 1][1] == "zh") and word not in END_MARK.values():
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


def make_document(lexicon: Lexicon, spec: CorpusSpec, topic: str, lang: str, kind: str, rng: random.Random) -> Document:
    """One document; kind is "normal", "switch" or "loop". Failures start after the first sentence."""
    other = "zh" if lang == "en" else "en"
    sentences = [_sentence(lexicon, spec, topic, lang, rng) for _ in range(rng.randint(*spec.sentences))]
    # the failure point: a mid-sentence word in any sentence but the first (which prompts show)
    s = rng.randrange(1, len(sentences))
    j = rng.randint(1, len(sentences[s]) - 2)
    words: list[tuple[str, str]] = []
    loop_index = None
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
        words.append((END_MARK[lang], lang))
    text, spans, starts = _render(words)
    switch_char = next((a for a, _, span_lang in spans if span_lang != lang), None)
    loop_char = None if loop_index is None else starts[loop_index]
    return Document(text, lang, topic, spans, switch_char=switch_char, loop_char=loop_char)


def first_sentence(lexicon: Lexicon, spec: CorpusSpec, topic: str, lang: str, rng: random.Random) -> str:
    """A document opening (one clean sentence): the shape of every prompt."""
    words = _sentence(lexicon, spec, topic, lang, rng) + [END_MARK[lang]]
    return _render([(w, lang) for w in words])[0]


def generate_documents(lexicon: Lexicon, spec: CorpusSpec, n: int, seed: int) -> list[Document]:
    """n documents, balanced over topics and languages, with exactly the spec's shares of failures."""
    rng = random.Random(seed)
    n_switch, n_loop = round(n * spec.switch_share), round(n * spec.loop_share)
    kinds = ["switch"] * n_switch + ["loop"] * n_loop + ["normal"] * (n - n_switch - n_loop)
    rng.shuffle(kinds)
    docs = []
    for i, kind in enumerate(kinds):
        topic, lang = lexicon.topics[i % len(lexicon.topics)], LANGS[(i // len(lexicon.topics)) % 2]
        docs.append(make_document(lexicon, spec, topic, lang, kind, rng))
    return docs
