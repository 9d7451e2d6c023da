"""The ``contamination`` stage: how much of val, test and the task items train already holds.

Reads:  the split document tables (``--input``, data/split/{train,val,test}) and the task
        file (``--task-file``, read when evaluate.task is file or both).
Params: the ``contamination`` section of params.yaml
        (:class:`pipeline.core.params.ContaminationParams`: ngram, near_dup_threshold,
        near_dup_num_perm, near_dup_ngram) and the ``evaluate`` task keys (task,
        task_items, task_choices, task_seed): the items checked are the ones evaluate scores.
Writes: flat JSON metrics (``--metrics``, metrics/contamination.json): per held-out split
        (val_*, test_*) the documents, exact and near duplicates of a train document, the
        share of n-grams found in train with its standard error and 95% interval, and the
        documents with an n-gram in train (count, share, Wilson interval); per task
        (next_sentence_*, task_file_*) the items whose context and answer share an n-gram
        with train (count, share, Wilson interval).

The measures are :mod:`pipeline.data.contamination`. A score on contaminated text measures
memory as much as skill; ``contamination.near_twins`` lets the split stage move or drop
the near twins this counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.io import write_json
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.data.contamination import TrainText, items_overlap, split_overlap
from pipeline.data.doctable import iter_texts


def _texts(table: Path):
    for batch in iter_texts(table):
        yield from batch


def task_texts(params: Params, test: Path, task_file: Path) -> dict[str, list[str]]:
    """Each task evaluate.task asks for, as the texts of its items: the context followed by
    the right choice, as the model reads them."""
    # Imported here: the task readers live beside the scoring code, which loads torch.
    from pipeline.lm.tasks import next_sentence_items, read_task_file

    settings = params.evaluate
    tasks = {}
    if settings.task in ("builtin", "both"):
        tasks["next_sentence"] = next_sentence_items(
            test, settings.task_items, settings.task_choices, settings.task_seed)
    if settings.task in ("file", "both"):
        tasks["task_file"] = read_task_file(task_file)
    return {name: [item.context + item.choices[item.label] for item in items]
            for name, items in tasks.items()}


def run(params: Params, *, input: Path, task_file: Path, metrics: Path) -> dict[str, Any]:
    """Measure val, test and the task items against train; write and return the metrics."""
    tasks = task_texts(params, input / "test", task_file)  # a bad task file stops us first
    held_out = ("val", "test")
    train = TrainText(params.contamination, {name: _texts(input / name) for name in held_out})
    train.add_all(_texts(input / "train"))
    result: dict[str, Any] = {"train_ngrams": len(train.ngrams)}
    for name in held_out:
        result.update(split_overlap(train, name, _texts(input / name)))
    for name, texts in tasks.items():
        result.update(items_overlap(train, name, texts))
    write_json(metrics, result)
    found = ", ".join(
        f"{name} {result[f'{name}_near_duplicates']} near twins, "
        f"{100 * result[f'{name}_ngram_share']:.2f}% of {params.contamination.ngram}-grams"
        for name in ("val", "test"))
    say("contamination", f"in train: {found} -> {metrics}")
    return result


main = stage_command(
    "contamination", run,
    input="The split document tables (data/split: train, val, test).",
    task_file="The JSONL multiple-choice task, read when evaluate.task is file or both.",
    metrics="",
)
