"""Planning the reads of ``data.corpus``: which files, in which unit (``data.txt_unit``),
and cut into which byte ranges, so that worker processes can read them side by side and
still give the documents a single reader gives, in the same order."""

from __future__ import annotations

import contextlib
import mmap
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from pipeline.core.errors import GptpipeError
from pipeline.core.params import DataParams
from pipeline.data.corpus.decoding import BINARY_PROBE_BYTES, looks_binary
from pipeline.data.corpus.paths import TEXT_FORMATS, detect_format, iter_corpus_files
from pipeline.data.corpus.streams import OnRead, no_progress, read_head

ALLOWED_CORPUS = (
    "a file or directory of text files (any text; jsonl, json, csv and parquet by field; "
    "optionally .gz/.zst) or data/builtin/*.corpus"
)

# txt_unit auto: a text file larger than this (stored size) is far larger than a document
# (a long encyclopedia article is tens of KB): it is read in paragraphs, not whole.
AUTO_PARAGRAPH_BYTES = 1 << 20
# txt_unit auto: a corpus of fewer plain-text files than this (a single file, a folder of
# three manuals or books) is read in paragraphs, since its files read whole would give the
# split too few documents: each of val and test (0.1 by default) comes out empty with a
# chance of 0.9**files, 35% for 10 files, 4% for 30, 0.5% for 50.
AUTO_WHOLE_FILES = 50

# Ingest's unit of parallel work: a file up to this size goes to a worker whole, a bigger
# plain-text or JSONL file in stretches of lines of about this size. Bounded so that the
# documents in flight (two tasks per worker) stay small beside a worker's own memory.
RANGE_BYTES = 4 << 20


@dataclass
class CorpusStats:
    """What :func:`~pipeline.data.corpus.reading.iter_documents` read and skipped; its
    fields are the ingest metrics."""

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


def text_unit(requested: str, size: int, few_files: bool) -> str:
    """The unit a plain-text file is read in: ``data.txt_unit``, or for ``auto``
    paragraphs when the corpus holds few text files (:data:`AUTO_WHOLE_FILES`) or the file
    is far larger than a document (:data:`AUTO_PARAGRAPH_BYTES`), else the whole file."""
    if requested != "auto":
        return requested
    return "paragraph" if few_files or size > AUTO_PARAGRAPH_BYTES else "file"


def auto_unit_reason(stats: CorpusStats) -> str:
    """Why ``txt_unit: auto`` read the corpus's plain-text files as it did (for ingest's
    report), from the counts :func:`text_unit`'s choices left in ``stats``."""
    text_files = stats.text_files_whole + stats.text_files_in_paragraphs
    if text_files < AUTO_WHOLE_FILES:
        return (f"a corpus of fewer than {AUTO_WHOLE_FILES} text files is read in "
                "paragraphs, so that the split gets enough documents; data.txt_unit: file "
                "reads each file whole")
    return (f"files over {AUTO_PARAGRAPH_BYTES // 2**20} MiB are read in paragraphs, the "
            "others whole")


def _few_text_files(root: Path, params: DataParams) -> bool:
    """Whether the folder ``root`` holds fewer than :data:`AUTO_WHOLE_FILES` plain-text
    files (binary ones aside): a walk that stops once it has counted that many. A file
    that cannot be read is not counted; planning reports it in its turn."""
    count = 0
    for relative in iter_corpus_files(root, params.include):
        path = root / relative
        fmt, compression = detect_format(path.name)
        if fmt != "txt":
            continue
        with contextlib.suppress(GptpipeError):
            if not _is_binary(path, compression, params.codec):
                count += 1
        if count >= AUTO_WHOLE_FILES:
            return False
    return True


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


def _plan_file(path: Path, source: str, params: DataParams, stats: CorpusStats,
               corpus_files: tuple[bool, bool], range_bytes: int, on_read: OnRead
               ) -> Iterator[ReadTask]:
    """The tasks that read one file; a binary file is counted (or, in a single-file corpus,
    an error) and its bytes reported to ``on_read`` as done. ``corpus_files``: whether the
    corpus is this single file, and whether it holds few text files (:func:`text_unit`)."""
    single, few_files = corpus_files
    size = path.stat().st_size
    fmt, compression = detect_format(path.name)
    if fmt in TEXT_FORMATS and _is_binary(path, compression, params.codec):
        if single:
            raise GptpipeError(
                f"data.corpus: {path.as_posix()} is not text in data.encoding = "
                f"{params.encoding} (a NUL byte, or mostly bytes invalid in {params.codec} "
                f"or control bytes, in its first {BINARY_PROBE_BYTES} bytes); allowed: "
                "text in data.encoding (set it to the file's encoding: shift_jis, gb18030, "
                "big5, latin-1, cp1252 ...)"
            )
        stats.files_skipped_binary += 1
        on_read(size)
        return
    unit = text_unit(params.txt_unit, size, few_files) if fmt == "txt" else "file"
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
               on_read: OnRead = no_progress) -> Iterator[ReadTask]:
    """The read tasks of ``params.corpus`` in corpus order (a builtin pointer is read by
    :func:`~pipeline.data.corpus.builtin.read_builtin`, not planned); ``stats`` counts the
    files as they are planned."""
    root = Path(params.corpus)
    if root.is_dir():
        matched = 0
        few = params.txt_unit == "auto" and _few_text_files(root, params)
        for relative in iter_corpus_files(root, params.include):
            matched += 1
            yield from _plan_file(root / relative, relative, params, stats, (False, few),
                                  range_bytes, on_read)
        if matched == 0:
            raise GptpipeError(
                f"data.corpus: {params.corpus}: no file matches data.include = "
                f"{params.include!r} (hidden files and folders are skipped); "
                "allowed: a glob that matches at least one file"
            )
    elif root.is_file():
        # A single file is its own corpus root: its source is its bare name.
        yield from _plan_file(root, root.name, params, stats, (True, True), range_bytes,
                              on_read)
    else:
        raise GptpipeError(f"data.corpus: {params.corpus} not found; allowed: {ALLOWED_CORPUS}")


def _is_binary(path: Path, compression: str | None, codec: str) -> bool:
    try:
        return looks_binary(read_head(path, compression), codec)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
        what = {"gz": "gzip", "zst": "zstandard"}.get(compression or "", "a file")
        raise GptpipeError(
            f"{path.as_posix()}: could not read it as {what} ({err}); allowed: a readable file"
        ) from None
