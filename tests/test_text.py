"""The pure cleaning rules of pipeline/data/text.py, each against hand-written strings."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from pipeline.data.text import (
    INVISIBLE_CHARS,
    JOINERS,
    SPACE_SEPARATORS,
    clean_document,
    dedup_key,
    normalize_line_breaks,
    normalize_unicode,
    normalize_whitespace,
    remove_invisible,
    remove_stray_joiners,
    word_shingles,
)


def test_line_breaks_become_newlines() -> None:
    text = "a\r\nb\rc\nd\x0be\x0cf\x85g\u2028h\u2029i"
    assert normalize_line_breaks(text) == "a\nb\nc\nd\ne\nf\ng\nh\ni"
    # "\r\n" is one break, not two.
    assert normalize_line_breaks("x\r\n\r\ny") == "x\n\ny"


def test_remove_invisible_deletes_controls_and_zero_width() -> None:
    text = "a\x00b\x07c\x1bd\x7fe\x9ff\u200bg-\u200ch.\u200di\u2060j\ufeffk\u00adl"
    assert remove_invisible(text) == ("abcdefg-h.ijkl", 11)


# Joiners that are part of the text: a Persian word (ZWNJ between prefix and verb), a
# Hindi conjunct kept as a half form (KA, VIRAMA, ZWJ, SSA), a Malayalam chillu at a
# word's end (NA, VIRAMA, ZWJ, then a space), and emoji sequences (WOMAN ZWJ LAPTOP; a
# rainbow flag: WHITE FLAG, VARIATION SELECTOR-16, ZWJ, RAINBOW; a skin tone, then ZWJ).
SPELLED_WITH_JOINERS = [
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "\u0915\u094d\u200d\u0937",
    "\u0d28\u0d4d\u200d \u0d15",
    "\U0001f469\u200d\U0001f4bb",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f469\U0001f3fd\u200d\U0001f52c",
]


@pytest.mark.parametrize("text", SPELLED_WITH_JOINERS)
def test_joiners_that_spell_a_word_or_an_emoji_are_kept(text: str) -> None:
    assert remove_stray_joiners(text) == (text, 0)
    assert remove_invisible(text) == (text, 0)
    assert clean_document(f"Before {text} after.", "NFKC") == (f"Before {text} after.", 0)


@pytest.mark.parametrize(("text", "kept"), [
    # Wikipedia's templates, as in the builtin English corpus: beside dashes and digits.
    ("(509\u200d\u2013\u200d27 BC)", "(509\u201327 BC)"),
    ("\u2212\u200d(\u22123) = 3", "\u2212(\u22123) = 3"),
    ("shadow.\u200d\u200d Lunar", "shadow. Lunar"),
    ("bonds\u2060\u200d\u2014\u200dthat", "bonds\u2014that"),
    # At the edges of a text, beside a space, doubled between letters.
    ("\u200cword\u200d", "word"),
    ("a \u200c b", "a  b"),
    ("a\u200d\u200db", "ab"),
])
def test_joiners_that_join_nothing_are_deleted(text: str, kept: str) -> None:
    assert remove_invisible(text)[0] == kept


def test_remove_invisible_keeps_newline_tab_and_visible_text() -> None:
    text = "line\tone\nline two: é, 日本, 👍"
    assert remove_invisible(text) == (text, 0)


def test_normalize_unicode_nfc_versus_nfkc() -> None:
    decomposed = "e\u0301 \ufb01 \u2460 \uff21"  # e + combining acute, ligature fi, ①, fullwidth A
    assert normalize_unicode(decomposed, "NFC") == "é \ufb01 \u2460 \uff21"
    assert normalize_unicode(decomposed, "NFKC") == "é fi 1 A"


def test_normalize_whitespace_rules() -> None:
    text = "  a \t b\u00a0\u3000c  \n\n\n\n  d  \n \n e\u2003 \n\n\n"
    assert normalize_whitespace(text) == "a b c\n\nd\n\ne"


def test_normalize_whitespace_keeps_single_blank_line() -> None:
    assert normalize_whitespace("p1\n\np2\nl2") == "p1\n\np2\nl2"
    assert normalize_whitespace("p1\n \t \np2") == "p1\n\np2"


def test_space_separators_are_exactly_unicode_zs() -> None:
    zs = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Zs")
    assert zs == SPACE_SEPARATORS


def test_invisible_chars_are_the_documented_four_and_the_joiners_two() -> None:
    assert sorted(INVISIBLE_CHARS) == sorted("\u200b\u2060\ufeff\u00ad")
    assert JOINERS == "\u200c\u200d"


def test_clean_document_composes_all_rules() -> None:
    raw = "\ufeffTitle\r\n\r\n\r\n\x00Caf\u200be\u0301 \ufb01ne\u00a0day\t\r\nend  "
    assert clean_document(raw, "NFKC") == ("Title\n\nCafé fine day\nend", 3)
    assert clean_document(raw, "NFC")[0] == "Title\n\nCafé \ufb01ne day\nend"


def test_clean_text_of_whitespace_only_is_empty() -> None:
    assert clean_document(" \r\n\t\u200b\u3000\n ", "NFKC")[0] == ""


def test_clean_text_is_idempotent() -> None:
    raw = " A\u00a0\u00a0b\r\n\r\n\r\nc\u200d\u0301 "
    once = clean_document(raw, "NFKC")[0]
    assert clean_document(once, "NFKC")[0] == once


def test_dedup_key_is_16_byte_blake2b() -> None:
    assert dedup_key("hello") == bytes.fromhex("46fb7408d4f285228f4af516ea25851b")
    assert len(dedup_key("")) == 16
    assert dedup_key("hello") != dedup_key("hello ")


def test_word_shingles() -> None:
    text = "The cat sat. the CAT sat."
    # Words as pipeline.data.units counts them: punctuation is not part of a word.
    assert word_shingles(text, 2) == [b"the cat", b"cat sat", b"sat the"]
    # A Chinese text gets shingles of characters, not one shingle for the whole run.
    assert word_shingles("北京是北京", 2) == [w.encode() for w in ("北 京", "京 是", "是 北")]
    assert word_shingles("one two", 5) == [b"one two"]
    assert word_shingles(" \n ", 3) == []
    assert word_shingles("café crème", 1) == ["café".encode(), "crème".encode()]


def test_word_shingles_rejects_zero_length() -> None:
    with pytest.raises(ValueError, match="shingle length"):
        word_shingles("a b", 0)
