"""The size limits of the corpus readers, in one place.

Each bounds what a reader holds in memory at once, so that a corpus file with a 2 GB line,
a gzip or zstd bomb, or a JSON file larger than memory is refused in one line naming the
file and the limit, early, instead of ending in an out-of-memory kill that says nothing.
They are far above any reasonable corpus: the longest books are a few million characters
(the complete works of Shakespeare: 5.5 million, Webster's unabridged dictionary: 28
million), and a document is what a model learns from, seen a context window at a time.
"""

from __future__ import annotations

from pipeline.core.io import MAX_JSON_BYTES

# One document's text, in characters: a whole text file, a paragraph, a line, a JSON,
# CSV or Parquet record's text field.
MAX_DOCUMENT_CHARS = 64 * 2**20
# One line of a file read line by line (a JSONL record, a CSV row, a line of text), its
# line end included. Larger than a document: a JSON line holds escapes (json.dumps writes a
# Chinese character as a 6-character \uXXXX escape) and other fields beside the text.
MAX_LINE_CHARS = 256 * 2**20
# A whole-JSON corpus file (.json, parsed whole), in decompressed bytes counted as they
# stream, so that a compressed bomb stops after this many: the limit of every JSON file
# gptpipe reads whole. Anything larger belongs in JSONL, which is read as a stream.
MAX_JSON_FILE_BYTES = MAX_JSON_BYTES


def too_long(where: str, what: str, limit: int, unit: str, allowed: str) -> str:
    """The one-line refusal of ``what`` (a line, a paragraph, a document ...) of the file
    ``where``, longer than ``limit`` ``unit``; ``allowed`` says what would be read."""
    return (f"{where}: {what} is longer than {limit:,} {unit}, the limit of the corpus "
            f"readers; allowed: {allowed}")
