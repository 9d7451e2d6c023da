"""Reading the whole corpus: run the planned reads (:mod:`pipeline.data.corpus.planning`)
in worker processes and stream the documents in corpus order, counting them.

Documents are streamed from the readers to the caller (ingest writes each as it comes), so
memory stays flat however big the corpus is. ``data.workers`` processes read files, and
stretches of lines of big plain-text and JSONL files, side by side; the documents and
their order are the same for any number of them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import GptpipeError
from pipeline.core.parallel import ordered_map
from pipeline.core.params import DataParams
from pipeline.data.corpus.arrow import (
    datasets_files,
    is_datasets_folder,
    read_arrow,
    refuse_hub_name,
)
from pipeline.data.corpus.builtin import load_pointer, locate_member, read_builtin
from pipeline.data.corpus.decoding import RawDocument
from pipeline.data.corpus.formats import read_file
from pipeline.data.corpus.paths import POINTER_SUFFIX, iter_corpus_files
from pipeline.data.corpus.planning import RANGE_BYTES, CorpusStats, ReadTask, plan_reads
from pipeline.data.corpus.streams import OnRead, no_progress


def _file_progress(size: int, on_read: OnRead) -> OnRead:
    """An ``on_read`` for one file that never reports more than the file's ``size``.

    Parquet reads only one column and skipped files are not read at all; calling the
    result with ``size`` at the end reports whatever is left, so the bar ends at 100%.
    """
    sent = 0

    def report(count: int) -> None:
        nonlocal sent
        count = min(count, size - sent)
        if count > 0:
            sent += count
            on_read(count)

    return report


def run_task(task: ReadTask, params: DataParams, on_read: OnRead = no_progress
             ) -> Iterator[RawDocument]:
    """Stream the documents of one read task."""
    report = _file_progress(task.size, on_read)
    yield from read_file(task.path, task.source, task.fmt, task.compression, params, report,
                         task.unit, task.byte_range)
    report(task.size)


@dataclass(frozen=True)
class _PlanFailure:
    """A planning error met while workers still read earlier files: raised in its turn,
    so the error reported is the one a single process would meet first."""

    error: Exception
    in_process: bool = True


def _deferring_errors(tasks: Iterator[ReadTask]) -> Iterator[ReadTask | _PlanFailure]:
    try:
        yield from tasks
    except GptpipeError as err:
        yield _PlanFailure(err)


# The characters of text a worker collects for one task, in units of the task size
# (range_bytes), before it gives the task back to be streamed by ingest's own process: a
# compressed file small enough to hand over whole can still expand a hundredfold, and a
# worker holds its task's documents all at once.
TASK_TEXT_RANGES = 8


def _task_documents(job: tuple[ReadTask, DataParams, int]) -> list[RawDocument] | None:
    """A worker process's whole share: one task's documents as a list, or None when their
    text passes ``job[2]`` characters (then ingest's process streams the task itself)."""
    task, params, most_chars = job
    documents, chars = [], 0
    for document in run_task(task, params):
        documents.append(document)
        chars += len(document.text)
        if chars > most_chars:
            return None
    return documents


def _iter_raw(params: DataParams, stats: CorpusStats, on_read: OnRead, workers: int,
              range_bytes: int) -> Iterator[RawDocument]:
    root = Path(params.corpus)
    refuse_hub_name(params.corpus)
    if root.is_file() and root.suffix.lower() == POINTER_SUFFIX:
        yield from read_builtin(root, on_read)
        stats.files_read += 1
        return
    if is_datasets_folder(root):
        for path, source in datasets_files(root):
            yield from read_arrow(path, source, params.text_field, on_read)
            stats.files_read += 1
        return
    tasks = plan_reads(params, stats, range_bytes, on_read)
    if workers > 1:
        # A pool costs a second or so to start: not worth it for a corpus of one task.
        head = list(itertools.islice(tasks, 2))
        workers = workers if len(head) > 1 else 1
        tasks = itertools.chain(head, tasks)
    if workers <= 1:
        for task in tasks:
            yield from run_task(task, params, on_read)
        return
    share = TASK_TEXT_RANGES * range_bytes
    jobs = ((task, (task, params, share)) for task in _deferring_errors(tasks))
    for task, documents in ordered_map(_task_documents, jobs, workers, "ingest",
                                       in_process=lambda job: job[0].in_process):
        if isinstance(task, _PlanFailure):
            raise task.error
        if documents is None:
            yield from run_task(task, params, on_read)
        else:
            yield from documents
            on_read(task.size)


def iter_documents(
    params: DataParams, stats: CorpusStats | None = None, on_read: OnRead = no_progress,
    workers: int = 1, range_bytes: int = RANGE_BYTES,
) -> Iterator[RawDocument]:
    """Stream the documents of ``params.corpus`` in a deterministic order.

    ``stats`` (if given) is updated as documents go by; ``on_read`` is called with the
    number of input bytes (compressed, as stored) read so far, for a progress bar.
    ``workers`` processes read files, and stretches of lines of big plain-text and JSONL
    files (:func:`~pipeline.data.corpus.planning.plan_ranges`, about ``range_bytes``
    each), side by side; the documents and their order are the same for any number of workers.
    Documents with only whitespace are left out and counted. A corpus that yields no
    document at all is an error, raised after the last file.
    """
    stats = CorpusStats() if stats is None else stats
    for document in _iter_raw(params, stats, on_read, workers, range_bytes):
        if not document.text.strip():
            stats.documents_skipped_empty += 1
            continue
        stats.documents += 1
        stats.bytes += len(document.text.encode("utf-8"))
        stats.invalid_bytes += document.invalid_bytes
        yield document
    if stats.documents == 0:
        raise GptpipeError(
            f"data.corpus: {params.corpus}: no document with non-whitespace text "
            f"({stats.files_read} files read, {stats.documents_skipped_empty} empty documents, "
            f"{stats.files_skipped_binary} binary files skipped); point data.corpus at text "
            "(or data.include at its text files)"
        )


def corpus_bytes(params: DataParams) -> int:
    """The stored size of every input file of ``params.corpus`` (the progress bar's total)."""
    root = Path(params.corpus)
    if is_datasets_folder(root):
        return sum(path.stat().st_size for path, _ in datasets_files(root))
    if root.is_dir():
        return sum((root / rel).stat().st_size for rel in iter_corpus_files(root, params.include))
    if root.is_file() and root.suffix.lower() == POINTER_SUFFIX:
        with contextlib.suppress(GptpipeError):
            pointer = load_pointer(root)
            return locate_member(pointer, root.as_posix()).stat().st_size
        return 0
    return root.stat().st_size if root.is_file() else 0
