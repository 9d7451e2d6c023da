"""Bytes to text: how a corpus file's bytes become a document's text, and whether a file's
bytes are text at all.

Text is UTF-8, or the encoding ``data.encoding`` names (Shift_JIS, GB18030, Latin-1 ...).
Invalid bytes are decoded to lone surrogates (:func:`decode_errors`), so each one survives
CSV and JSON parsing; :func:`repair_text` then replaces them with U+FFFD and counts them
per document, which no codec error handler could do for a CSV record or a JSON value
spread over an arbitrary stretch of the stream.
"""

from __future__ import annotations

import codecs
import functools
import re
from dataclasses import dataclass

from pipeline.core.errors import GptpipeError
from pipeline.data.corpus import limits

# The first bytes (decompressed) that decide whether a file is text (looks_binary).
BINARY_PROBE_BYTES = 8192
# More than this share of non-text bytes in them (invalid UTF-8, control bytes) is binary:
# a text in a legacy 8-bit encoding (Latin-1, say) has a few percent, a binary file most.
BINARY_SHARE = 0.3

_SURROGATES = re.compile("[\ud800-\udfff]+")
# Lone surrogates that ``surrogateescape`` makes from the bytes 0x80-0xff.
_ESCAPED_BYTE_LOW = 0xDC80
_ESCAPED_BYTE_HIGH = 0xDCFF


@dataclass(frozen=True)
class RawDocument:
    """One document as read: where it came from, its text, and its replaced bytes."""

    source: str
    text: str
    invalid_bytes: int


# The error handler for encodings other than UTF-8 (see decode_errors).
_LEGACY_ERRORS = "gptpipe-invalid-byte"


def _each_byte_invalid(error: UnicodeError) -> tuple[str, int]:
    """Decode each byte a legacy codec cannot read to U+DCFF, what ``surrogateescape``
    makes of the byte 0xFF: invalid in UTF-8 in any context, so :func:`repair_text` turns
    each into one U+FFFD and counts one byte."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\udcff" * (error.end - error.start), error.end


@functools.cache
def decode_errors(codec: str) -> str:
    """The codec error handler that reads a file in ``codec`` (a canonical name):
    ``surrogateescape`` for UTF-8, whose escaped bytes :func:`repair_text` re-decodes into
    exactly the U+FFFD a replacing decode makes; for any other codec one that marks every
    byte it cannot read as one invalid byte, since re-decoding a Shift_JIS or GB18030
    stretch as UTF-8 could make a character of it."""
    if codec == "utf-8":
        return "surrogateescape"
    codecs.register_error(_LEGACY_ERRORS, _each_byte_invalid)
    return _LEGACY_ERRORS


def repair_text(text: str) -> tuple[str, int]:
    """Replace lone surrogates with U+FFFD; return the text and how many were replaced.

    Runs of escaped bytes (U+DC80-U+DCFF, from ``surrogateescape``) are re-decoded with
    ``errors='replace'``, so the U+FFFD characters come out exactly as a plain replacing
    decode would make them (one per maximal invalid sequence), while the count is of
    bytes. Any other lone surrogate can only come from a JSON ``\\uXXXX`` escape; UTF-8
    cannot hold it, so it becomes one U+FFFD and counts as one.
    """
    if _SURROGATES.search(text) is None:  # the common case, at C speed
        return text, 0
    count = 0

    def fix(match: re.Match[str]) -> str:
        nonlocal count
        run = match.group()
        count += len(run)
        pieces: list[str] = []
        escaped = bytearray()
        for char in run:
            code = ord(char)
            if _ESCAPED_BYTE_LOW <= code <= _ESCAPED_BYTE_HIGH:
                escaped.append(code - 0xDC00)
            else:
                pieces.append(escaped.decode("utf-8", "replace"))
                escaped.clear()
                pieces.append("\ufffd")
        pieces.append(escaped.decode("utf-8", "replace"))
        return "".join(pieces)

    return _SURROGATES.sub(fix, text), count


def make_document(source: str, text: str) -> RawDocument:
    """A :class:`RawDocument` from surrogate-escaped text, its invalid bytes counted.

    The source is repaired too (a file name or JSON key may hold invalid UTF-8), but its
    replacements are not counted: they are not part of the text. A text longer than
    ``limits.MAX_DOCUMENT_CHARS`` is refused, naming its source.
    """
    if len(text) > limits.MAX_DOCUMENT_CHARS:
        raise GptpipeError(limits.too_long(
            repair_text(source)[0], f"the document ({len(text):,} characters)",
            limits.MAX_DOCUMENT_CHARS, "characters",
            "documents of at most that many characters (split longer texts into records)"))
    fixed, invalid = repair_text(text)
    return RawDocument(source=repair_text(source)[0], text=fixed, invalid_bytes=invalid)


# C0 control bytes that no text holds (tab, line feed, form feed, carriage return and
# escape excepted).
_CONTROL_BYTES = bytes(set(range(32)) - {9, 10, 11, 12, 13, 27})


def looks_binary(head: bytes, codec: str = "utf-8") -> bool:
    """Whether the first bytes of a (decompressed) file are not text in ``codec``: a NUL
    byte (text in an ASCII-compatible encoding never holds one; UTF-16, which does, is not
    read), or more than :data:`BINARY_SHARE` of the bytes invalid in ``codec`` or control
    bytes."""
    if b"\x00" in head:
        return True
    if not head:
        return False
    decoder = codecs.getincrementaldecoder(codec)("replace")
    # final=False: a character cut by the probe's end is not counted as invalid.
    decoded = decoder.decode(head, final=False)
    # A U+FFFD the file itself holds is text, not an invalid byte.
    written = "\ufffd".encode(codec, "ignore")
    invalid = decoded.count("\ufffd") - (head.count(written) if written else 0)
    controls = sum(head.count(byte) for byte in _CONTROL_BYTES)
    return invalid + controls > BINARY_SHARE * len(head)
