"""The independent judges are exact on hand-written strings."""

import pytest

from qscope_rl import judges


def test_script_judge():
    assert not judges.script_code_switch("The weather is nice today.", "en")
    assert judges.script_code_switch("The weather is 很好 today.", "en")
    assert judges.first_switch_offset("The weather is 很好 today.", "en") == 15
    assert not judges.script_code_switch("今天天气很好。", "zh")
    assert judges.script_code_switch("今天天气很好, very nice。", "zh")
    assert judges.first_switch_offset("今天天气很好, very nice", "zh") == 8
    assert not judges.script_code_switch("今天 2024 年。", "zh")  # digits belong to no language
    with pytest.raises(ValueError, match="unknown target language 'fr'"):
        judges.script_code_switch("bonjour", "fr")


def test_target_language_share():
    assert judges.target_language_share("one two three 四", "en") == 0.75
    assert judges.target_language_share("四五 six", "zh") == pytest.approx(2 / 3)
    assert judges.target_language_share("...", "en") == 1.0


def test_ngram_repeat_ratio():
    assert judges.ngram_repeat_ratio("a b c d e", n=2) == 0.0
    # 4 bigrams (a b, b a, a b, b a) with 2 unique: 1 - 2/4.
    assert judges.ngram_repeat_ratio("a b a b a", n=2) == 0.5
    assert judges.ngram_repeat_ratio("a b", n=3) == 0.0
    assert judges.ngram_repeat_ratio("我爱我爱我", n=2) == 0.5  # per Han character
    with pytest.raises(ValueError):
        judges.ngram_repeat_ratio("a", n=0)


def test_loop_detector():
    assert judges.has_loop("I like tea . the cat sat the cat sat the cat sat")
    assert judges.loop_start("I like tea . the cat sat the cat sat the cat sat") == 4
    assert judges.has_loop("x the cat sat the cat sat the cat sat the")  # a 4th repetition cut short
    assert judges.loop_start("x the cat sat the cat sat the cat sat the") == 1
    assert not judges.has_loop("the cat sat the cat sat")  # only twice
    assert not judges.has_loop("a b c d e f g")
    assert not judges.has_loop("ha ha")
    assert judges.has_loop("ha ha ha")
    assert judges.has_loop([5, 1, 2, 1, 2, 1, 2])
    assert judges.has_loop("我爱你我爱你我爱你")


def test_lingua_judge_on_mixed_text():
    assert not judges.lingua_code_switch("The weather is nice today and we walk to the park.", "en")
    assert judges.lingua_code_switch("The weather is nice today. 我们去公园散步吧。", "en")
    assert judges.lingua_foreign_share("", "en") == 0.0


def test_script_judge_cannot_see_a_same_script_switch_but_lingua_can():
    mixed = "The weather is nice today and we walk to the park. La casa es muy grande y tiene un jardín bonito."
    assert not judges.script_code_switch(mixed, "en") and not judges.script_code_switch(mixed, "es")
    assert judges.script_code_switch("hola 你好", "es")
    assert judges.lingua_code_switch(mixed, "en")
    share = judges.lingua_target_share(mixed, "en")
    assert 0.3 < share < 0.8  # about half the words are Spanish
    assert judges.lingua_target_share("The weather is nice today and we walk to the park.", "en") == 1.0
    assert judges.lingua_target_share("", "es") == 1.0
