"""Words, sentence ends and openings, counted the same way for every script and for code.

gptpipe never assumes English or spaces. Where it counts words (the gold judge's length,
repetition and overlap rules, the evaluate stage's prompt openings, near-duplicate
shingles) it uses :func:`words`:

- in scripts written with spaces (Latin, Cyrillic, Greek, Arabic, Hangul, ...) a word is
  a run of letters, digits and marks, with inner apostrophes ("don't" is one word); in
  code that is an identifier or a number;
- in scripts written without spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar,
  Tibetan) each character, with the combining marks on it, is a word: no segmenter is
  needed, and a Chinese word is one or two characters anyway;
- ``<unk>`` is one word.

Sentence ends (:func:`ends_sentence`) include the full stops, question and exclamation
marks of those scripts (``。！？``, full-width and half-width forms, ``।``, ``؟``, ...),
followed by any closing quotes or brackets. :func:`looks_like_code` tells source code
from prose by its lines' indentation and symbols.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# Scripts written without spaces between words: each character is a word. Han (with its
# extensions and compatibility forms), Hiragana, Katakana (and half-width forms), Thai,
# Lao, Tibetan, Myanmar, Khmer.
_UNSPACED = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
    "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
    "\u0e00-\u0e7f\u0e80-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
)
# Combining marks that ride on a base character of those scripts (Thai vowels and tone
# marks, Myanmar and Khmer signs, kana voicing marks, ...): part of their character.
_MARKS = (
    "\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1\u0eb4-\u0ebc\u0ec8-\u0ecd\u0f71-\u0f84"
    "\u102b-\u103e\u1056-\u1059\u105e-\u1060\u1062-\u1064\u1067-\u106d\u1071-\u1074"
    "\u1082-\u108d\u108f\u109a-\u109d\u17b6-\u17d3\u17dd\u3099\u309a\u0300-\u036f"
)
_SPACED_CHAR = rf"(?:(?![{_UNSPACED}])\w)"
_WORD = re.compile(
    rf"<unk>|[{_UNSPACED}][{_MARKS}]*|{_SPACED_CHAR}+(?:['’]{_SPACED_CHAR}+)*"
)
_UNSPACED_CHAR = re.compile(rf"[{_UNSPACED}]")

# Terminal punctuation of a sentence: . ! ? and their counterparts in other scripts
# (ideographic and full-width full stop, question and exclamation marks; the half-width
# ideographic full stop; Devanagari danda and double danda; Arabic and Urdu question mark
# and full stop; Armenian full stop; Ethiopic full stop; Myanmar and Khmer sentence
# marks; the ellipsis), then any closing quotes or brackets (Western and CJK).
_TERMINALS = ".!?。！？．｡।॥؟۔։።၊။។៕…‼⁇⁈⁉"
_CLOSERS = "\"'”’»)\\]}」』）】》〉〕〗〙〛］｝"
_SENTENCE_END = re.compile(f"[{re.escape(_TERMINALS)}][{re.escape(_CLOSERS)}]*\\Z")

# A run of terminal punctuation and closers that may end a sentence inside a text; the
# full-width and ideographic marks end one even with no space after them (Chinese and
# Japanese put none between sentences).
_SENTENCE_MARKS = re.compile(f"[{re.escape(_TERMINALS)}]+[{re.escape(_CLOSERS)}]*")
_UNSPACED_TERMINALS = "。！？．｡"

# What ends a line or statement of code: a newline, or ; } ) ] : at the very end.
_CODE_END = re.compile(r"(?:\n|[;})\]:])[ \t]*\Z")
_INDENTED = re.compile(r"^(?: {2,}|\t)\S", re.MULTILINE)
_CODE_SYMBOLS = re.compile(r"[{}();=<>\[\]]|::|->|=>|//|#include|\bdef\b|\breturn\b")


def iter_words(text: str) -> Iterator[re.Match[str]]:
    """The words of ``text`` (see the module docstring) as regex matches, in order."""
    return _WORD.finditer(text)


def words(text: str) -> list[str]:
    """The words of ``text``, as written."""
    return _WORD.findall(text)


def is_unspaced(word: str) -> bool:
    """Whether a word of :func:`words` is a character of a script written without spaces."""
    return bool(_UNSPACED_CHAR.match(word))


def opening(text: str, count: int) -> str | None:
    """``text`` up to the end of its ``count``-th word, as written (spaces kept), or None
    when the text has no word after that one: an opening must leave something to
    continue, or a model asked to continue it can only end the document."""
    ends = []
    for match in iter_words(text):
        ends.append(match.end())
        if len(ends) > count:
            return text[: ends[count - 1]]
    return None


def ends_sentence(text: str) -> bool:
    """Whether ``text``, stripped, ends with terminal punctuation in any script."""
    return _SENTENCE_END.search(text.strip()) is not None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``, in order, surrounding whitespace left out
    (``text[end:next_start]`` is what separates two sentences).

    A sentence ends at terminal punctuation of any script (then any closing quotes or
    brackets) followed by whitespace and then a character that is not a lowercase letter
    ("e.g. the" goes on, "3.5" and "example.com" too), or at a full-width or ideographic
    terminal (。！？) with or without a space after it. The text's end closes the last
    sentence, terminal or not. Code (:func:`looks_like_code`) has no sentences: its
    non-blank lines stand for them. An abbreviation before a capital ("St. Louis") is
    taken for an end: the rule needs no word lists, so it holds for every language.
    """
    if looks_like_code(text):
        spans, offset = [], 0
        for line in text.split("\n"):
            if line.strip():
                start = offset + len(line) - len(line.lstrip())
                spans.append((start, offset + len(line.rstrip())))
            offset += len(line) + 1
        return spans
    spans, start = [], len(text) - len(text.lstrip())
    for mark in _SENTENCE_MARKS.finditer(text, start):
        end = mark.end()
        following = text[end:]
        gap = len(following) - len(following.lstrip())
        after = following[gap : gap + 1]
        if not after:
            break  # the text's end closes the last sentence
        unspaced = any(char in _UNSPACED_TERMINALS for char in mark.group())
        if (gap == 0 and not unspaced) or after.islower():
            continue
        spans.append((start, end))
        start = end + gap
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def ends_line_of_code(text: str) -> bool:
    """Whether ``text`` ends at the end of a line or a statement (a newline, or ; } ) ] :
    at the end, trailing spaces aside)."""
    return _CODE_END.search(text) is not None


def looks_like_code(text: str) -> bool:
    """Whether ``text`` reads as source code: at least one character in ten is a code
    symbol ({ } ( ) ; = < > [ ] :: -> => // #include def return), or one in forty is and
    at least one line in ten of its non-blank lines is indented (two spaces or a tab).
    Prose has neither: a bracketed aside or a semicolon is one character in fifty or
    fewer, and an indented paragraph of a book has almost none."""
    text = text.replace("<unk>", "")
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return False
    symbols = len(_CODE_SYMBOLS.findall(text))
    size = len(text.strip())
    if symbols * 10 >= size:
        return True
    return symbols * 40 >= size and len(_INDENTED.findall(text)) * 10 >= len(lines)
