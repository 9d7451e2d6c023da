"""The ``ingest`` stage: read the corpus named by ``data.corpus`` into a raw document table.

Reads:  ``data.corpus``, a file or a folder of txt, md, jsonl, json, csv or parquet files
        (each optionally .gz or .zst), or a builtin pointer such as
        data/builtin/wikipedia-en.corpus (see :mod:`pipeline.corpus`).
Params: the ``data`` section of params.yaml (:class:`pipeline.params.DataParams`:
        corpus, include, text_field, txt_unit).
Writes: the raw document table (``--out``, data/raw: id, source, text, invalid_bytes;
        ids count from 0 in corpus order) and flat JSON metrics (``--metrics``,
        metrics/ingest.json: files_read, files_skipped_binary, files_skipped_unsupported,
        documents, documents_skipped_empty, bytes, invalid_bytes).

Documents are streamed from the readers straight into the Parquet writer, so memory stays
flat however big the corpus is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.corpus import CorpusStats, corpus_bytes, iter_documents
from pipeline.doctable import RAW_SCHEMA, DocumentWriter
from pipeline.io import atomic_dir, write_json
from pipeline.params import DataParams, load_params
from pipeline.progress import progress


def run(params: DataParams, out_dir: Path, metrics_path: Path) -> dict[str, int]:
    """Ingest ``params.corpus`` into ``out_dir``, write ``metrics_path``, return the metrics."""
    stats = CorpusStats()
    # The total needs a second walk over a folder corpus; only a visible bar is worth it.
    total = corpus_bytes(params) if sys.stderr.isatty() else None
    with (
        atomic_dir(out_dir) as tmp,
        DocumentWriter(tmp, RAW_SCHEMA) as writer,
        progress(total=total, desc="ingest", unit="B", unit_scale=True) as bar,
    ):
        for index, document in enumerate(iter_documents(params, stats, bar.update)):
            writer.append(
                id=index,
                source=document.source,
                text=document.text,
                invalid_bytes=document.invalid_bytes,
            )
    metrics = stats.as_metrics()
    write_json(metrics_path, metrics)
    return metrics


@click.command(
    "ingest",
    help="Read the corpus named by data.corpus into a raw document table (params section: data).",
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The params.yaml to read the data section from.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The raw document table directory to write (data/raw).",
)
@click.option(
    "--metrics",
    "metrics_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON metrics file to write (metrics/ingest.json).",
)
def main(params_path: Path, out_dir: Path, metrics_path: Path) -> None:
    params = load_params(params_path).data
    metrics = run(params, out_dir, metrics_path)
    skipped = metrics["files_skipped_binary"] + metrics["files_skipped_unsupported"]
    click.echo(
        f"ingest: {metrics['documents']} documents ({metrics['bytes']} bytes) from "
        f"{metrics['files_read']} files ({skipped} skipped) -> {out_dir}",
        err=True,
    )
