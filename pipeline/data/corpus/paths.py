"""Corpus paths: the format a file name says, how a document's source says it was cut, and
the walk over a folder corpus (sorted, hidden names skipped, ``data.include`` globs)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pipeline.core.errors import GptpipeError

# suffix -> structured format; a file with any other suffix (or none) is plain text, "txt".
FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",  # an Arrow IPC stream or file (pipeline.data.corpus.arrow)
}
COMPRESSIONS: dict[str, str] = {".gz": "gz", ".zst": "zst"}
# Formats whose files are UTF-8 text, hence checked for binary content first.
TEXT_FORMATS = frozenset({"txt", "jsonl", "json", "csv"})
POINTER_SUFFIX = ".corpus"


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
