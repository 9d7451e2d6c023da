"""The ``split`` stage: assign each clean document to train, val or test.

Reads:  the clean document table (``--input``, data/clean: id, source, text).
Params: the ``split`` section of params.yaml (:class:`pipeline.core.params.SplitParams`:
        train, val, test, seed, workers).
Writes: one document table per split (``--out``, data/split/{train,val,test}/
        part-00000.parquet) and flat JSON metrics (``--metrics``, metrics/split.json).

The split of a document is a hash of its text and ``split.seed``
(:func:`pipeline.data.splitting.assign_split`), so adding documents never moves the others
and identical texts never straddle two splits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.parallel import ordered_map, usable_cores
from pipeline.core.params import Params, SplitParams
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.corpus.paths import source_unit
from pipeline.data.doctable import (
    DOCUMENT_SCHEMA,
    DocumentWriter,
    iter_batches,
    open_table,
    read_row_groups,
)
from pipeline.data.splitting import SPLITS, assign_split, documents_for_nonempty


def _fraction(part: int, whole: int) -> float:
    # Rounded so metrics stay readable; 6 digits is finer than any split anyone tunes.
    return round(part / whole, 6) if whole else 0.0


def _remedy(input_dir: Path) -> str:
    """What would give the split more documents, read from how the documents were cut:
    whole text files can be cut in paragraphs or lines, paragraphs in lines."""
    units, multiline = set(), False
    for batch in iter_batches(input_dir, columns=("source", "text")):
        for source, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                                strict=True):
            units.add(source_unit(source))
            multiline = multiline or "\n" in text
    if units == {"file"}:
        return ("the documents are whole text files: cut them into more with "
                "data.txt_unit: paragraph (blank-line paragraphs) or line (one per line)")
    if units == {"part"} and multiline:
        return ("the documents are paragraphs of text files: cut them into more with "
                "data.txt_unit: line (one document per line)")
    return "use a larger corpus, or larger split.val and split.test fractions"


def _empty_split_error(params: SplitParams, counts: dict[str, int], input_dir: Path) -> None:
    """Raise if a split got no document, saying what gives the corpus enough of them."""
    total = sum(counts.values())
    empty = next((name for name in SPLITS if counts[name] == 0), None)
    if empty is None:
        return
    fractions = {name: getattr(params, name) for name in SPLITS}
    smallest = min(SPLITS, key=fractions.__getitem__)
    likely = documents_for_nonempty(fractions[smallest])
    raise GptpipeError(
        f"split: {empty} got 0 of {total} documents from {input_dir}; every split needs a "
        f"document (about {likely} make an empty {smallest} split unlikely at "
        f"split.{smallest} = {fractions[smallest]:g}): {_remedy(input_dir)}"
    )


# Row groups hashed per worker task (a row group is ROWS_PER_GROUP documents): one, so
# that a task of long documents (whole files) stays one row group's texts in memory.
GROUPS_PER_TASK = 1


@dataclass(frozen=True)
class _Job:
    table: Path  # the document table's folder
    row_groups: list[int]
    seed: int
    train: float
    val: float


def _assign(job: _Job) -> tuple[np.ndarray, list[int]]:
    """The split of each document of some row groups (an index into SPLITS, uint8) and
    the UTF-8 bytes each split gets: the hashing, which is what costs, done by a worker
    that reads the texts itself so that only the answers travel back."""
    texts = read_row_groups(job.table, job.row_groups, ["text"])
    codes = np.empty(texts.num_rows, dtype=np.uint8)
    sizes = [0] * len(SPLITS)
    for row, text in enumerate(texts.column(0).to_pylist()):
        code = SPLITS.index(assign_split(text, job.seed, job.train, job.val))
        codes[row] = code
        sizes[code] += len(text.encode("utf-8"))
    return codes, sizes


def _worker_count(settings: SplitParams, tasks: int) -> int:
    """Processes to use: ``split.workers`` (0 = one per core), never more than tasks."""
    return max(1, min(settings.workers or usable_cores(), tasks))


def run(params: Params, *, input: Path, out: Path, metrics: Path,
        groups_per_task: int = GROUPS_PER_TASK) -> dict[str, Any]:
    """Split the ``input`` table into ``out``/{train,val,test}, write and return the metrics.

    ``split.workers`` processes hash the texts (``groups_per_task`` row groups each);
    this process writes the rows in input order, so the tables are byte-identical for any
    number of workers. With more than one worker the processes are spawned, so a script
    that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    split, input_dir = params.split, input
    table = open_table(input_dir)
    total = table.metadata.num_rows
    groups = list(range(table.num_row_groups))
    tasks = [groups[i:i + groups_per_task] for i in range(0, len(groups), groups_per_task)]
    jobs = ((chunk, _Job(Path(input_dir), chunk, split.seed, split.train, split.val))
            for chunk in tasks)
    documents = dict.fromkeys(SPLITS, 0)
    sizes = dict.fromkeys(SPLITS, 0)
    with (
        atomic_dir(out) as tmp,
        contextlib.ExitStack() as stack,
        progress(total=total, desc="split", unit="doc") as bar,
    ):
        writers: dict[str, DocumentWriter] = {}
        for name in SPLITS:
            (tmp / name).mkdir()
            writers[name] = stack.enter_context(DocumentWriter(tmp / name, DOCUMENT_SCHEMA))
        for chunk, answer in ordered_map(_assign, jobs, _worker_count(split, len(tasks)),
                                         "split"):
            codes, chunk_sizes = answer
            rows = read_row_groups(input_dir, chunk, ["id", "source", "text"])
            for code, name in enumerate(SPLITS):
                mask = codes == code
                writers[name].extend(rows.filter(pa.array(mask)))
                documents[name] += int(mask.sum())
                sizes[name] += chunk_sizes[code]
            bar.update(rows.num_rows)
        _empty_split_error(split, documents, input_dir)
    total_bytes = sum(sizes.values())
    result: dict[str, Any] = {"documents": total}
    for name in SPLITS:
        result[name] = {
            "documents": documents[name],
            "bytes": sizes[name],
            "fraction_documents": _fraction(documents[name], total),
            "fraction_bytes": _fraction(sizes[name], total_bytes),
        }
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
