"""The world's ground-truth language judge: every word is looked up in the world's own lexicon.

The lexicon's English and Spanish word lists are disjoint by construction (a word in both of wordfreq's
lists belongs to neither), so a Latin word the world knows has exactly one language, and any Han
character is Chinese. This judge is exact on the world's text where a script judge is blind (English
<-> Spanish) and where lingua guesses; the demo scores every method by it. Words the world does not
know (a tiny LM sometimes spells new ones) count for no language.
"""

from __future__ import annotations

from collections.abc import Mapping

from .task import segment


def _is_han(word: str) -> bool:
    return "\u3400" <= word[0] <= "\u4dbf" or "\u4e00" <= word[0] <= "\u9fff" or "\uf900" <= word[0] <= "\ufaff"


class LexiconJudge:
    """Language of each word of a text by the world's lexicon: `languages(text)`, `foreign(text, lang)`."""

    def __init__(self, words_by_lang: Mapping[str, set[str]]):
        self.langs = tuple(words_by_lang)
        self._zh = set(words_by_lang.get("zh", ()))
        self._latin = {w: lang for lang, words in words_by_lang.items() if lang != "zh" for w in words}

    def word_languages(self, text: str) -> list[tuple[str, str | None]]:
        """(word, language or None) for each word of `text` (Chinese segmented by the lexicon)."""
        return [(w, "zh" if _is_han(w) else self._latin.get(w)) for w in segment(text, self._zh)]

    def foreign(self, text: str, lang: str) -> list[str]:
        """The languages other than `lang` that `text` uses, in order of first use."""
        if lang not in self.langs:
            raise ValueError(f"unknown language {lang!r}: the world's lexicon has {list(self.langs)}")
        seen = []
        for _, word_lang in self.word_languages(text):
            if word_lang is not None and word_lang != lang and word_lang not in seen:
                seen.append(word_lang)
        return seen

    def code_switch(self, text: str, lang: str, to: str | None = None) -> bool:
        """True if `text`, meant to be in `lang`, uses another language of the world (or exactly `to`)."""
        foreign = self.foreign(text, lang)
        return bool(foreign) if to is None else to in foreign
