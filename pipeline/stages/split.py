"""The ``split`` stage: assign each clean document to train, val or test.

Reads:  the clean document table (``--input``, data/clean: id, source, text).
Params: the ``split`` section of params.yaml (:class:`pipeline.core.params.SplitParams`:
        train, val, test, seed, workers) and ``contamination.near_twins`` (with the
        near_dup keys it uses): keep, or move to train or drop the val/test documents
        with a near twin in train.
Writes: one document table per split (``--out``, data/split/{train,val,test}/
        part-00000.parquet) and flat JSON metrics (``--metrics``, metrics/split.json:
        documents, and per split documents, bytes, fraction_documents, fraction_bytes;
        with near_twins at train or drop, val and test also near_twins_moved_to_train or
        near_twins_dropped).

The rule is :func:`pipeline.data.splitting.assign_split`, applied by
:mod:`pipeline.data.split_table`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter, count_documents
from pipeline.data.split_table import GROUPS_PER_TASK, split_table
from pipeline.data.splitting import SPLITS


def _fraction(part: int, whole: int) -> float:
    # Rounded so metrics stay readable; 6 digits is finer than any split anyone tunes.
    return round(part / whole, 6) if whole else 0.0


def run(params: Params, *, input: Path, out: Path, metrics: Path,
        groups_per_task: int = GROUPS_PER_TASK) -> dict[str, Any]:
    """Split the ``input`` table into ``out``/{train,val,test}, write and return the metrics.

    ``groups_per_task``: row groups per worker task (tests make several tasks of a tiny
    table). With more than one worker the processes are spawned, so a script that calls
    this needs the usual ``if __name__ == "__main__":`` guard.
    """
    total = count_documents(input)
    with (
        atomic_dir(out) as tmp,
        contextlib.ExitStack() as stack,
        progress(total=total, desc="split", unit="doc") as bar,
    ):
        writers: dict[str, DocumentWriter] = {}
        for name in SPLITS:
            (tmp / name).mkdir()
            writers[name] = stack.enter_context(DocumentWriter(tmp / name, DOCUMENT_SCHEMA))
        documents, sizes = split_table(input, writers, params.split, groups_per_task,
                                       bar.update, params.contamination)
    total_bytes = sum(sizes.values())
    result: dict[str, Any] = {"documents": total}
    for name in SPLITS:
        result[name] = {
            "documents": documents[name],
            "bytes": sizes[name],
            "fraction_documents": _fraction(documents[name], total),
            "fraction_bytes": _fraction(sizes[name], total_bytes),
        }
    if params.contamination.near_twins != "keep":
        settled = ("near_twins_moved_to_train" if params.contamination.near_twins == "train"
                   else "near_twins_dropped")
        for name in SPLITS[1:]:
            result[name][settled] = documents[f"near_twins_{name}"]
    write_json(metrics, result)
    counts = ", ".join(f"{name} {result[name]['documents']}" for name in SPLITS)
    say("split", f"{total} documents: {counts} -> {out}")
    return result


main = stage_command(
    "split", run,
    input="The clean document table (data/clean).",
    out="The folder to write train/, val/ and test/ document tables into (data/split).",
    metrics="",
)
