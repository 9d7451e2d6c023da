"""One reader per corpus format: plain text (whole, paragraphs or lines), JSONL, JSON, CSV
and Parquet, each turning an open stream into documents whose errors name the file (Arrow
has its own module, :mod:`pipeline.data.corpus.arrow`)."""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from pipeline.core.errors import GptpipeError
from pipeline.core.io import parse_json as io_parse_json
from pipeline.core.params import DataParams
from pipeline.data.corpus import limits
from pipeline.data.corpus.arrow import read_arrow
from pipeline.data.corpus.decoding import RawDocument, make_document
from pipeline.data.corpus.streams import OnRead, no_progress, open_parquet, open_text

PARQUET_BATCH_ROWS = 1024


def _shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_lines(stream: TextIO, where: str, first_line: int = 1) -> Iterator[str]:
    """The lines of ``stream``, line ends kept, as iterating it gives them, but a line of
    more than :data:`~pipeline.data.corpus.limits.MAX_LINE_CHARS` characters is refused
    after reading that many, not held whole (a 2 GB line, a bomb with no line break)."""
    limit = limits.MAX_LINE_CHARS
    number = first_line
    while line := stream.readline(limit + 1):
        if len(line) > limit:
            raise GptpipeError(limits.too_long(
                where, f"line {number}", limit, "characters",
                "lines of at most that many characters (one record or document each)"))
        yield line
        number += 1


def read_paragraphs(lines: Iterable[str], source: str, first_line: int = 1,
                    where: str = "") -> Iterator[RawDocument]:
    """One document per blank-line-separated paragraph, source ``<source>:<first line>``
    (lines are numbered from ``first_line``, the number of the first one given).

    Lines holding only whitespace separate paragraphs too. Only the current paragraph is
    held in memory, and one longer than a document may be (``limits.MAX_DOCUMENT_CHARS``)
    is refused as soon as it is; errors name ``where`` (by default ``source``).
    """
    limit = limits.MAX_DOCUMENT_CHARS
    paragraph: list[str] = []
    first = size = 0
    for number, line in enumerate(lines, start=first_line):
        if line.strip():
            if not paragraph:
                first, size = number, 0
            paragraph.append(line)
            size += len(line)
            # The paragraph's text so far: its last line end will not be part of it.
            if size - (1 if line.endswith("\n") else 0) > limit:
                raise GptpipeError(limits.too_long(
                    where or source, f"the paragraph from line {first}", limit, "characters",
                    "blank lines between paragraphs, or data.txt_unit: line"))
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


def read_txt(stream: TextIO, source: str, unit: str, first_line: int = 1, where: str = ""
             ) -> Iterator[RawDocument]:
    """A plain-text file: the whole file as one document (``unit='file'``), blank-line
    paragraphs or lines; errors name ``where`` (by default ``source``)."""
    where = where or source
    if unit == "paragraph":
        yield from read_paragraphs(bounded_lines(stream, where, first_line), source,
                                   first_line, where)
    elif unit == "line":
        yield from read_lines(bounded_lines(stream, where, first_line), source, first_line)
    else:
        # One document per file is held whole by definition; the other units stream.
        limit = limits.MAX_DOCUMENT_CHARS
        text = stream.read(limit + 1)
        if len(text) > limit:
            raise GptpipeError(limits.too_long(
                where, "the file, read whole as one document,", limit, "characters",
                "data.txt_unit: paragraph or line, to read it in parts"))
        yield make_document(source, text)


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


def json_cap(where: str) -> tuple[int, str]:
    """The decompressed bytes a .json corpus file may hold, and the refusal beyond them
    (``cap`` of :func:`~pipeline.data.corpus.streams.open_text`)."""
    limit = limits.MAX_JSON_FILE_BYTES
    return limit, limits.too_long(
        where, "the file (decompressed)", limit, "bytes",
        "a .json file of at most that size (it is parsed whole), or the records as JSONL, "
        "one object per line, which is read as a stream")


def read_json(stream: TextIO, source: str, text_field: str, where: str) -> Iterator[RawDocument]:
    """A .json file (parsed whole): one document per record, source ``<source>#<index>``.
    Open it with :func:`json_cap`: it is read whole."""
    data = parse_json(stream.read(), where)
    for index, (_, text) in enumerate(json_records(data, text_field, where)):
        yield make_document(f"{source}#{index}", text)


def read_csv(stream: TextIO, source: str, text_field: str, where: str) -> Iterator[RawDocument]:
    """One document per CSV record after the header, source ``<source>:<first line>``.

    ``stream`` must be opened with ``newline=''`` so quoted fields keep their line breaks.
    A field may be a document long (``limits.MAX_DOCUMENT_CHARS``), far beyond the csv
    module's default of 128 KiB.
    """
    csv.field_size_limit(limits.MAX_DOCUMENT_CHARS)
    reader = csv.reader(bounded_lines(stream, where))
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
        if "field larger than field limit" in str(err):
            raise GptpipeError(limits.too_long(
                where, f"a field of the record ending at line {reader.line_num}",
                limits.MAX_DOCUMENT_CHARS, "characters",
                "fields of at most that many characters (one document each)")) from None
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
    on_read: OnRead = no_progress,
    unit: str = "file",
    byte_range: tuple[int, int, int] | None = None,
) -> Iterator[RawDocument]:
    """The documents of one corpus file in format ``fmt`` (a plain-text one in ``unit``:
    file, paragraph or line); errors name ``path``. ``byte_range`` ``(start, end,
    first_line)`` reads only a stretch of lines of a plain-text or JSONL file, numbered
    from ``first_line`` (see :func:`~pipeline.data.corpus.planning.plan_ranges`)."""
    where = path.as_posix()
    if fmt == "arrow":
        if compression is not None:
            raise GptpipeError(f"{where}: a compressed Arrow file; allowed: an uncompressed "
                               ".arrow file (it is memory-mapped)")
        yield from read_arrow(path, source, params.text_field, on_read)
        return
    try:
        if fmt == "parquet":
            with open_parquet(path, compression, on_read) as parquet:
                yield from read_parquet(parquet, source, params.text_field, where)
            return
        newline = "" if fmt == "csv" else None
        span = None if byte_range is None else byte_range[:2]
        first_line = 1 if byte_range is None else byte_range[2]
        cap = json_cap(where) if fmt == "json" else None
        with open_text(path, compression, on_read, newline, span, cap,
                       params.codec) as stream:
            if fmt == "txt":
                yield from read_txt(stream, source, unit, first_line, where)
            elif fmt == "jsonl":
                lines = bounded_lines(stream, where, first_line)
                yield from read_jsonl(lines, source, params.text_field, where, first_line)
            elif fmt == "json":
                yield from read_json(stream, source, params.text_field, where)
            else:
                yield from read_csv(stream, source, params.text_field, where)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException) as err:
        what = {"gz": "gzip", "zst": "zstandard"}.get(compression or "", fmt)
        raise GptpipeError(
            f"{where}: could not read it as {what} ({err}); allowed: a readable {what} file"
        ) from None
