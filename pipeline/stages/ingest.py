"""The ``ingest`` stage: read the corpus named by ``data.corpus`` into a raw document table.

Reads:  ``data.corpus``, a file or a folder of text files (any suffix; jsonl, json, csv
        and parquet by field; each optionally .gz or .zst), or a builtin pointer such as
        data/builtin/wikipedia-en.corpus (see :mod:`pipeline.data.corpus`).
Params: the ``data`` section of params.yaml (:class:`pipeline.core.params.DataParams`:
        corpus, include, text_field, txt_unit, encoding, workers, sources; with
        sources: subfolders, train.source_weights must name the corpus folder's entries).
Writes: the raw document table (``--out``, data/raw: id, source, text, invalid_bytes;
        ids count from 0 in corpus order) and flat JSON metrics (``--metrics``,
        metrics/ingest.json: files_read, files_skipped_binary, text_files_whole,
        text_files_in_paragraphs, text_files_in_lines (how data.txt_unit read the plain-text
        files), documents, documents_skipped_empty, bytes, invalid_bytes).

The readers are :mod:`pipeline.data.corpus`; a table row is written per document as it
comes (:func:`pipeline.data.corpus.reading.iter_documents`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.io import atomic_dir, write_json
from pipeline.core.parallel import usable_cores
from pipeline.core.params import DataParams, Params
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.corpus.planning import RANGE_BYTES, CorpusStats, auto_unit_reason
from pipeline.data.corpus.reading import corpus_bytes, iter_documents
from pipeline.data.doctable import RAW_SCHEMA, DocumentWriter
from pipeline.data.sources import check_weight_names, corpus_sources


def run(params: Params, *, out: Path, metrics: Path,
        range_bytes: int = RANGE_BYTES) -> dict[str, int]:
    """Ingest ``data.corpus`` into ``out``, write and return the metrics.

    ``range_bytes``: the size of one worker task (tests make it small to cut tiny files).
    With more than one worker the processes are spawned, so a script that calls this
    needs the usual ``if __name__ == "__main__":`` guard.
    """
    data = params.data
    if data.sources != "one":  # before any reading: a weight naming no source is a typo
        check_weight_names(params.train.source_weights, corpus_sources(data.corpus),
                           data.corpus)
    workers = data.workers or usable_cores()
    stats = CorpusStats()
    # The total needs a second walk over a folder corpus; only a visible bar is worth it.
    total = corpus_bytes(data) if sys.stderr.isatty() else None
    with (
        atomic_dir(out) as tmp,
        DocumentWriter(tmp, RAW_SCHEMA) as writer,
        progress(total=total, desc="ingest", unit="B", unit_scale=True) as bar,
    ):
        documents = iter_documents(data, stats, bar.update, workers, range_bytes)
        for index, document in enumerate(documents):
            writer.append(
                id=index,
                source=document.source,
                text=document.text,
                invalid_bytes=document.invalid_bytes,
            )
    result = stats.as_metrics()
    write_json(metrics, result)
    _report(data, stats, out)
    return result


def _report(data: DataParams, stats: CorpusStats, out: Path) -> None:
    """What ingest read, how it cut the plain-text files, and what did not decode."""
    say("ingest", f"{stats.documents} documents ({stats.bytes} bytes) from "
                  f"{stats.files_read} files ({stats.files_skipped_binary} skipped as "
                  f"binary) -> {out}")
    units = [f"{count} {how}" for count, how in (
        (stats.text_files_whole, "whole"),
        (stats.text_files_in_paragraphs, "in blank-line paragraphs"),
        (stats.text_files_in_lines, "one document per line")) if count]
    if units:
        how = f"auto: {auto_unit_reason(stats)}" if data.txt_unit == "auto" else data.txt_unit
        say("ingest", f"plain-text files read {', '.join(units)} (data.txt_unit: {how})")
    encoding = f"data.encoding = {data.encoding}"
    if stats.files_skipped_binary:
        say("ingest", f"{stats.files_skipped_binary} files skipped: not text in {encoding} "
                      "(binary files, or text in another encoding: set data.encoding)")
    if stats.invalid_bytes:
        say("ingest", f"{stats.invalid_bytes} bytes invalid in {encoding} were replaced with "
                      "U+FFFD (if the files are in another encoding, set data.encoding)")


main = stage_command(
    "ingest", run,
    out="The raw document table to write (data/raw).",
    metrics="",
)
