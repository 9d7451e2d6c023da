"""The ``tokenize`` stage: encode every split into Parquet token shards.

Reads:  the split document tables (``--input``, data/split/{train,val,test}) and the
        tokenizer (``--tokenizer``, data/vocab/tokenizer.json).
Params: the ``tokenize`` section of params.yaml (:class:`pipeline.params.TokenizeParams`).
Writes: ``--out`` (data/tokens): ``<split>/shard-NNNNN.parquet`` files holding each
        split's token stream (every document as ``<bos> ids <eos>``, at most
        ``shard_tokens`` per file) and ``meta.json`` (tokenizer sha256, kind, vocab_size,
        dtype, bos_id, eos_id and per split: documents, tokens, UTF-8 bytes, shards); and flat JSON
        metrics (``--metrics``, metrics/tokenize.json) with, per split, documents, tokens,
        bytes and bytes_per_token.

Memory is bounded by one batch of ``batch_documents`` documents plus one shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pyarrow.compute as pc

from pipeline.doctable import count_documents, iter_batches, table_path
from pipeline.io import atomic_dir, write_json
from pipeline.params import TokenizeParams, load_params
from pipeline.progress import progress
from pipeline.shards import ShardWriter, token_dtype, write_meta
from pipeline.tokenizer import TextTokenizer, load_tokenizer

SPLITS = ("train", "val", "test")


def tokenize_split(
    tokenizer: TextTokenizer, split_dir: Path, writer: ShardWriter, batch_documents: int
) -> dict[str, int]:
    """Stream one split's documents through the tokenizer into ``writer``; its counts."""
    documents = size = 0
    with progress(total=count_documents(split_dir), desc=split_dir.name, unit="doc") as bar:
        for batch in iter_batches(split_dir, columns=("text",), batch_size=batch_documents):
            column = batch.column(0)
            writer.append(tokenizer.encode_documents(column.to_pylist(), writer.dtype))
            documents += batch.num_rows
            size += pc.sum(pc.binary_length(column)).as_py() or 0
            bar.update(batch.num_rows)
    writer.close()
    return {"documents": documents, "tokens": writer.tokens, "bytes": size, "shards": writer.shards}


def run(
    params: TokenizeParams,
    input_dir: Path,
    tokenizer_path: Path,
    out_dir: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    """Write ``out_dir`` (shards + meta.json) and the metrics; return the metrics."""
    split_dirs = {name: Path(input_dir) / name for name in SPLITS}
    for split_dir in split_dirs.values():
        table_path(split_dir)  # every split must exist before any work starts
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out_dir) as tmp:
        for name, split_dir in split_dirs.items():
            (tmp / name).mkdir()
            writer = ShardWriter(tmp / name, dtype, params.shard_tokens)
            counts[name] = tokenize_split(tokenizer, split_dir, writer, params.batch_documents)
        write_meta(
            tmp,
            {
                "tokenizer_sha256": tokenizer.sha256,
                "kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "shard_tokens": params.shard_tokens,
                "splits": counts,
            },
        )
    metrics = {
        name: {
            "documents": c["documents"],
            "tokens": c["tokens"],
            "bytes": c["bytes"],
            # Includes one <eos> per document: the stream the model is trained on.
            "bytes_per_token": round(c["bytes"] / c["tokens"], 6) if c["tokens"] else 0.0,
        }
        for name, c in counts.items()
    }
    write_json(metrics_path, metrics)
    return metrics


@click.command(
    "tokenize",
    help="Encode the train, val and test splits into Parquet token shards with the "
    "tokenizer from gptpipe vocab (params section: tokenize).",
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The params.yaml to read the tokenize section from.",
)
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The split directory holding train/, val/ and test/ document tables (data/split).",
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The tokenizer JSON written by gptpipe vocab (data/vocab/tokenizer.json).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory to write <split>/shard-*.parquet and meta.json into (data/tokens).",
)
@click.option(
    "--metrics",
    "metrics_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON metrics file to write (metrics/tokenize.json).",
)
def main(
    params_path: Path, input_dir: Path, tokenizer_path: Path, out_dir: Path, metrics_path: Path
) -> None:
    params = load_params(params_path).tokenize
    metrics = run(params, input_dir, tokenizer_path, out_dir, metrics_path)
    summary = ", ".join(f"{name} {metrics[name]['tokens']}" for name in SPLITS)
    click.echo(f"tokenize: tokens: {summary} -> {out_dir}", err=True)
