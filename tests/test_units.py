"""Words, sentence ends, openings and code detection in any script (hand-counted)."""

from __future__ import annotations

import itertools

import pytest

from pipeline.data.units import (
    ends_line_of_code,
    ends_sentence,
    is_unspaced,
    looks_like_code,
    opening,
    sentence_spans,
    words,
)

PYTHON = "def add(a, b):\n    total = a + b\n    return total\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("Don't stop me now, 42 times.", ["Don't", "stop", "me", "now", "42", "times"]),
    ("北京是中国的首都。", ["北", "京", "是", "中", "国", "的", "首", "都"]),
    ("日本語のテキスト", ["日", "本", "語", "の", "テ", "キ", "ス", "ト"]),
    # Thai: every character a word, its vowel and tone marks riding on it (ก + ่ is one).
    ("ไก่", ["ไ", "ก่"]),
    ("서울은 한국의 수도", ["서울은", "한국의", "수도"]),  # Hangul is written with spaces
    ("Привет, мир!", ["Привет", "мир"]),
    ("GPT-2 (2019) und 北京", ["GPT", "2", "2019", "und", "北", "京"]),
    ("a <unk> b", ["a", "<unk>", "b"]),
    (PYTHON, ["def", "add", "a", "b", "total", "a", "b", "return", "total"]),
    ("", []),
])
def test_words_in_every_script(text, expected):
    assert words(text) == expected


def test_unspaced_words_are_told_apart():
    assert is_unspaced("北") and is_unspaced("ก่") and is_unspaced("テ")
    assert not is_unspaced("river") and not is_unspaced("서울은")


@pytest.mark.parametrize(("text", "count", "expected"), [
    ("The river flows north, then east.", 2, "The river"),
    # Punctuation after the last word is not part of the opening.
    ("Paris (French: Paris) is a city", 3, "Paris (French: Paris"),
    ("这本书是对所准备又收教了。", 4, "这本书是"),
    ("東京 は 大きい", 2, "東京"),
    ("one two", 2, None),  # nothing left to continue
    ("one two three", 2, "one two"),
    ("    return total\n", 1, "    return"),
])
def test_openings_end_after_a_count_of_words_and_leave_something(text, count, expected):
    assert opening(text, count) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("It ended.", True),
    ("Did it end?", True),
    ("He said “stop.”", True),
    ("(See below.)", True),
    ("它结束了。", True),
    ("真的吗？", True),
    ("太好了！", True),
    ("他说：“好。”", True),
    ("「終わり。」", True),
    ("यह समाप्त हुआ।", True),
    ("هل انتهى؟", True),
    ("Wait for it…", True),
    ("and then the", False),
    ("北京是中国的", False),
    ("", False),
])
def test_sentence_ends_in_every_script(text, expected):
    assert ends_sentence(text) is expected


def test_code_ends_at_a_line_or_statement_end():
    assert ends_line_of_code("    return total\n")
    assert ends_line_of_code("x = f(a);")
    assert ends_line_of_code("if ready:  ")
    assert ends_line_of_code("}")
    assert not ends_line_of_code("    return tot")
    assert not ends_line_of_code("x = a +")


def test_code_is_told_from_prose():
    assert looks_like_code(PYTHON)
    assert looks_like_code("int main() { return 0; }")
    assert looks_like_code("fn main() {\n\tprintln!(\"hi\");\n}\n")
    assert not looks_like_code("The river (a long one) flows north; then it turns east.")
    assert not looks_like_code("北京是中国的首都，也是一座历史悠久的城市。")
    assert not looks_like_code("")
    # An indented paragraph of a book, a quotation: prose all the same.
    assert not looks_like_code("  It was a dark night, and the rain fell.\nShe waited.")
    assert not looks_like_code("He wrote:\n    Dear friend, I am well.\n    Yours, J.")


@pytest.mark.parametrize(("text", "expected"), [
    ("The river is long. It flows north!  Does it? Yes.",
     ["The river is long.", "It flows north!", "Does it?", "Yes."]),
    # Not an end: a lowercase word goes on, and a stop with no space after it.
    ("It costs 3.5 dollars, e.g. the price of tea at example.com today. Then more.",
     ["It costs 3.5 dollars, e.g. the price of tea at example.com today.", "Then more."]),
    # An abbreviation before a capital is taken for an end (no word lists, any language).
    ("Born in St. Louis in 1900.", ["Born in St.", "Louis in 1900."]),
    ('He said "Stop." Then (quietly) left.', ['He said "Stop."', "Then (quietly) left."]),
    ("北京是中国的首都。它有三千多年的历史！你去过吗？",
     ["北京是中国的首都。", "它有三千多年的历史！", "你去过吗？"]),
    ("「行こう。」と彼は言った。", ["「行こう。」", "と彼は言った。"]),
    ("Привет, мир. Как дела?", ["Привет, мир.", "Как дела?"]),
    ("  A first paragraph.\n\nA second one, no stop", ["A first paragraph.",
                                                       "A second one, no stop"]),
    (PYTHON, ["def add(a, b):", "total = a + b", "return total"]),  # code: its lines
    ("No end at all", ["No end at all"]),
    (" \n ", []),
])
def test_sentences_in_every_script_and_lines_in_code(text, expected):
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == expected
    for (_, end), (start, _) in itertools.pairwise(spans):  # only spacing between them
        assert not text[end:start].strip()
