"""Corpus readers: turn the file or directory named by ``data.corpus`` into documents.

Formats are told apart by suffix (case-insensitive), each optionally compressed with a
final ``.gz`` (gzip) or ``.zst`` (zstandard), e.g. ``part.jsonl.zst``:

- any file whose suffix is none of those below (``.txt``, ``.md``, source code such as
  ``.py`` or ``.c``, ``.rst``, ``.tex``, ``.log``, no suffix at all ...) is plain text
  when its bytes are text (:func:`~pipeline.data.corpus.decoding.looks_binary`): one
  document per file, per blank-line-separated paragraph or per line (``data.txt_unit``;
  ``auto``, the default, is explained at
  :func:`~pipeline.data.corpus.planning.text_unit`). Paragraphs and lines are read line
  by line, so a huge file is fine, and in stretches of lines by several processes at
  once (:func:`~pipeline.data.corpus.planning.plan_ranges`).
- ``.jsonl``: one JSON object per line, the text in field ``data.text_field``. This is the
  streaming format for big JSON corpora.
- ``.json``: a list of objects or an object whose values are objects. It is parsed whole,
  so keep it to files that fit in memory; use JSONL for anything big.
- ``.csv``: a header row, then one document per record (column ``data.text_field``).
- ``.parquet``: one document per row (column ``data.text_field``), read by record batch.
- ``.arrow``, and a folder Hugging Face ``datasets`` wrote with ``save_to_disk``: one
  document per row (column ``data.text_field``), memory-mapped, read by record batch
  (:mod:`~pipeline.data.corpus.arrow`). A Hub dataset name is refused: save it first.
- ``.corpus``: a builtin pointer, a small YAML file naming a data file that a pinned
  package ships (see data/builtin/); the package is located, never imported.

A directory corpus is walked in sorted order of relative POSIX path, skipping hidden names;
binary files are skipped and counted, never an error. Text files are read in
``data.encoding`` (UTF-8 by default; Parquet text is always UTF-8), and bytes invalid in
it are replaced with U+FFFD and counted (:mod:`~pipeline.data.corpus.decoding`).

Every reader holds a bounded amount at once: a longer line, document or JSON file (a
compression bomb included) is refused in one line naming the file and the limit
(:mod:`~pipeline.data.corpus.limits`).

The package's modules, from the bytes up: ``limits`` (the size limits), ``decoding``
(bytes to text, binary files), ``paths`` (formats by name, folder walks), ``streams``
(decompression, byte ranges), ``formats`` (one reader per format), ``arrow`` (Arrow
files and ``datasets`` folders), ``builtin`` (the
pinned package corpora), ``planning`` (what to read, in which unit and pieces) and
``reading`` (the whole corpus, in parallel). The names below are what the rest of
gptpipe uses.
"""

from pipeline.data.corpus.builtin import builtin_records, read_builtin
from pipeline.data.corpus.decoding import RawDocument
from pipeline.data.corpus.paths import source_unit
from pipeline.data.corpus.planning import RANGE_BYTES, CorpusStats, plan_ranges
from pipeline.data.corpus.reading import corpus_bytes, iter_documents

__all__ = [
    "RANGE_BYTES",
    "CorpusStats",
    "RawDocument",
    "builtin_records",
    "corpus_bytes",
    "iter_documents",
    "plan_ranges",
    "read_builtin",
    "source_unit",
]
