"""Pure text rules for the clean stage: normalization, invisible characters, whitespace,
dedup keys and the word shingles that MinHash near-duplicate detection hashes.

Every function here is deterministic and side-effect free, so the clean stage can run
it in any number of worker processes and still write the same bytes.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Literal

from pipeline.data import units

NormalizationForm = Literal["NFC", "NFKC"]

# Line breaks other than "\n". "\r\n" and "\r" are old Windows and Mac line ends. The
# others are breaks too (str.splitlines() honours them): deleting them, as the control
# rule below would for \v, \f and NEL, would glue the words on either side together.
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")

# Zero-width and invisible characters: they render as nothing, so two texts that look the
# same would get different dedup keys and the tokenizer would spend tokens on them.
INVISIBLE_CHARS = (
    "\u200b"  # ZERO WIDTH SPACE: an invisible line-break hint, common in scraped HTML.
    "\u2060"  # WORD JOINER: an invisible no-break hint.
    "\ufeff"  # BYTE ORDER MARK / ZERO WIDTH NO-BREAK SPACE: a file-encoding artifact.
    "\u00ad"  # SOFT HYPHEN: an invisible hyphenation hint that splits words for matching.
)
# ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER are part of the spelling of Persian words
# ("می\u200cخواهم" takes a ZWNJ between its prefix and verb), of Indic conjuncts and half
# forms, and of emoji sequences ("👩\u200d💻" is WOMAN, ZWJ, LAPTOP): deleting them changes the
# word or splits the emoji. They are kept wherever they can join or shape something
# (:func:`remove_stray_joiners`) and deleted only where they cannot: beside spaces,
# punctuation or digits (Wikipedia's templates leave them around dashes, as in
# "509\u200d–\u200d27 BC"), where they are as invisible as the characters above.
JOINERS = "\u200c\u200d"
_JOINER = re.compile(f"[{JOINERS}]")
# Unicode categories a joiner can join: letters, marks (vowel signs, viramas, emoji
# variation selectors) and the symbols that emoji and their modifiers are (So, Sk).
_JOINABLE = ("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "So", "Sk")

# Category Cc is exactly U+0000-U+001F and U+007F-U+009F. "\n" and "\t" stay for the
# whitespace rules; "\r" and the other line breaks are already "\n" when this runs.
_CONTROL_CHARS = "".join(
    chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"
)
_DELETE_TABLE = str.maketrans("", "", _CONTROL_CHARS + INVISIBLE_CHARS)

# Unicode category Zs (space separators), unchanged since Unicode 6.3; tests/test_text.py checks
# it against unicodedata, so a new Unicode version cannot silently add one.
SPACE_SEPARATORS = (
    " \u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u202f\u205f\u3000"
)
_SPACE_RUNS = re.compile(f"[\t{SPACE_SEPARATORS}]+")
# After runs are collapsed a line edge holds at most one space on each side.
_LINE_EDGE_SPACES = re.compile(" ?\n ?")
_BLANK_LINE_RUNS = re.compile("\n{3,}")
_TRAILING_SPACES = re.compile(f"[\t{SPACE_SEPARATORS}]+(?=\n|\\Z)")


def normalize_line_breaks(text: str) -> str:
    """Turn "\\r\\n", "\\r" and the other Unicode line breaks into "\\n"."""
    return _LINE_BREAKS.sub("\n", text)


def remove_invisible(text: str) -> tuple[str, int]:
    """Delete control (Cc, except "\\n" and "\\t") and zero-width characters, and the
    joiners that join nothing (:func:`remove_stray_joiners`).

    Returns the text and how many characters were deleted (the clean metrics report it).
    """
    kept = text.translate(_DELETE_TABLE)
    kept = remove_stray_joiners(kept)[0]
    return kept, len(text) - len(kept)


def _joins(text: str, index: int) -> bool:
    """Whether the joiner at ``text[index]`` sits where it can change the rendering: between
    two joinable characters (:data:`_JOINABLE`), or right after a mark (a virama at a
    word's end: Malayalam and other scripts spell half forms with virama + ZWJ)."""
    before = unicodedata.category(text[index - 1]) if index > 0 else ""
    after = unicodedata.category(text[index + 1]) if index + 1 < len(text) else ""
    return before.startswith("M") or (before in _JOINABLE and after in _JOINABLE)


def remove_stray_joiners(text: str) -> tuple[str, int]:
    """Delete each ZERO WIDTH (NON-)JOINER that cannot join anything (see :data:`JOINERS`);
    return the text and how many were deleted. A joiner beside another joiner joins
    nothing either: a doubled one is a leftover, and both go."""
    if "\u200c" not in text and "\u200d" not in text:  # the common case, at C speed
        return text, 0
    pieces, start, removed = [], 0, 0
    for match in _JOINER.finditer(text):
        if not _joins(text, match.start()):
            pieces.append(text[start:match.start()])
            start = match.end()
            removed += 1
    pieces.append(text[start:])
    return "".join(pieces), removed


def normalize_unicode(text: str, form: NormalizationForm) -> str:
    """Unicode normalization: NFC composes only; NFKC also folds compatibility forms."""
    return unicodedata.normalize(form, text)


def normalize_whitespace(text: str) -> str:
    """Tabs and space separators to one space, trimmed lines, at most one blank line.

    Expects "\\n" line breaks (see :func:`normalize_line_breaks`). Spaces are stripped at
    both ends of every line, and the whole text is stripped.
    """
    text = _SPACE_RUNS.sub(" ", text)
    text = _LINE_EDGE_SPACES.sub("\n", text)
    text = _BLANK_LINE_RUNS.sub("\n\n", text)
    return text.strip(" \n")


def trim_layout(text: str) -> str:
    """The whitespace rule for code and other preformatted text: indentation, tabs, runs
    of spaces and blank lines are kept as written (in code they carry meaning); only
    spaces at line ends and blank lines at the start and end of the text go."""
    text = _TRAILING_SPACES.sub("", text)
    return text.strip("\n")


def clean_document(text: str, form: NormalizationForm) -> tuple[str, int]:
    """Apply every cleaning rule; return the clean text and the characters removed.

    Invisible characters go before normalization so that, say, "e\\u200b\\u0301" can
    compose to "é"; whitespace rules come last because NFKC turns some characters
    (no-break and ideographic spaces, for one) into plain spaces. Code and other
    preformatted text (:func:`pipeline.data.units.looks_like_code`) keep their layout
    (:func:`trim_layout`); prose gets :func:`normalize_whitespace`.
    """
    text = normalize_line_breaks(text)
    text, removed = remove_invisible(text)
    text = normalize_unicode(text, form)
    if units.looks_like_code(text):
        return trim_layout(text), removed
    return normalize_whitespace(text), removed


def dedup_key(text: str) -> bytes:
    """A 16-byte blake2b digest of a cleaned text: equal keys mean equal texts.

    16 bytes make an accidental collision negligible (about 2**-64 even after 2**32
    documents) while the set of seen keys stays small.
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def word_shingles(text: str, n: int) -> list[bytes]:
    """The distinct word n-grams of ``text``, casefolded, UTF-8, in first-seen order.

    Words are :func:`pipeline.data.units.words` (a character of Chinese, Japanese or
    Thai is a word, so their texts get real shingles); casefolding lets a re-capitalized
    copy still match.
    A text with fewer than ``n`` words yields one shingle of all its words, so short texts
    still get a signature; an empty text yields none.
    """
    if n < 1:
        raise ValueError(f"shingle length must be >= 1, got {n}")
    words = units.words(text.casefold())
    if not words:
        return []
    count = max(len(words) - n + 1, 1)
    grams = (" ".join(words[i : i + n]).encode("utf-8") for i in range(count))
    return list(dict.fromkeys(grams))
