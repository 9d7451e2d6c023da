"""Cleaning a document table: the text rules of :mod:`pipeline.data.text` in worker
processes, then the drop filters in document order.

Texts are cleaned in worker processes, batch by batch and in order; the filters then run
in the main process in document order, so the output is the same for any worker count:
too short (``clean.min_bytes``, in UTF-8 bytes), exact duplicate (``clean.dedup``) and
near duplicate (``clean.near_dup_threshold`` > 0). The first of two duplicates is the one
kept. Code and other preformatted text keep their indentation and blank lines
(:func:`pipeline.data.text.clean_document`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute as pc

from pipeline.core.errors import GptpipeError
from pipeline.core.parallel import ordered_map, usable_cores
from pipeline.core.params import CleanParams
from pipeline.data.doctable import DocumentWriter, count_documents, iter_batches, table_path
from pipeline.data.text import NormalizationForm, clean_document, dedup_key, word_shingles

if TYPE_CHECKING:
    from datasketch import MinHash, MinHashLSH

DROP_REASONS = ("too_short", "exact_duplicate", "near_duplicate")

# Documents per worker task: large enough to amortize pickling, small enough that the
# few batches in flight stay a few megabytes.
BATCH_DOCUMENTS = 1024
# A fixed MinHash seed makes the permutations, hence the near-duplicate verdicts, the
# same on every run and in every worker process.
MINHASH_SEED = 1


@dataclass(frozen=True)
class CleanJob:
    """One batch of raw texts and the settings a worker needs to clean it."""

    texts: list[str]
    form: NormalizationForm
    min_bytes: int
    dedup: bool
    near_dup: bool
    ngram: int
    num_perm: int


@dataclass
class CleanedBatch:
    """A worker's answer for one batch, in the batch's order."""

    texts: list[str]
    keys: list[bytes] | None
    minhashes: list[MinHash | None] | None
    bytes_in: int
    chars_removed: int


def clean_batch(job: CleanJob) -> CleanedBatch:
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
            long_enough = len(text.encode()) >= job.min_bytes
            shingles = word_shingles(text, job.ngram) if long_enough else []
            minhash = None
            if shingles:
                minhash = template.copy()
                minhash.update_batch(shingles)
            minhashes.append(minhash)
    return CleanedBatch(texts, keys, minhashes, bytes_in, chars_removed)


def lsh_index(params: CleanParams) -> MinHashLSH:
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


class Filters:
    """The drop rules, applied in document order in the main process.

    Exact dedup keeps only a 16-byte digest per kept document. MinHashLSH keeps every
    kept document's band hashes, twice (per band and per key): about 3 KB per document
    measured at num_perm 128, threshold 0.8, so a million documents need about 3 GB.
    Its memory grows with the corpus; that is why near-duplicate removal is off by default.
    """

    def __init__(self, params: CleanParams) -> None:
        self.min_bytes = params.min_bytes
        self.seen: set[bytes] = set()
        self.lsh = lsh_index(params) if params.near_dup_threshold > 0 else None
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._lsh_keys = 0

    def drop_reason(self, text: str, key: bytes | None, minhash: MinHash | None) -> str | None:
        """Why this document is dropped, or None to keep it (and remember it)."""
        reason = self._reason(text, key, minhash)
        if reason is not None:
            self.dropped[reason] += 1
        return reason

    def _reason(self, text: str, key: bytes | None, minhash: MinHash | None) -> str | None:
        if len(text.encode()) < self.min_bytes:
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


def worker_count(params: CleanParams, batches: int) -> int:
    """Processes to use: ``clean.workers`` (0 = one per core), never more than batches."""
    wanted = params.workers or usable_cores()
    return max(1, min(wanted, batches))


def clean_table(input_dir: Path, writer: DocumentWriter, params: CleanParams,
                batch_documents: int = BATCH_DOCUMENTS,
                on_batch: Callable[[int], None] = lambda _: None) -> dict[str, int]:
    """Clean the raw table ``input_dir`` into ``writer``; return the clean metrics.

    ``batch_documents`` is the rows per worker task; ``on_batch`` gets the rows of each
    batch done (for a progress bar). With more than one worker the processes are
    spawned, so a script that calls this needs the usual ``if __name__ == "__main__":``
    guard. A table that is empty, or whose every document is dropped, is an error.
    """
    total = count_documents(input_dir)
    if total == 0:
        raise GptpipeError(
            f"{table_path(input_dir)}: 0 documents; check data.corpus (ingest read nothing)"
        )
    filters = Filters(params)
    workers = worker_count(params, math.ceil(total / batch_documents))
    counts = dict.fromkeys(("bytes_in", "bytes_out", "invalid_bytes", "chars_removed"), 0)

    def jobs() -> Iterator[tuple[tuple[list[int], list[str]], CleanJob]]:
        columns = ("id", "source", "text", "invalid_bytes")
        for batch in iter_batches(input_dir, columns=columns, batch_size=batch_documents):
            counts["invalid_bytes"] += pc.sum(batch.column("invalid_bytes")).as_py() or 0
            meta = (batch.column("id").to_pylist(), batch.column("source").to_pylist())
            yield (
                meta,
                CleanJob(
                    texts=batch.column("text").to_pylist(),
                    form=params.normalization,
                    min_bytes=params.min_bytes,
                    dedup=params.dedup,
                    near_dup=params.near_dup_threshold > 0,
                    ngram=params.near_dup_ngram,
                    num_perm=params.near_dup_num_perm,
                ),
            )

    for (ids, sources), cleaned in ordered_map(clean_batch, jobs(), workers, "clean"):
        counts["bytes_in"] += cleaned.bytes_in
        counts["chars_removed"] += cleaned.chars_removed
        for i, text in enumerate(cleaned.texts):
            key = cleaned.keys[i] if cleaned.keys is not None else None
            minhash = cleaned.minhashes[i] if cleaned.minhashes is not None else None
            if filters.drop_reason(text, key, minhash) is None:
                writer.append(id=ids[i], source=sources[i], text=text)
                counts["bytes_out"] += len(text.encode("utf-8"))
        on_batch(len(ids))
    if writer.rows == 0:
        found = ", ".join(f"{r}: {n}" for r, n in filters.dropped.items())
        raise GptpipeError(
            f"clean: all {total} documents of {input_dir} were dropped ({found}); "
            "lower clean.min_bytes to keep some"
        )
    return {
        "documents_in": total,
        "documents_out": writer.rows,
        **counts,
        **{f"dropped_{reason}": n for reason, n in filters.dropped.items()},
    }
