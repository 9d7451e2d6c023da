"""The ``split`` stage: assign each clean document to train, val or test.

Reads:  the clean document table (``--input``, data/clean: id, source, text).
Params: the ``split`` section of params.yaml (:class:`pipeline.params.SplitParams`).
Writes: one document table per split (``--out``, data/split/{train,val,test}/
        part-00000.parquet) and flat JSON metrics (``--metrics``, metrics/split.json).

The split of a document is a hash of its text and ``split.seed``
(:func:`pipeline.splitting.assign_split`), so adding documents never moves the others
and identical texts never straddle two splits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from pipeline.doctable import DOCUMENT_SCHEMA, DocumentWriter, count_documents, iter_batches
from pipeline.errors import GptpipeError
from pipeline.io import atomic_dir, write_json
from pipeline.params import SplitParams, load_params
from pipeline.progress import progress
from pipeline.splitting import SPLITS, assign_split, documents_for_nonempty


def _fraction(part: int, whole: int) -> float:
    # Rounded so metrics stay readable; 6 digits is finer than any split anyone tunes.
    return round(part / whole, 6) if whole else 0.0


def _empty_split_error(params: SplitParams, counts: dict[str, int], input_dir: Path) -> None:
    """Raise if a split got no document, saying how large a corpus avoids that."""
    total = sum(counts.values())
    empty = next((name for name in SPLITS if counts[name] == 0), None)
    if empty is None:
        return
    fractions = {name: getattr(params, name) for name in SPLITS}
    smallest = min(SPLITS, key=fractions.__getitem__)
    likely = documents_for_nonempty(fractions[smallest])
    raise GptpipeError(
        f"split: {empty} got 0 of {total} documents from {input_dir}; allowed: a corpus in "
        f"which every split gets a document (at least {len(SPLITS)} documents; about "
        f"{likely} make an empty {smallest} split unlikely at "
        f"{smallest}={fractions[smallest]:g})"
    )


def run(params: SplitParams, input_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Split ``input_dir`` into ``out_dir``/{train,val,test}, write and return the metrics."""
    total = count_documents(input_dir)
    documents = dict.fromkeys(SPLITS, 0)
    sizes = dict.fromkeys(SPLITS, 0)
    with (
        atomic_dir(out_dir) as tmp,
        contextlib.ExitStack() as stack,
        progress(total=total, desc="split", unit="doc") as bar,
    ):
        writers: dict[str, DocumentWriter] = {}
        for name in SPLITS:
            (tmp / name).mkdir()
            writers[name] = stack.enter_context(DocumentWriter(tmp / name, DOCUMENT_SCHEMA))
        for batch in iter_batches(input_dir, columns=("id", "source", "text")):
            for row in batch.to_pylist():
                name = assign_split(row["text"], params.seed, params.train, params.val)
                writers[name].append(**row)
                documents[name] += 1
                sizes[name] += len(row["text"].encode("utf-8"))
            bar.update(batch.num_rows)
        _empty_split_error(params, documents, input_dir)
    total_bytes = sum(sizes.values())
    metrics: dict[str, Any] = {"documents": total}
    for name in SPLITS:
        metrics[name] = {
            "documents": documents[name],
            "bytes": sizes[name],
            "fraction_documents": _fraction(documents[name], total),
            "fraction_bytes": _fraction(sizes[name], total_bytes),
        }
    write_json(metrics_path, metrics)
    return metrics


@click.command(
    "split",
    help="Assign each clean document to train/val/test by a hash of its text "
    "(params section: split).",
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The params.yaml to read the split section from.",
)
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The clean document table directory (data/clean).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory to write train/, val/ and test/ document tables into (data/split).",
)
@click.option(
    "--metrics",
    "metrics_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON metrics file to write (metrics/split.json).",
)
def main(params_path: Path, input_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    params = load_params(params_path).split
    metrics = run(params, input_dir, out_dir, metrics_path)
    counts = ", ".join(f"{name} {metrics[name]['documents']}" for name in SPLITS)
    click.echo(f"split: {metrics['documents']} documents: {counts} -> {out_dir}", err=True)
