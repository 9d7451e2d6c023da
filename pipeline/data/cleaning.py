"""Cleaning a document table: the text rules of :mod:`pipeline.data.text` in worker
processes, then the drop filters in document order.

Texts are cleaned in worker processes, batch by batch and in order; the filters then run
in the main process in document order, so the output is the same for any worker count:
too short (``clean.min_bytes``, in UTF-8 bytes), exact duplicate (``clean.dedup``) and
near duplicate (``clean.near_dup_threshold`` > 0). The first of two duplicates is the one
kept. Code and other preformatted text keep their indentation and blank lines
(:func:`pipeline.data.text.clean_document`).

Exact dedup remembers a key per document. When a corpus has more documents than
``clean.dedup_memory_mb`` holds keys for, the keys spill to disk and the table is cleaned
in two passes (:mod:`pipeline.data.dedup`): the same documents are kept either way.
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
from pipeline.data.dedup import SeenKeys, SpilledKeys, partitions_needed, scratch_folder
from pipeline.data.doctable import DocumentWriter, count_documents, iter_batches, table_path
from pipeline.data.text import NormalizationForm, clean_document, dedup_key, word_shingles

if TYPE_CHECKING:
    from datasketch import MinHash, MinHashLSH

DROP_REASONS = ("too_short", "exact_duplicate", "near_duplicate")

# Documents per worker task: large enough to amortize pickling, small enough that the
# few batches in flight stay a few megabytes.
BATCH_DOCUMENTS = 1024
MB = 2**20
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
        long_enough = [len(text.encode()) >= job.min_bytes for text in texts]
        minhashes = minhashes_of(texts, long_enough, job.ngram, job.num_perm)
    return CleanedBatch(texts, keys, minhashes, bytes_in, chars_removed)


@dataclass(frozen=True)
class SignJob:
    """One batch of clean, long enough texts to sign for near-duplicate detection."""

    texts: list[str]
    ngram: int
    num_perm: int


def sign_batch(job: SignJob) -> list[MinHash | None]:
    """The MinHash of each text (in a worker process: the second pass of a spilled dedup)."""
    return minhashes_of(job.texts, [True] * len(job.texts), job.ngram, job.num_perm)


def minhashes_of(texts: list[str], wanted: list[bool], ngram: int, num_perm: int
                 ) -> list[MinHash | None]:
    """The MinHash of each wanted text's word shingles; None for the others and for a
    text with no words."""
    from datasketch import MinHash  # imported here: datasketch loads scipy (~0.3 s)

    # Copying one MinHash reuses its permutations instead of redrawing them per text.
    template = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
    minhashes: list[MinHash | None] = []
    for text, want in zip(texts, wanted, strict=True):
        shingles = word_shingles(text, ngram) if want else []
        minhash = None
        if shingles:
            minhash = template.copy()
            minhash.update_batch(shingles)
        minhashes.append(minhash)
    return minhashes


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
    """The drop rules, applied in document order in the main process: too short, then
    an exact duplicate (decided by the caller's keys, :mod:`pipeline.data.dedup`), then a
    near duplicate.

    MinHashLSH keeps every kept document's band hashes, twice (per band and per key):
    about 3 KB per document measured at num_perm 128, threshold 0.8, so a million
    documents need about 3 GB. Its memory grows with the corpus; that is why
    near-duplicate removal is off by default.
    """

    def __init__(self, params: CleanParams) -> None:
        self.min_bytes = params.min_bytes
        self.lsh = lsh_index(params) if params.near_dup_threshold > 0 else None
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._lsh_keys = 0

    def too_short(self, text: str) -> bool:
        """Whether the text is dropped for its length (the first rule; counted)."""
        if len(text.encode()) < self.min_bytes:
            self.dropped["too_short"] += 1
            return True
        return False

    def drop_reason(self, duplicate: bool, minhash: MinHash | None) -> str | None:
        """Why a long enough document is dropped (``duplicate``: an earlier document had
        its text), or None to keep it (and remember its MinHash)."""
        reason = "exact_duplicate" if duplicate else self._near_duplicate(minhash)
        if reason is not None:
            self.dropped[reason] += 1
        return reason

    def _near_duplicate(self, minhash: MinHash | None) -> str | None:
        if self.lsh is None or minhash is None:
            return None
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


def clean_table(input_dir: Path, writer: DocumentWriter, params: CleanParams, scratch: Path,
                batch_documents: int = BATCH_DOCUMENTS,
                on_batch: Callable[[int], None] = lambda _: None) -> dict[str, int]:
    """Clean the raw table ``input_dir`` into ``writer``; return the clean metrics.

    When the exact-dedup keys of all documents do not fit ``clean.dedup_memory_mb``, the
    folder ``scratch`` is created for the spilled keys and the cleaned documents, and
    deleted at the end (:func:`pipeline.data.dedup.scratch_path` names one beside the
    output). ``batch_documents`` is the rows per worker task; ``on_batch`` gets the rows
    of each batch cleaned (for a progress bar). With more than one worker the processes
    are spawned, so a script that calls this needs the usual ``if __name__ ==
    "__main__":`` guard. A table that is empty, or whose every document is dropped, is
    an error.
    """
    total = count_documents(input_dir)
    if total == 0:
        raise GptpipeError(
            f"{table_path(input_dir)}: 0 documents; check data.corpus (ingest read nothing)"
        )
    filters = Filters(params)
    counts = dict.fromkeys(("bytes_in", "bytes_out", "invalid_bytes", "chars_removed"), 0)
    cleaned = CleanedDocuments(input_dir, total, params, batch_documents, counts, on_batch)
    partitions = spill_partitions(params, total)
    if partitions == 1:
        _clean_in_one_pass(cleaned, filters, writer)
    else:
        with scratch_folder(scratch) as folder:
            _clean_in_two_passes(cleaned, filters, writer, folder, partitions)
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


def spill_partitions(params: CleanParams, documents: int) -> int:
    """Partitions the exact-dedup keys of ``documents`` spill to; 1: they stay in memory."""
    if not params.dedup:
        return 1
    return partitions_needed(documents, params.dedup_memory_mb * MB)


@dataclass
class CleanedDocuments:
    """The raw table's documents, cleaned by worker processes, in document order."""

    input_dir: Path
    total: int  # documents in the table
    params: CleanParams
    batch_documents: int
    counts: dict[str, int]  # bytes_in, invalid_bytes and chars_removed are added up here
    on_batch: Callable[[int], None]

    def documents(self, with_minhashes: bool
                  ) -> Iterator[tuple[int, str, str, bytes | None, MinHash | None]]:
        """Each document's id, source, clean text, dedup key (None when ``clean.dedup``
        is off) and MinHash (None unless ``with_minhashes`` and it is long enough)."""
        workers = worker_count(self.params, math.ceil(self.total / self.batch_documents))
        batches = ordered_map(clean_batch, self._jobs(with_minhashes), workers, "clean")
        for (ids, sources), cleaned in batches:
            self.counts["bytes_in"] += cleaned.bytes_in
            self.counts["chars_removed"] += cleaned.chars_removed
            for i, text in enumerate(cleaned.texts):
                key = cleaned.keys[i] if cleaned.keys is not None else None
                minhash = cleaned.minhashes[i] if cleaned.minhashes is not None else None
                yield ids[i], sources[i], text, key, minhash
            self.on_batch(len(ids))

    def _jobs(self, with_minhashes: bool
              ) -> Iterator[tuple[tuple[list[int], list[str]], CleanJob]]:
        params = self.params
        columns = ("id", "source", "text", "invalid_bytes")
        for batch in iter_batches(self.input_dir, columns=columns,
                                  batch_size=self.batch_documents):
            self.counts["invalid_bytes"] += pc.sum(batch.column("invalid_bytes")).as_py() or 0
            meta = (batch.column("id").to_pylist(), batch.column("source").to_pylist())
            yield meta, CleanJob(
                texts=batch.column("text").to_pylist(),
                form=params.normalization,
                min_bytes=params.min_bytes,
                dedup=params.dedup,
                near_dup=with_minhashes,
                ngram=params.near_dup_ngram,
                num_perm=params.near_dup_num_perm,
            )


def _keep(writer: DocumentWriter, counts: dict[str, int], doc_id: int, source: str,
          text: str) -> None:
    writer.append(id=doc_id, source=source, text=text)
    counts["bytes_out"] += len(text.encode("utf-8"))


def _clean_in_one_pass(cleaned: CleanedDocuments, filters: Filters, writer: DocumentWriter
                       ) -> None:
    """Every document decided as it comes, its key checked against a set in memory."""
    seen = SeenKeys()
    for doc_id, source, text, key, minhash in cleaned.documents(filters.lsh is not None):
        if filters.too_short(text):
            continue
        duplicate = key is not None and seen.seen_before(key)
        if filters.drop_reason(duplicate, minhash) is None:
            _keep(writer, cleaned.counts, doc_id, source, text)


def _clean_in_two_passes(cleaned: CleanedDocuments, filters: Filters, writer: DocumentWriter,
                         folder: Path, partitions: int) -> None:
    """Exact dedup with its keys spilled to ``folder``: the first pass cleans, drops the
    short documents and writes the others and their keys there; the second reads them
    back in order and drops the later copies (then the near duplicates), so every
    decision is the one :func:`_clean_in_one_pass` makes."""
    params = cleaned.params
    keys = SpilledKeys(folder, partitions, params.dedup_memory_mb * MB)
    long_enough = folder / "documents"
    long_enough.mkdir()
    with DocumentWriter(long_enough) as spilled:
        for doc_id, source, text, key, _ in cleaned.documents(with_minhashes=False):
            if not filters.too_short(text):
                spilled.append(id=doc_id, source=source, text=text)
                assert key is not None  # spilling happens only with clean.dedup on
                keys.add(key)
    later_copies = keys.duplicates()
    next_copy = next(later_copies, None)
    documents = _signed_documents(long_enough, params, cleaned.batch_documents,
                                  filters.lsh is not None)
    for ordinal, (doc_id, source, text, minhash) in enumerate(documents):
        duplicate = ordinal == next_copy
        if duplicate:
            next_copy = next(later_copies, None)
        if filters.drop_reason(duplicate, minhash) is None:
            _keep(writer, cleaned.counts, doc_id, source, text)


def _signed_documents(table: Path, params: CleanParams, batch_documents: int,
                      with_minhashes: bool) -> Iterator[tuple[int, str, str, MinHash | None]]:
    """The documents of a clean table, each with its MinHash when ``with_minhashes``
    (computed by worker processes), else None."""
    batches = iter_batches(table, batch_size=batch_documents)
    if with_minhashes:
        workers = worker_count(params, math.ceil(count_documents(table) / batch_documents))
        jobs = ((batch, SignJob(batch.column("text").to_pylist(), params.near_dup_ngram,
                                params.near_dup_num_perm)) for batch in batches)
        signed = ordered_map(sign_batch, jobs, workers, "clean")
    else:
        signed = ((batch, None) for batch in batches)
    for batch, minhashes in signed:
        ids, sources, texts = (batch.column(name).to_pylist() for name in ("id", "source", "text"))
        for i, text in enumerate(texts):
            yield ids[i], sources[i], text, minhashes[i] if minhashes is not None else None
