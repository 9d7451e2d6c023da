"""Document tables: the Parquet files that ingest, clean and split pass along.

A document table is a directory holding ``part-00000.parquet`` (one file, many row
groups) with at least the columns ``id`` (int64, the document's position in the corpus),
``source`` (where it came from) and ``text`` (UTF-8). Writers stream row groups and
readers stream record batches, so no stage holds a whole corpus in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError

PART_NAME = "part-00000.parquet"

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)
# The raw table also counts the bytes replaced while decoding invalid UTF-8.
RAW_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("invalid_bytes", pa.int64(), nullable=False))

# Row groups of about this many documents keep writer and reader memory small.
ROWS_PER_GROUP = 4096


class DocumentWriter:
    """Append documents to ``<directory>/part-00000.parquet`` in bounded row groups.

    Output is byte-for-byte deterministic for the same rows: fixed row-group size, zstd,
    no pandas metadata, no timestamps.
    """

    def __init__(self, directory: Path, schema: pa.Schema = DOCUMENT_SCHEMA) -> None:
        self.schema = schema
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._writer = pq.ParquetWriter(
            Path(directory) / PART_NAME,
            schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=["source"],
            write_statistics=["id"],
        )
        self.rows = 0

    def append(self, **row: object) -> None:
        for name, values in self._columns.items():
            values.append(row[name])
        self.rows += 1
        if len(self._columns["id"]) >= ROWS_PER_GROUP:
            self._flush()

    def extend(self, table: pa.Table | pa.RecordBatch) -> None:
        """Append every row of ``table`` (which has this writer's columns), exactly as
        appending them one by one would: the same row groups, the same bytes."""
        columns = {name: table.column(name).to_pylist() for name in self.schema.names}
        done = 0
        while done < table.num_rows:
            take = min(ROWS_PER_GROUP - len(self._columns["id"]), table.num_rows - done)
            for name, values in self._columns.items():
                values.extend(columns[name][done:done + take])
            self.rows += take
            done += take
            if len(self._columns["id"]) >= ROWS_PER_GROUP:
                self._flush()

    def _flush(self) -> None:
        if not self._columns["id"]:
            return
        table = pa.Table.from_pydict(self._columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        for values in self._columns.values():
            values.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table_path(directory: str | Path) -> Path:
    path = Path(directory) / PART_NAME
    if not path.is_file():
        raise GptpipeError(
            f"{directory}: no document table ({PART_NAME}); run the stage that writes it first"
        )
    return path


def open_table(directory: str | Path) -> pq.ParquetFile:
    """Open a document table; a corrupt file is a one-line error naming it.

    ``pre_buffer=False``: with Arrow's default prefetch, reading a file batch by batch
    keeps every row group's compressed columns until the file closes (about a third of
    the text read), so a stage's memory would grow with the corpus."""
    path = table_path(directory)
    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise GptpipeError(f"{path}: not a readable Parquet file ({err})") from None


def count_documents(directory: str | Path) -> int:
    return open_table(directory).metadata.num_rows


def iter_batches(
    directory: str | Path, columns: Sequence[str] = ("id", "source", "text"), batch_size: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream a document table as record batches of at most ``batch_size`` rows."""
    parquet = open_table(directory)
    path = table_path(directory)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise GptpipeError(
            f"{path}: column '{missing[0]}' missing; found: {', '.join(parquet.schema_arrow.names)}"
        )
    try:
        yield from parquet.iter_batches(batch_size=batch_size, columns=list(columns))
    except (pa.ArrowInvalid, OSError) as err:
        raise GptpipeError(f"{path}: not a readable Parquet file ({err})") from None


def read_row_groups(directory: str | Path, groups: Sequence[int],
                    columns: Sequence[str]) -> pa.Table:
    """Some row groups of a document table; a damaged file is a one-line error."""
    path = table_path(directory)
    try:
        return open_table(directory).read_row_groups(list(groups), columns=list(columns))
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise GptpipeError(f"{path}: not a readable document table ({err})") from None


def iter_texts(directory: str | Path, batch_size: int = 1024) -> Iterator[list[str]]:
    """Stream only the ``text`` column, as lists of Python strings."""
    for batch in iter_batches(directory, columns=("text",), batch_size=batch_size):
        yield batch.column(0).to_pylist()
