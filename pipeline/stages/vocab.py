"""The ``vocab`` stage: learn a bpe, word or char tokenizer from the train split.

Reads:  the split document tables (``--input``, data/split): ``train`` to learn from,
        ``val`` to measure the result on.
Params: the ``vocab`` section of params.yaml (:class:`pipeline.params.VocabParams`).
Writes: the tokenizer as Hugging Face tokenizer JSON (``--out``, data/vocab/tokenizer.json,
        byte-identical across runs) and flat JSON metrics (``--metrics``,
        metrics/vocab.json): vocab_size, kind, and on val: val_tokens, val_bytes,
        val_unk_rate and val_bytes_per_token (tokens counted without ``<eos>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pyarrow.compute as pc

from pipeline.doctable import count_documents, iter_batches, iter_texts, table_path
from pipeline.io import write_json
from pipeline.params import VocabParams, load_params
from pipeline.progress import progress
from pipeline.tokenizer import UNK_ID, TextTokenizer, train_tokenizer


def _train_texts(train_dir: Path) -> Iterator[list[str]]:
    """The train split's texts in batches, with a progress bar over documents."""
    with progress(total=count_documents(train_dir), desc="vocab", unit="doc") as bar:
        for texts in iter_texts(train_dir):
            yield texts
            bar.update(len(texts))


def _ratio(part: int, whole: int) -> float:
    # An empty val split has no rate to report; 0.0 keeps the metrics file numeric.
    return round(part / whole, 6) if whole else 0.0


def measure(tokenizer: TextTokenizer, split_dir: Path) -> dict[str, Any]:
    """Tokens (no ``<eos>``), UTF-8 bytes and the ``<unk>`` rate of a split."""
    tokens = unknown = size = 0
    for batch in iter_batches(split_dir, columns=("text",)):
        column = batch.column(0)
        size += pc.sum(pc.binary_length(column)).as_py() or 0
        for ids in tokenizer.encode_batch(column.to_pylist()):
            tokens += len(ids)
            unknown += ids.count(UNK_ID)
    return {
        "val_tokens": tokens,
        "val_bytes": size,
        "val_unk_rate": _ratio(unknown, tokens),
        "val_bytes_per_token": _ratio(size, tokens),
    }


def run(params: VocabParams, input_dir: Path, out_path: Path, metrics_path: Path) -> dict[str, Any]:
    """Train on ``input_dir``/train, save to ``out_path``, write and return the metrics."""
    train_dir, val_dir = Path(input_dir) / "train", Path(input_dir) / "val"
    # Fail on a missing val split before the (long) training, not after it.
    table_path(train_dir)
    table_path(val_dir)
    tokenizer = train_tokenizer(params, _train_texts(train_dir), where=str(train_dir))
    metrics = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    metrics.update(measure(tokenizer, val_dir))
    tokenizer.save(out_path)
    write_json(metrics_path, metrics)
    return metrics


@click.command(
    "vocab",
    help="Learn a bpe, word or char tokenizer from the train split and measure it on val "
    "(params section: vocab).",
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The params.yaml to read the vocab section from.",
)
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The split directory holding train/ and val/ document tables (data/split).",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The tokenizer JSON file to write (data/vocab/tokenizer.json).",
)
@click.option(
    "--metrics",
    "metrics_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON metrics file to write (metrics/vocab.json).",
)
def main(params_path: Path, input_dir: Path, out_path: Path, metrics_path: Path) -> None:
    params = load_params(params_path).vocab
    metrics = run(params, input_dir, out_path, metrics_path)
    click.echo(
        f"vocab: {metrics['kind']} tokenizer of {metrics['vocab_size']} tokens -> {out_path}; "
        f"val: {metrics['val_bytes_per_token']:.2f} bytes/token, "
        f"unk rate {metrics['val_unk_rate']:.4f}",
        err=True,
    )
