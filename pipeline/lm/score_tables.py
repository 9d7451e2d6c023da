"""The rows evaluate's figures average, as the columns of its per-item tables
(:mod:`pipeline.core.item_scores` writes them): one row per scored document of val and
test, one per task item.

A document is named by its split table's row (``document``), the corpus ``id``, a hash
of its text (``text_sha256``: the same document in every run, wherever it sits) and its
``source``, so that its scores can be joined to anything else known of it (another
run's, its corpus source's, a contamination check's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.core.errors import GptpipeError
from pipeline.core.item_scores import text_hash
from pipeline.data.doctable import iter_batches
from pipeline.lm.evaluation import SplitScores
from pipeline.lm.tasks import Item, TaskScores

# The model's own rules of the multiple-choice tasks (the bigram's are its baseline).
MODEL_RULES = ("acc", "acc_norm", "acc_pmi")
DOCUMENT_COLUMNS = ("split", "document", "id", "text_sha256", "source", "tokens", "bytes",
                    "nats", "correct")
TASK_COLUMNS = ("task", "item", "item_sha256", "label", "choices", *MODEL_RULES,
                *(f"bigram_{rule}" for rule in MODEL_RULES))


def _names(table_dir: Path, wanted: set[int]) -> tuple[int, dict[int, tuple[int, str, str]]]:
    """(rows in the table, row -> (id, text_sha256, source) for the ``wanted`` rows),
    streamed batch by batch: only the names are kept, never the texts."""
    names, row = {}, 0
    for batch in iter_batches(table_dir):
        ids, sources, texts = (batch.column(k).to_pylist() for k in ("id", "source", "text"))
        for offset, text in enumerate(texts):
            if row + offset in wanted:
                names[row + offset] = (ids[offset], text_hash(text), sources[offset])
        row += batch.num_rows
    return row, names


def document_rows(split_tables: Path, scored: dict[str, SplitScores]) -> dict[str, list]:
    """One row per scored document of each split: its names (module docstring), its
    targets (``tokens``), the bytes they stand for (scaled so that a split's rows add up
    to its scored bytes), their summed ``nats`` and top-1 hits (``correct``). The split
    table must hold the documents the tokens were made of (one line otherwise)."""
    columns: dict[str, list] = {name: [] for name in DOCUMENT_COLUMNS}
    for split, scores in scored.items():
        units = scores.documents
        rows = units.index.tolist()
        count, names = _names(split_tables / split, set(rows))
        if count != scores.documents_in_stream:
            raise GptpipeError(
                f"{split_tables / split}: {count} documents, but the {split} tokens hold "
                f"{scores.documents_in_stream}; the tokens were made from another split "
                "(run dvc repro to tokenize this one)")
        scale = float(scores.metrics["bytes"]) / max(float(units.weight.sum()), 1e-300)
        columns["split"] += [split] * len(rows)
        columns["document"] += rows
        for name, at in (("id", 0), ("text_sha256", 1), ("source", 2)):
            columns[name] += [names[row][at] for row in rows]
        columns["tokens"] += units.tokens.tolist()
        columns["bytes"] += (units.weight * scale).tolist()
        columns["nats"] += units.nats.tolist()
        columns["correct"] += units.correct.tolist()
    return columns


def task_rows(answered: dict[str, tuple[list[Item], TaskScores]]) -> dict[str, list]:
    """One row per task item: the task, its position, a hash of the item (context,
    choices and label), its label and number of choices, and per rule whether it
    answered right. Typed empty columns when no task was scored (evaluate.task: none),
    so that a reader still finds the schema."""
    if not answered:
        strings = {"task", "item_sha256"}
        return {name: pa.array([], type=pa.string() if name in strings else pa.int64())
                for name in TASK_COLUMNS}
    columns: dict[str, list] = {name: [] for name in TASK_COLUMNS}
    for name, (items, result) in answered.items():
        columns["task"] += [name] * len(items)
        columns["item"] += list(range(len(items)))
        columns["item_sha256"] += [text_hash(json.dumps(
            [item.context, list(item.choices), item.label], ensure_ascii=False))
            for item in items]
        columns["label"] += [item.label for item in items]
        columns["choices"] += [len(item.choices) for item in items]
        for rule in TASK_COLUMNS[5:]:
            columns[rule] += result.answers[rule].tolist()
    return columns
