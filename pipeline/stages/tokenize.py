"""The ``tokenize`` stage: encode every split into Parquet token shards and a flat copy.

Reads:  the split document tables (``--input``, data/split/{train,val,test}) and the
        tokenizer (``--tokenizer``, data/vocab/tokenizer.json).
Params: the ``tokenize`` section of params.yaml (:class:`pipeline.core.params.TokenizeParams`:
        shard_tokens, batch_documents, workers) and ``data.sources``.
Writes: ``--out`` (data/tokens): ``<split>/shard-NNNNN.parquet`` files holding each
        split's token stream (every document as ``<bos> ids <eos>``, at most
        ``shard_tokens`` per file), the same stream flat in ``<split>/tokens.bin`` (what
        training and evaluation read window by window, :class:`pipeline.data.shards.
        TokenFile`), and ``meta.json`` (tokenizer sha256, kind, vocab_size, dtype,
        bos_id, eos_id and per split: documents, tokens, UTF-8 bytes, shards,
        token_bytes); with ``data.sources: subfolders``, ``<split>/sources.parquet`` (the
        token spans of each source, :mod:`pipeline.data.sources`); and flat JSON metrics
        (``--metrics``, metrics/tokenize.json) with, per split, documents, tokens, bytes
        and bytes_per_token (and per source: documents and tokens).

The engine is :mod:`pipeline.data.tokenizing`; the shard layout :mod:`pipeline.data.shards`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.data.doctable import table_path
from pipeline.data.shards import ShardWriter, token_dtype, write_meta
from pipeline.data.sources import SpanRecorder
from pipeline.data.splitting import SPLITS
from pipeline.data.tokenizer import load_tokenizer
from pipeline.data.tokenizing import check_disk, tokenize_split


def run(params: Params, *, input: Path, tokenizer: Path, out: Path,
        metrics: Path) -> dict[str, Any]:
    """Write ``out`` (shards + meta.json) and the metrics; return the metrics."""
    settings, tokenizer_path = params.tokenize, tokenizer
    split_dirs = {name: Path(input) / name for name in SPLITS}
    for split_dir in split_dirs.values():
        table_path(split_dir)  # every split must exist before any work starts
    tokenizer = load_tokenizer(tokenizer_path, threads=settings.workers)
    dtype = token_dtype(tokenizer.vocab_size)
    check_disk(split_dirs, Path(out), dtype.itemsize)
    counts: dict[str, dict[str, int]] = {}
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    with atomic_dir(out) as tmp:
        for name, split_dir in split_dirs.items():
            (tmp / name).mkdir()
            writer = ShardWriter(tmp / name, dtype, settings.shard_tokens)
            spans = SpanRecorder() if params.data.sources != "one" else None
            counts[name] = tokenize_split(tokenizer, split_dir, writer, settings.batch_documents,
                                          spans)
            if spans is not None:
                spans.write(tmp / name)
                by_source[name] = spans.counts()
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
    for name, found in by_source.items():
        result[name]["sources"] = found
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
