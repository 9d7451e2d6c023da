"""vocab: learn a bpe, word or char tokenizer from the train split, or copy the tokenizer
of the model that pretraining will continue.

Reads:  --input (data/split): train to learn from, val to measure the result on; with
        vocab.kind from_model, the model folder that train.init_from names
Params: vocab (kind, size, minimum frequency...), train.init_from
Writes: --out (data/vocab/tokenizer.json): the tokenizer as Hugging Face tokenizer JSON,
        byte-identical across runs;
        --metrics (metrics/vocab.json): kind, vocab_size, and on val: val_tokens,
        val_bytes, val_unk_rate, val_bytes_per_token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_json
from pipeline.core.params import Params
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.doctable import count_documents, iter_batches, iter_texts, table_path
from pipeline.data.tokenizer import UNK_ID, TextTokenizer, TrainingSample, train_tokenizer
from pipeline.lm.checkpoint import base_model
from pipeline.lm.folder import ModelFolder


def _train_texts(train_dir: Path, max_mb: int) -> Iterator[list[str]]:
    """The train split's texts in batches, or a sample of at most ``max_mb`` MiB of them
    (:class:`~pipeline.data.tokenizer.TrainingSample`), with a progress bar over documents."""
    sample = TrainingSample(_text_bytes(train_dir), max_mb * 2**20)
    if not sample.whole:
        say("vocab", f"learning from a sample of at most vocab.max_train_mb = {max_mb} MiB "
                     f"({sample.rate:.1%}) of the train split")
    with progress(total=count_documents(train_dir), desc="vocab", unit="doc") as bar:
        for texts in iter_texts(train_dir):
            if taken := sample.take(texts):
                yield taken
            bar.update(len(texts))


def _text_bytes(split_dir: Path) -> int:
    """The UTF-8 bytes of a split's texts."""
    return sum(pc.sum(pc.binary_length(batch.column(0))).as_py() or 0
               for batch in iter_batches(split_dir, columns=("text",)))


def _ratio(part: int, whole: int) -> float:
    # An empty val split has no rate to report; 0.0 keeps the metrics file numeric.
    return round(part / whole, 6) if whole else 0.0


def measure(tokenizer: TextTokenizer, split_dir: Path) -> dict[str, Any]:
    """Tokens, UTF-8 bytes and the ``<unk>`` rate of a split. Tokens are counted without
    the ``<eos>`` that tokenize adds after each document: what the text itself costs."""
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


def _base_tokenizer(init_from: str) -> TextTokenizer:
    """The tokenizer of the model ``train.init_from`` names (vocab.kind: from_model): a
    continued model keeps its vocabulary, so its tokenizer is copied, byte for byte (and
    checked against the model's config), not learned again."""
    base = base_model(init_from)
    if base is None:
        raise GptpipeError(
            f"vocab.kind = 'from_model' copies the tokenizer of the model train.init_from "
            f"names, but train.init_from = {init_from} means random weights; set "
            "train.init_from to a model folder, or vocab.kind to bpe, word or char"
        )
    return ModelFolder.open(base).tokenizer()


def run(params: Params, *, input: Path, out: Path, metrics: Path) -> dict[str, Any]:
    """Train on ``input``/train, save to ``out``, write and return the metrics."""
    train_dir, val_dir = Path(input) / "train", Path(input) / "val"
    # Fail on a missing val split before the (long) training, not after it.
    table_path(train_dir)
    table_path(val_dir)
    if params.vocab.kind == "from_model":
        tokenizer = _base_tokenizer(params.train.init_from)
    else:
        texts = _train_texts(train_dir, params.vocab.max_train_mb)
        tokenizer = train_tokenizer(params.vocab, texts, where=str(train_dir))
    result = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    result.update(measure(tokenizer, val_dir))
    tokenizer.save(out)
    write_json(metrics, result)
    say("vocab", f"{result['kind']} tokenizer of {result['vocab_size']} tokens -> {out}; val: "
                 f"{result['val_bytes_per_token']:.2f} bytes/token, unk rate "
                 f"{result['val_unk_rate']:.4f}")
    return result


main = stage_command(
    "vocab", run,
    input="The split folder holding train/ and val/ document tables (data/split).",
    out="The tokenizer JSON file to write (data/vocab/tokenizer.json).",
    metrics="",
)
