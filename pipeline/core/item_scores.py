"""Per-item score tables: the rows a stage's figures average (one per document, task
item, held-out pair or prompt), as small Parquet files that DVC versions beside the
metrics, so that two runs evaluated on the same items can be compared item by item.

Written atomically and deterministically (zstd, no pandas metadata, no timestamps), with
the table's kind and format version in the file's metadata (``gptpipe.scores``,
``gptpipe.version``); read back as numpy columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_path

FORMAT_VERSION = "1"


def text_hash(text: str) -> str:
    """A stable 16-hex-digit name of a text (its sha256's start): the same document or
    prompt has the same name in every run, whatever its position."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def write_item_scores(path: str | Path, kind: str,
                      columns: Mapping[str, Sequence[Any] | np.ndarray | pa.Array]) -> None:
    """Write ``columns`` (name -> equal-length values) as the Parquet table ``path``."""
    table = pa.table({name: _column(values) for name, values in columns.items()})
    table = table.replace_schema_metadata({"gptpipe.scores": kind,
                                           "gptpipe.version": FORMAT_VERSION})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=3)


def _column(values: Sequence[Any] | np.ndarray | pa.Array) -> pa.Array:
    """An Arrow column of ``values`` (an Arrow array keeps its type, even empty)."""
    if isinstance(values, pa.Array):
        return values
    return pa.array(values if isinstance(values, np.ndarray) else list(values))


def read_item_scores(source: str | Path | IO[bytes], where: str, kind: str
                     ) -> dict[str, np.ndarray]:
    """The columns of a table :func:`write_item_scores` wrote (``source``: a path or an
    open binary file; ``where`` names it in errors); one line when it is not one, or of
    another kind."""
    try:
        table = pq.read_table(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise GptpipeError(f"{where}: not a readable Parquet table ({err})") from None
    found = (table.schema.metadata or {}).get(b"gptpipe.scores", b"").decode()
    if found != kind:
        raise GptpipeError(f"{where}: a table of {found or 'unknown'} scores; expected "
                           f"{kind} scores")
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


def optional_paths(command: click.Command, *keywords: str) -> click.Command:
    """Make the path options ``keywords`` of a stage command optional: dvc.yaml always
    passes them (per-item tables it versions), a stage run by hand may leave them out
    and then writes no such table."""
    for option in command.params:
        if option.name in keywords:
            option.required = False
            option.default = None
    return command
