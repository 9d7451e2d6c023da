"""The ``clean`` stage: normalize, filter and deduplicate the raw documents.

Reads:  the raw document table (``--input``, data/raw: id, source, text, invalid_bytes).
Params: the ``clean`` section of params.yaml (:class:`pipeline.params.CleanParams`).
Writes: the clean document table (``--out``, data/clean: id, source, text; the raw id and
        source are kept) and flat JSON metrics (``--metrics``, metrics/clean.json).

Texts are cleaned in worker processes, batch by batch and in order; the filters then run
in the main process in document order, so the output is the same for any worker count:
too short (``clean.min_chars``), exact duplicate (``clean.dedup``) and near duplicate
(``clean.near_dup_threshold`` > 0). The first of two duplicates is the one kept.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import pyarrow.compute as pc

from pipeline.doctable import (
    DOCUMENT_SCHEMA,
    DocumentWriter,
    count_documents,
    iter_batches,
    table_path,
)
from pipeline.errors import GptpipeError
from pipeline.io import atomic_dir, write_json
from pipeline.params import CleanParams, load_params
from pipeline.progress import progress
from pipeline.text import NormalizationForm, clean_document, dedup_key, word_shingles

if TYPE_CHECKING:
    from datasketch import MinHash, MinHashLSH

DROP_REASONS = ("too_short", "exact_duplicate", "near_duplicate")

# Documents per worker task: large enough to amortize pickling, small enough that the
# few batches in flight stay a few megabytes.
BATCH_DOCUMENTS = 1024
# A fixed MinHash seed makes the permutations, hence the near-duplicate verdicts, the
# same on every run and in every worker process.
MINHASH_SEED = 1

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_Meta = TypeVar("_Meta")


@dataclass(frozen=True)
class _Job:
    """One batch of raw texts and the settings a worker needs to clean it."""

    texts: list[str]
    form: NormalizationForm
    min_chars: int
    dedup: bool
    near_dup: bool
    ngram: int
    num_perm: int


@dataclass
class _Cleaned:
    """A worker's answer for one batch, in the batch's order."""

    texts: list[str]
    keys: list[bytes] | None
    minhashes: list[MinHash | None] | None
    bytes_in: int
    chars_removed: int


def _clean_batch(job: _Job) -> _Cleaned:
    """Clean one batch; also hash what the filters need, so that work runs in parallel."""
    texts: list[str] = []
    bytes_in = chars_removed = 0
    for raw in job.texts:
        text, removed = clean_document(raw, job.form)
        texts.append(text)
        bytes_in += len(raw.encode("utf-8"))
        chars_removed += removed
    keys = [dedup_key(t) for t in texts] if job.dedup else None
    minhashes = None
    if job.near_dup:
        from datasketch import MinHash  # imported here: datasketch loads scipy (~0.3 s)

        # Copying one MinHash reuses its permutations instead of redrawing them per text.
        template = MinHash(num_perm=job.num_perm, seed=MINHASH_SEED)
        minhashes = []
        for text in texts:
            shingles = word_shingles(text, job.ngram) if len(text) >= job.min_chars else []
            minhash = None
            if shingles:
                minhash = template.copy()
                minhash.update_batch(shingles)
            minhashes.append(minhash)
    return _Cleaned(texts, keys, minhashes, bytes_in, chars_removed)


def _ordered_map(
    func: Callable[[_In], _Out], items: Iterable[tuple[_Meta, _In]], workers: int
) -> Iterator[tuple[_Meta, _Out]]:
    """Yield ``(meta, func(item))`` in input order, computed by ``workers`` processes.

    Unlike ``Pool.imap``, whose feeder thread drains the whole input at once, at most two
    tasks per worker are in flight, so memory stays bounded however large the corpus.
    """
    if workers <= 1:
        for meta, item in items:
            yield meta, func(item)
        return
    # spawn, not fork: the parent holds pyarrow's threads, and forking a threaded
    # process can deadlock the child on a lock some other thread held.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque[tuple[_Meta, Any]] = deque()
        for meta, item in items:
            pending.append((meta, pool.apply_async(func, (item,))))
            if len(pending) >= 2 * workers:
                done_meta, result = pending.popleft()
                yield done_meta, result.get()
        while pending:
            done_meta, result = pending.popleft()
            yield done_meta, result.get()


def _lsh_index(params: CleanParams) -> MinHashLSH:
    """A MinHashLSH for the params, or a params error when it cannot band them."""
    from datasketch import MinHashLSH

    def build(threshold: float) -> MinHashLSH:
        return MinHashLSH(threshold=threshold, num_perm=params.near_dup_num_perm)

    try:
        return build(params.near_dup_threshold)
    except ValueError:
        pass
    # LSH needs at least two bands; a threshold near 1 or few permutations leave one.
    # Bisect for the largest workable threshold (in hundredths) to say what is allowed.
    low, high = 0, math.floor(params.near_dup_threshold * 100)
    while low < high:
        mid = (low + high + 1) // 2
        try:
            build(mid / 100)
            low = mid
        except ValueError:
            high = mid - 1
    allowed = f"at most {low / 100:g} with clean.near_dup_num_perm = {params.near_dup_num_perm}"
    if low == 0:
        allowed = f"no threshold works with clean.near_dup_num_perm = {params.near_dup_num_perm}"
    raise params.fail(
        "near_dup_threshold",
        params.near_dup_threshold,
        f"{allowed} (MinHashLSH needs at least 2 bands; raise near_dup_num_perm)",
    )


class _Filters:
    """The drop rules, applied in document order in the main process.

    Exact dedup keeps only a 16-byte digest per kept document. MinHashLSH keeps every
    kept document's band hashes, twice (per band and per key): about 3 KB per document
    measured at num_perm 128, threshold 0.8, so a million documents need about 3 GB.
    Its memory grows with the corpus; that is why near-duplicate removal is off by default.
    """

    def __init__(self, params: CleanParams) -> None:
        self.min_chars = params.min_chars
        self.seen: set[bytes] = set()
        self.lsh = _lsh_index(params) if params.near_dup_threshold > 0 else None
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._lsh_keys = 0

    def drop_reason(self, text: str, key: bytes | None, minhash: MinHash | None) -> str | None:
        """Why this document is dropped, or None to keep it (and remember it)."""
        reason = self._reason(text, key, minhash)
        if reason is not None:
            self.dropped[reason] += 1
        return reason

    def _reason(self, text: str, key: bytes | None, minhash: MinHash | None) -> str | None:
        if len(text) < self.min_chars:
            return "too_short"
        if key is not None:
            if key in self.seen:
                return "exact_duplicate"
            self.seen.add(key)
        if self.lsh is not None and minhash is not None:
            # An LSH candidate counts as a near duplicate; the banding is tuned so that
            # pairs below the threshold rarely collide.
            if self.lsh.query(minhash):
                return "near_duplicate"
            self.lsh.insert(self._lsh_keys, minhash, check_duplication=False)
            self._lsh_keys += 1
        return None


def _worker_count(params: CleanParams, batches: int) -> int:
    """Processes to use: ``clean.workers`` (0 = one per core), never more than batches."""
    wanted = params.workers or os.cpu_count() or 1
    return max(1, min(wanted, batches))


def run(
    params: CleanParams,
    input_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    batch_documents: int = BATCH_DOCUMENTS,
) -> dict[str, int]:
    """Clean ``input_dir`` into ``out_dir``, write ``metrics_path``, return the metrics.

    ``batch_documents`` is the rows per worker task (tests make it small to use several
    workers on a tiny corpus). With more than one worker the processes are spawned, so a
    script that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    source_table = table_path(input_dir)
    total = count_documents(input_dir)
    if total == 0:
        raise GptpipeError(
            f"{source_table}: 0 documents; allowed: at least one document (check data.corpus)"
        )
    filters = _Filters(params)
    workers = _worker_count(params, math.ceil(total / batch_documents))
    counts = dict.fromkeys(("bytes_in", "bytes_out", "invalid_bytes", "chars_removed"), 0)

    def jobs() -> Iterator[tuple[tuple[list[int], list[str]], _Job]]:
        columns = ("id", "source", "text", "invalid_bytes")
        for batch in iter_batches(input_dir, columns=columns, batch_size=batch_documents):
            counts["invalid_bytes"] += pc.sum(batch.column("invalid_bytes")).as_py() or 0
            meta = (batch.column("id").to_pylist(), batch.column("source").to_pylist())
            yield (
                meta,
                _Job(
                    texts=batch.column("text").to_pylist(),
                    form=params.normalization,
                    min_chars=params.min_chars,
                    dedup=params.dedup,
                    near_dup=params.near_dup_threshold > 0,
                    ngram=params.near_dup_ngram,
                    num_perm=params.near_dup_num_perm,
                ),
            )

    with (
        atomic_dir(out_dir) as tmp,
        DocumentWriter(tmp, DOCUMENT_SCHEMA) as writer,
        progress(total=total, desc="clean", unit="doc") as bar,
    ):
        for (ids, sources), cleaned in _ordered_map(_clean_batch, jobs(), workers):
            counts["bytes_in"] += cleaned.bytes_in
            counts["chars_removed"] += cleaned.chars_removed
            for i, text in enumerate(cleaned.texts):
                key = cleaned.keys[i] if cleaned.keys is not None else None
                minhash = cleaned.minhashes[i] if cleaned.minhashes is not None else None
                if filters.drop_reason(text, key, minhash) is None:
                    writer.append(id=ids[i], source=sources[i], text=text)
                    counts["bytes_out"] += len(text.encode("utf-8"))
            bar.update(len(ids))
        if writer.rows == 0:
            found = ", ".join(f"{r}: {n}" for r, n in filters.dropped.items())
            raise GptpipeError(
                f"clean: all {total} documents of {input_dir} were dropped ({found}); "
                "allowed: at least one document; lower clean.min_chars"
            )
        metrics = {
            "documents_in": total,
            "documents_out": writer.rows,
            **counts,
            **{f"dropped_{reason}": n for reason, n in filters.dropped.items()},
        }
    write_json(metrics_path, metrics)
    return metrics


@click.command(
    "clean",
    help="Normalize, filter and deduplicate the raw documents (params section: clean).",
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The params.yaml to read the clean section from.",
)
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The raw document table directory (data/raw).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The clean document table directory to write (data/clean).",
)
@click.option(
    "--metrics",
    "metrics_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON metrics file to write (metrics/clean.json).",
)
def main(params_path: Path, input_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    params = load_params(params_path).clean
    metrics = run(params, input_dir, out_dir, metrics_path)
    dropped = metrics["documents_in"] - metrics["documents_out"]
    click.echo(
        f"clean: kept {metrics['documents_out']} of {metrics['documents_in']} documents "
        f"({dropped} dropped) -> {out_dir}",
        err=True,
    )
