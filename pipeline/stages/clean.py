"""The ``clean`` stage: normalize, filter and deduplicate the raw documents.

Reads:  the raw document table (``--input``, data/raw: id, source, text, invalid_bytes).
Params: the ``clean`` section of params.yaml (:class:`pipeline.core.params.CleanParams`:
        normalization, min_bytes, dedup, near_dup_threshold, near_dup_num_perm,
        near_dup_ngram, workers, dedup_memory_mb).
Writes: the clean document table (``--out``, data/clean: id, source, text; the raw id and
        source are kept) and flat JSON metrics (``--metrics``, metrics/clean.json:
        documents_in, documents_out, bytes_in, bytes_out, invalid_bytes, chars_removed
        and dropped_too_short, dropped_exact_duplicate, dropped_near_duplicate).

The rules and the filters are :mod:`pipeline.data.text` and :mod:`pipeline.data.cleaning`.
A corpus with more documents than clean.dedup_memory_mb holds dedup keys for is cleaned in
two passes, its keys and cleaned documents spilled to a temporary folder beside ``--out``
(``.<out>-dedup.tmp-<pid>``, deleted at the end): the same documents are kept.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.cleaning import BATCH_DOCUMENTS, clean_table, spill_partitions
from pipeline.data.dedup import scratch_path
from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter, count_documents


def run(params: Params, *, input: Path, out: Path, metrics: Path,
        batch_documents: int = BATCH_DOCUMENTS) -> dict[str, int]:
    """Clean the ``input`` table into ``out``, write and return the metrics.

    ``batch_documents`` is the rows per worker task (tests make it small to use several
    workers on a tiny corpus). With more than one worker the processes are spawned, so a
    script that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    total = count_documents(input)
    partitions = spill_partitions(params.clean, total)
    if partitions > 1:
        say("clean", f"{total} documents: more dedup keys than clean.dedup_memory_mb = "
                     f"{params.clean.dedup_memory_mb} holds; spilling them to {partitions} "
                     "partitions (two passes)")
    with (
        atomic_dir(out) as tmp,
        DocumentWriter(tmp, DOCUMENT_SCHEMA) as writer,
        progress(total=total, desc="clean", unit="doc") as bar,
    ):
        result = clean_table(input, writer, params.clean, scratch_path(out), batch_documents,
                             bar.update)
    write_json(metrics, result)
    dropped = result["documents_in"] - result["documents_out"]
    say("clean", f"kept {result['documents_out']} of {result['documents_in']} documents "
                 f"({dropped} dropped) -> {out}")
    return result


main = stage_command(
    "clean", run,
    input="The raw document table (data/raw).",
    out="The clean document table to write (data/clean).",
    metrics="",
)
