"""Independent judges: code-switching and repetition measured without any SAE.

Everything the project claims about SAE detectors, rewards and trainers is scored by these, so they
stay simple, deterministic and easy to audit:

- code-switching by Unicode script (exact where the languages differ in script, as English and
  Chinese do; blind where they share one, as English and Spanish do), by lingua-language-detector's
  mixed-language API otherwise (fallible: it guesses from character statistics), and DeepSeek-R1's
  "share of target-language words" measure, by script or by lingua;
- repetition by the open-r1 n-gram repeat ratio and a loop detector (a span repeated 3+ times at the end).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# CJK Unified Ideographs, extension A, compatibility ideographs, extensions B-F.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_LATIN = "A-Za-z\u00c0-\u024f"
_HAN_RE = re.compile(f"[{_HAN}]")
_LATIN_RE = re.compile(f"[{_LATIN}]")
# A "word" unit: a run of Latin letters / digits, or one Han character (CJK has no spaces).
_UNIT_RE = re.compile(f"[{_LATIN}0-9']+|[{_HAN}]|[^\\s{_LATIN}0-9{_HAN}]")

LANGUAGES = ("en", "zh", "es")
# what a script judge can see: English and Spanish share the Latin script, so only Han is foreign to them
_FOREIGN_SCRIPT = {"en": _HAN_RE, "zh": _LATIN_RE, "es": _HAN_RE}


def _check_language(lang: str) -> None:
    if lang not in _FOREIGN_SCRIPT:
        raise ValueError(f"unknown target language {lang!r}: the script judge knows {list(LANGUAGES)}")


def units(text: str) -> list[str]:
    """Split text into word units: Latin words, single Han characters and punctuation marks."""
    return _UNIT_RE.findall(text)


def first_switch_offset(text: str, target: str) -> int | None:
    """Character offset of the first character written in the other language's script, or None."""
    _check_language(target)
    match = _FOREIGN_SCRIPT[target].search(text)
    return None if match is None else match.start()


def script_code_switch(text: str, target: str) -> bool:
    """True if `text`, meant to be in `target` ("en", "zh", "es"), contains a script foreign to it (Han for
    English and Spanish, Latin for Chinese): it cannot see an English <-> Spanish switch."""
    return first_switch_offset(text, target) is not None


def target_language_share(text: str, target: str) -> float:
    """DeepSeek-R1 language-consistency measure: share of word units written in the target language.

    Punctuation and digits belong to no language and are not counted; a text with no words scores 1.0.
    """
    _check_language(target)
    words = _word_units(text)
    if not words:
        return 1.0
    foreign = _FOREIGN_SCRIPT[target]
    return sum(1 for w in words if not foreign.match(w)) / len(words)


@lru_cache(maxsize=1)
def _lingua_detector():
    try:
        from lingua import Language, LanguageDetectorBuilder
    except ImportError as err:  # pragma: no cover - lingua is a core dependency
        raise ImportError("the lingua judge needs `pip install lingua-language-detector`") from err
    return LanguageDetectorBuilder.from_languages(Language.ENGLISH, Language.CHINESE, Language.SPANISH).build()


def _lingua_language(lang: str):
    from lingua import Language

    return {"en": Language.ENGLISH, "zh": Language.CHINESE, "es": Language.SPANISH}[lang]


def lingua_foreign_share(text: str, target: str) -> float:
    """Share of characters that lingua's mixed-language detector assigns to a non-target language."""
    _check_language(target)
    if not text.strip():
        return 0.0
    want = _lingua_language(target)
    sections = _lingua_detector().detect_multiple_languages_of(text)
    foreign = sum(s.end_index - s.start_index for s in sections if s.language != want)
    return foreign / len(text)


def lingua_code_switch(text: str, target: str) -> bool:
    """True if lingua finds any section of `text` in a language other than `target`."""
    return lingua_foreign_share(text, target) > 0.0


def lingua_target_share(text: str, target: str) -> float:
    """DeepSeek-R1's language-consistency measure by lingua: share of word units in sections lingua assigns
    to `target` (for languages a script cannot tell apart); a text with no words scores 1.0."""
    _check_language(target)
    if not _word_units(text):
        return 1.0
    want = _lingua_language(target)
    sections = _lingua_detector().detect_multiple_languages_of(text)
    kept = sum(len(_word_units(text[s.start_index : s.end_index])) for s in sections if s.language == want)
    return min(1.0, kept / len(_word_units(text)))


def _word_units(text: str) -> list[str]:
    return [u for u in units(text) if _HAN_RE.match(u) or _LATIN_RE.match(u)]


def ngram_repeat_ratio(text_or_units: str | Sequence, n: int = 3) -> float:
    """open-r1's repetition measure: 1 - unique n-grams / total n-grams (0 for fewer than n units).

    Text is split into word units (see `units`), so Chinese is measured per character.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seq = units(text_or_units) if isinstance(text_or_units, str) else list(text_or_units)
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def loop_start(text_or_units: str | Sequence, min_repeats: int = 3, min_units: int = 3) -> int | None:
    """Index (in units) where a trailing loop starts, or None if the sequence does not end in one.

    A loop is a span of p units repeated at least `min_repeats` times back to back at the end; the
    last repetition may be cut short (generation stops mid-loop), and the loop must cover at least
    `min_units` units so that "ha ha ha" style single-unit stutters of length < min_units do not count.
    The shortest period wins; the start is extended back as far as the period holds.
    """
    seq = units(text_or_units) if isinstance(text_or_units, str) else list(text_or_units)
    n = len(seq)
    for p in range(1, n // min_repeats + 1):
        start = n - p  # extend backwards while the period p holds
        while start > 0 and seq[start - 1] == seq[start - 1 + p]:
            start -= 1
        if n - start >= max(min_repeats * p, min_units):
            return start
    return None


def has_loop(text_or_units: str | Sequence, min_repeats: int = 3, min_units: int = 3) -> bool:
    """True if the sequence ends in a span repeated `min_repeats`+ times (see `loop_start`)."""
    return loop_start(text_or_units, min_repeats, min_units) is not None
