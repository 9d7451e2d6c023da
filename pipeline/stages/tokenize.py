"""The ``tokenize`` stage: encode every split into Parquet token shards and a flat copy.

Reads:  the split document tables (``--input``, data/split/{train,val,test}) and the
        tokenizer (``--tokenizer``, data/vocab/tokenizer.json).
Params: the ``tokenize`` section of params.yaml (:class:`pipeline.core.params.TokenizeParams`).
Writes: ``--out`` (data/tokens): ``<split>/shard-NNNNN.parquet`` files holding each
        split's token stream (every document as ``<bos> ids <eos>``, at most
        ``shard_tokens`` per file), the same stream flat in ``<split>/tokens.bin`` (what
        training and evaluation read window by window, :class:`pipeline.data.shards.
        TokenFile`), and ``meta.json`` (tokenizer sha256, kind, vocab_size, dtype,
        bos_id, eos_id and per split: documents, tokens, UTF-8 bytes, shards,
        token_bytes); and flat JSON metrics (``--metrics``, metrics/tokenize.json) with,
        per split, documents, tokens, bytes and bytes_per_token.

Memory is bounded by one batch of ``batch_documents`` documents plus one shard. Encoding
uses ``tokenize.workers`` threads (0: every core); the output is the same for any number.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.doctable import count_documents, iter_batches, table_path
from pipeline.data.shards import ShardWriter, token_dtype, write_meta
from pipeline.data.tokenizer import TextTokenizer, load_tokenizer

SPLITS = ("train", "val", "test")


def tokenize_split(
    tokenizer: TextTokenizer, split_dir: Path, writer: ShardWriter, batch_documents: int
) -> dict[str, int]:
    """Stream one split's documents through the tokenizer into ``writer``; its counts:
    documents, tokens, the text's UTF-8 bytes, shards, and ``token_bytes``, the sum of
    the bytes each token stands for (``TextTokenizer.byte_lengths``), which evaluation
    needs to count the bytes of a subset of the split."""
    documents = size = token_bytes = 0
    lengths = tokenizer.byte_lengths()
    with progress(total=count_documents(split_dir), desc=split_dir.name, unit="doc") as bar:
        for batch in iter_batches(split_dir, columns=("text",), batch_size=batch_documents):
            column = batch.column(0)
            ids = tokenizer.encode_documents(column.to_pylist(), writer.dtype)
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


def _check_disk(split_dirs: dict[str, Path], out: Path, itemsize: int) -> None:
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


def run(params: Params, *, input: Path, tokenizer: Path, out: Path,
        metrics: Path) -> dict[str, Any]:
    """Write ``out`` (shards + meta.json) and the metrics; return the metrics."""
    settings, tokenizer_path = params.tokenize, tokenizer
    split_dirs = {name: Path(input) / name for name in SPLITS}
    for split_dir in split_dirs.values():
        table_path(split_dir)  # every split must exist before any work starts
    tokenizer = load_tokenizer(tokenizer_path, threads=settings.workers)
    dtype = token_dtype(tokenizer.vocab_size)
    _check_disk(split_dirs, Path(out), dtype.itemsize)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out) as tmp:
        for name, split_dir in split_dirs.items():
            (tmp / name).mkdir()
            writer = ShardWriter(tmp / name, dtype, settings.shard_tokens)
            counts[name] = tokenize_split(tokenizer, split_dir, writer, settings.batch_documents)
        write_meta(
            tmp,
            {
                "tokenizer_sha256": tokenizer.sha256,
                "kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "shard_tokens": settings.shard_tokens,
                "splits": counts,
            },
        )
    result = {
        name: {
            "documents": c["documents"],
            "tokens": c["tokens"],
            "bytes": c["bytes"],
            # Includes one <eos> per document: the stream the model is trained on.
            "bytes_per_token": round(c["bytes"] / c["tokens"], 6) if c["tokens"] else 0.0,
        }
        for name, c in counts.items()
    }
    write_json(metrics, result)
    summary = ", ".join(f"{name} {result[name]['tokens']}" for name in SPLITS)
    say("tokenize", f"tokens: {summary} -> {out}")
    return result


main = stage_command(
    "tokenize", run,
    input="The split folder holding train/, val/ and test/ document tables (data/split).",
    tokenizer="",
    out="The folder to write <split>/shard-*.parquet and meta.json into (data/tokens).",
    metrics="",
)
