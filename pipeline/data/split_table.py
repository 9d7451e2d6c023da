"""Splitting a document table into train, val and test tables by the hash rule of
:mod:`pipeline.data.splitting`.

The hashing, which is what costs, runs in worker processes, each reading its own row
groups so that only the answers travel back; this process writes the rows in input order,
so the tables are byte-identical for any number of workers. The split of a document is a
hash of its text and ``split.seed``, so adding documents never moves the others and
identical texts never straddle two splits.

With ``contamination.near_twins`` at train or drop, a val or test document with a near twin
among the train documents (:class:`pipeline.data.contamination.TwinFinder`) is moved to
train, so that twins stay together, or dropped; this reads the texts twice more in this
process. At keep (the default) nothing of this runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.core.errors import GptpipeError
from pipeline.core.parallel import ordered_map, usable_cores
from pipeline.core.params import ContaminationParams, SplitParams
from pipeline.data.corpus.paths import source_unit
from pipeline.data.doctable import DocumentWriter, iter_batches, open_table, read_row_groups
from pipeline.data.splitting import SPLITS, assign_split, documents_for_nonempty

# The code of a document that no split gets (a dropped near twin).
DROPPED = len(SPLITS)
# A task's row groups, with their documents' split codes and the bytes per split.
Answer = tuple[list[int], tuple[np.ndarray, list[int]]]

# Row groups hashed per worker task (a row group is ROWS_PER_GROUP documents): one, so
# that a task of long documents (whole files) stays one row group's texts in memory.
GROUPS_PER_TASK = 1


@dataclass(frozen=True)
class SplitJob:
    table: Path  # the document table's folder
    row_groups: list[int]
    seed: int
    train: float
    val: float


def assign_row_groups(job: SplitJob) -> tuple[np.ndarray, list[int]]:
    """The split of each document of some row groups (an index into SPLITS, uint8) and
    the UTF-8 bytes each split gets, for a worker that reads the texts itself."""
    texts = read_row_groups(job.table, job.row_groups, ["text"])
    codes = np.empty(texts.num_rows, dtype=np.uint8)
    sizes = [0] * len(SPLITS)
    for row, text in enumerate(texts.column(0).to_pylist()):
        code = SPLITS.index(assign_split(text, job.seed, job.train, job.val))
        codes[row] = code
        sizes[code] += len(text.encode("utf-8"))
    return codes, sizes


def worker_count(settings: SplitParams, tasks: int) -> int:
    """Processes to use: ``split.workers`` (0 = one per core), never more than tasks."""
    return max(1, min(settings.workers or usable_cores(), tasks))


def split_table(input_dir: Path, writers: dict[str, DocumentWriter], params: SplitParams,
                groups_per_task: int = GROUPS_PER_TASK,
                on_rows: Callable[[int], None] = lambda _: None,
                twins: ContaminationParams | None = None,
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Write each document of the table ``input_dir`` to ``writers[its split]``; return
    the documents and the UTF-8 bytes per split. ``on_rows`` gets the rows done.
    ``twins``: the contamination params, whose ``near_twins`` says what becomes of a
    val/test document with a near twin in train (the module docstring); the moved or
    dropped documents per held-out split are then ``documents["near_twins_val"]`` and
    ``documents["near_twins_test"]``.

    ``split.workers`` processes hash the texts (``groups_per_task`` row groups each). With
    more than one worker the processes are spawned, so a script that calls this needs the
    usual ``if __name__ == "__main__":`` guard. A split left empty is an error that says
    what would give the corpus enough documents.
    """
    table = open_table(input_dir)
    groups = list(range(table.num_row_groups))
    tasks = [groups[i:i + groups_per_task] for i in range(0, len(groups), groups_per_task)]
    jobs = ((chunk, SplitJob(Path(input_dir), chunk, params.seed, params.train, params.val))
            for chunk in tasks)
    documents = dict.fromkeys(SPLITS, 0)
    sizes = dict.fromkeys(SPLITS, 0)
    answers = ordered_map(assign_row_groups, jobs, worker_count(params, len(tasks)), "split")
    if twins is not None and twins.near_twins != "keep":
        answers = list(answers)
        documents.update(settle_near_twins(input_dir, answers, twins))
    for chunk, answer in answers:
        codes, chunk_sizes = answer
        rows = read_row_groups(input_dir, chunk, ["id", "source", "text"])
        for code, name in enumerate(SPLITS):
            mask = codes == code
            writers[name].extend(rows.filter(pa.array(mask)))
            documents[name] += int(mask.sum())
            sizes[name] += chunk_sizes[code]
        on_rows(rows.num_rows)
    _empty_split_error(params, {name: documents[name] for name in SPLITS}, input_dir)
    return documents, sizes


def settle_near_twins(input_dir: Path, answers: list[Answer],
                      params: ContaminationParams) -> dict[str, int]:
    """Move each val/test document with a near twin in train to train, or drop it, as
    ``params.near_twins`` says, editing the codes and sizes of ``answers`` (row groups with
    their codes and bytes per split) in place; return the count per held-out split.

    The val and test documents are indexed, then every train document marks its twins
    among them (:class:`pipeline.data.contamination.TwinFinder`): the memory is that of
    the held-out documents, and the verdicts depend on the texts alone, not on the number
    of workers."""
    from pipeline.data.contamination import TwinFinder

    finder = TwinFinder(params)
    for index, (chunk, (codes, _)) in enumerate(answers):
        for row, text in enumerate(_texts(input_dir, chunk)):
            if codes[row] != 0:
                finder.add_held_out((index, row), text)
    for chunk, (codes, _) in answers:
        for code, text in zip(codes, _texts(input_dir, chunk), strict=True):
            if code == 0:
                finder.add_train(text)
    settled = {f"near_twins_{name}": 0 for name in SPLITS[1:]}
    for index, (chunk, (codes, chunk_sizes)) in enumerate(answers):
        rows = sorted(row for i, row in finder.twinned if i == index)
        texts = _texts(input_dir, chunk) if rows else []
        for row in rows:
            code = int(codes[row])
            settled[f"near_twins_{SPLITS[code]}"] += 1
            size = len(texts[row].encode("utf-8"))
            chunk_sizes[code] -= size
            if params.near_twins == "train":
                codes[row], chunk_sizes[0] = 0, chunk_sizes[0] + size
            else:
                codes[row] = DROPPED
    return settled


def _texts(input_dir: Path, chunk: list[int]) -> list[str]:
    return read_row_groups(input_dir, chunk, ["text"]).column(0).to_pylist()


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
