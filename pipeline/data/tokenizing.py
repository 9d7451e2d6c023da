"""Tokenizing the split document tables into token shards (:mod:`pipeline.data.shards`).

Memory is bounded by one batch of documents plus one shard: each split's documents are
streamed through the tokenizer batch by batch, in order, so the tokens are the same for
any number of encoding threads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError
from pipeline.core.progress import progress
from pipeline.data.doctable import count_documents, iter_batches, table_path
from pipeline.data.shards import ShardWriter
from pipeline.data.sources import SpanRecorder
from pipeline.data.tokenizer import TextTokenizer


def tokenize_split(
    tokenizer: TextTokenizer, split_dir: Path, writer: ShardWriter, batch_documents: int,
    spans: SpanRecorder | None = None,
) -> dict[str, int]:
    """Stream one split's documents through the tokenizer into ``writer``; its counts:
    documents, tokens, the text's UTF-8 bytes, shards, and ``token_bytes``, the sum of
    the bytes each token stands for (``TextTokenizer.byte_lengths``), which evaluation
    needs to count the bytes of a subset of the split. ``spans`` (several sources)
    records where each document's source lies in the stream."""
    documents = size = token_bytes = 0
    lengths = tokenizer.byte_lengths()
    columns = ("text", "source") if spans is not None else ("text",)
    with progress(total=count_documents(split_dir), desc=split_dir.name, unit="doc") as bar:
        for batch in iter_batches(split_dir, columns=columns, batch_size=batch_documents):
            column = batch.column(0)
            ids = tokenizer.encode_documents(column.to_pylist(), writer.dtype)
            if spans is not None:
                # Every document is <bos> ids <eos>: its length runs to the next <bos>.
                opens = np.flatnonzero(ids == tokenizer.bos_id)
                if len(opens) != batch.num_rows:
                    raise GptpipeError(f"{split_dir}: a document's text encodes to the "
                                       "<bos> token; the sources cannot be placed")
                spans.add(batch.column(1).to_pylist(), np.diff(opens, append=len(ids)),
                          writer.tokens)
            writer.append(ids)
            token_bytes += int(lengths[ids].sum())
            documents += batch.num_rows
            size += pc.sum(pc.binary_length(column)).as_py() or 0
            bar.update(batch.num_rows)
    writer.close()
    return {"documents": documents, "tokens": writer.tokens, "bytes": size,
            "shards": writer.shards, "token_bytes": token_bytes}


def _text_bytes(table: Path) -> int:
    """The uncompressed size of a document table's text column (Parquet's own count)."""
    try:
        metadata = pq.ParquetFile(table).metadata
        column = metadata.schema.names.index("text")
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        raise GptpipeError(f"{table}: not a readable document table ({err})") from None
    return sum(metadata.row_group(g).column(column).total_uncompressed_size
               for g in range(metadata.num_row_groups))


def check_disk(split_dirs: dict[str, Path], out: Path, itemsize: int) -> None:
    """Refuse up front a corpus whose flat token files cannot fit on the disk even at
    eight bytes of text per token (more than any tokenizer packs); a closer call is
    caught when the disk fills (one line, and nothing is replaced)."""
    text = sum(_text_bytes(table_path(d)) for d in split_dirs.values())
    needed = text // 8 * itemsize
    where = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(where).free
    if needed > free:
        raise GptpipeError(
            f"{out}: the flat token files need at least {needed / 2**30:.1f} GiB and the "
            f"disk has {free / 2**30:.1f} GiB free; free space or tokenize a smaller corpus"
        )
