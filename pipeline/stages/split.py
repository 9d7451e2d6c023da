"""The ``split`` stage: assign each clean document to train, val or test.

Reads:  the clean document table (``--input``, data/clean: id, source, text).
Params: the ``split`` section of params.yaml (:class:`pipeline.core.params.SplitParams`).
Writes: one document table per split (``--out``, data/split/{train,val,test}/
        part-00000.parquet) and flat JSON metrics (``--metrics``, metrics/split.json).

The split of a document is a hash of its text and ``split.seed``
(:func:`pipeline.data.splitting.assign_split`), so adding documents never moves the others
and identical texts never straddle two splits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params, SplitParams
from pipeline.core.progress import progress
from pipeline.core.stage import say, stage_command
from pipeline.data.corpus import source_unit
from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter, count_documents, iter_batches
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


def run(params: Params, *, input: Path, out: Path, metrics: Path) -> dict[str, Any]:
    """Split the ``input`` table into ``out``/{train,val,test}, write and return the metrics."""
    split, input_dir = params.split, input
    total = count_documents(input_dir)
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
        for batch in iter_batches(input_dir, columns=("id", "source", "text")):
            for row in batch.to_pylist():
                name = assign_split(row["text"], split.seed, split.train, split.val)
                writers[name].append(**row)
                documents[name] += 1
                sizes[name] += len(row["text"].encode("utf-8"))
            bar.update(batch.num_rows)
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
    "split", run, "Assign each clean document to train/val/test by a hash of its text.",
    input="The clean document table (data/clean).",
    out="The folder to write train/, val/ and test/ document tables into (data/split).",
    metrics="",
)
