"""JSON read from files that may be hostile: every way one can be wrong is one line.

A config, a tokenizer, a metrics file or a JSONL record may be cut, huge, nested a
hundred thousand levels deep or hold a 5,000-digit integer; the json module answers the
last two with RecursionError and ValueError, and a huge file with an out-of-memory kill.
Every JSON that gptpipe reads goes through :func:`parse_json` (whole files through
:func:`read_json`, JSONL through :func:`numbered_lines` and :func:`json_line`), which turn
all of them into one :class:`~pipeline.core.errors.GptpipeError` line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError

# Size limits on what is read whole into memory. Beyond them a file is refused with one line
# naming the file and the limit, instead of an out-of-memory kill that prints nothing.
# A JSON document (a config, a tokenizer, a metrics or meta file): the largest public
# tokenizer.json files are tens of MB.
MAX_JSON_BYTES = 256 * 2**20
# One record of a JSONL file (a document, a preference pair, an example, a task item).
MAX_JSONL_LINE_BYTES = 64 * 2**20
# Nesting depth of a JSON value: far beyond any real record, far below Python's recursion
# limit (a deeper value raises RecursionError inside the json module).
MAX_JSON_DEPTH = 200


def _too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a cheap pre-check: the
    json module's parser recurses once per level)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_json(text: str, where: str, allowed: str = "") -> Any:
    """The JSON value of ``text``; one :class:`GptpipeError` line naming ``where`` (and what
    is ``allowed``, when given) for anything that is not reasonable JSON: a syntax error,
    nesting deeper than :data:`MAX_JSON_DEPTH`, or an integer too long for Python to
    convert (both of which raise other errors than JSONDecodeError in the json module)."""
    tail = f"; allowed: {allowed}" if allowed else ""
    if _too_deep(text):
        raise GptpipeError(f"{where}: not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)"
                           f"{tail or '; allowed: ordinary records'}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GptpipeError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column "
                           f"{err.colno}){tail}") from None
    except RecursionError:
        raise GptpipeError(f"{where}: not valid JSON (nested too deeply)"
                           f"{tail or '; allowed: ordinary records'}") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise GptpipeError(f"{where}: not valid JSON ({err}){tail}") from None


def check_size(path: Path, limit: int, what: str = "file") -> None:
    """Refuse a file larger than ``limit`` bytes with one line naming it and the limit."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GptpipeError(f"{path}: {what} not found") from None
    if size > limit:
        raise GptpipeError(f"{path}: {what} of {size:,} bytes is over the limit of "
                           f"{limit:,} bytes that gptpipe reads whole")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of a whole file, refused in one line when missing, larger than
    ``limit`` bytes, not UTF-8 or not valid JSON (see :func:`parse_json`)."""
    path = Path(path)
    if path.is_dir():
        raise GptpipeError(f"{path}: is a directory; allowed: a JSON file")
    check_size(path, limit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptpipeError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise GptpipeError(f"{path}: not valid JSON ({err})") from None
    return parse_json(text, str(path))


def numbered_lines(path: Path, what: str,
                   limit: int = MAX_JSONL_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line ending) of every line of a JSONL
    file, read as a stream; ``what`` names the file in a one-line error when it is missing
    or a line is longer than ``limit`` bytes."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise GptpipeError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise GptpipeError(f"{path}: is a directory; allowed: a JSONL file") from None
    with stream:
        number = 0
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            number += 1
            if len(line) > limit and not line.endswith(b"\n"):
                raise GptpipeError(f"{path}: line {number} is longer than the limit of "
                                   f"{limit:,} bytes per record")
            line = line.removesuffix(b"\n")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as some editors write
            yield number, line.removesuffix(b"\r")


def json_line(where: str, line: bytes) -> Any:
    """The JSON value on one line (``where``: "file: line N"), None for a blank line; a
    one-line error for invalid UTF-8 or JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptpipeError(
            f"{where}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1}); "
            "allowed: UTF-8 text"
        ) from None
    if not text.strip():
        return None
    return parse_json(text, where)
