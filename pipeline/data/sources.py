"""Sources of a corpus: which part of the corpus each document came from, where each
part's documents lie in a split's token stream, and how training weighs the parts.

With ``data.sources: subfolders`` every top-level entry of a folder corpus (a subfolder,
or a file beside them) is a source, named by that entry. Every document already carries
its corpus-relative path through ingest, clean and split (the document tables' ``source``
column: ``notes/a.txt``, ``code/b.jsonl#7``, ``book.txt:12``), so its source is the
path's first segment (:func:`source_name`). Tokenize records, per split, the runs of
consecutive documents of one source as token spans (``<split>/sources.parquet``: source,
start, end), which is what pretraining needs to draw windows by source and what a
reader needs to find a source in the stream. With ``data.sources: one`` nothing of this
is written and every output is what it was before sources existed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_path

SPANS_NAME = "sources.parquet"
_SPANS_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("start", pa.int64(), nullable=False),  # the run's first token (its <bos>)
    pa.field("end", pa.int64(), nullable=False),  # one past its last token
])
# What a reader appends to a file's path for one document of it: a paragraph or line
# number (``:N``) or a record number (``#N``).
_PART = re.compile(r"[:#]\d+\Z")


def source_name(source: str) -> str:
    """The source a document belongs to, from its corpus-relative ``source`` path: the
    first path segment (a top-level file is its own source, without the ``:N``/``#N``
    that names a part of it)."""
    head, slash, _ = source.partition("/")
    return head if slash else _PART.sub("", source)


def corpus_sources(corpus: str) -> list[str]:
    """The sources of a folder corpus (its top-level entries, hidden names skipped,
    sorted), or one line saying why ``data.sources: subfolders`` cannot apply."""
    root = Path(corpus)
    if not root.is_dir():
        raise GptpipeError(f"data.sources = 'subfolders' with data.corpus = {corpus!r}, "
                           "not a folder; allowed: a folder whose subfolders are the sources, "
                           "or data.sources: one")
    return sorted(entry.name for entry in root.iterdir() if not entry.name.startswith("."))


def check_weight_names(weights: Mapping[str, float], sources: Iterable[str],
                       where: str) -> None:
    """One line when a weighted source is not among ``sources`` (found in ``where``) or
    every source would weigh 0."""
    known = list(sources)
    for name in weights:
        if name not in known:
            raise GptpipeError(f"train.source_weights.{name}: no source {name!r} in {where}; "
                               f"allowed: {', '.join(known) or 'none found'}")
    if known and all(weights.get(name, 1.0) == 0 for name in known):
        raise GptpipeError(f"train.source_weights = {dict(weights)!r}: every source weighs 0; "
                           "allowed: at least one weight > 0")


class SpanRecorder:
    """Collects one split's source spans while its documents are tokenized in order."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.tokens: dict[str, int] = {}
        self.documents: dict[str, int] = {}

    def add(self, sources: list[str], lengths: np.ndarray, offset: int) -> None:
        """A batch of documents (their ``source`` paths and (D,) token counts) placed in
        the stream at ``offset``."""
        position = offset
        for source, length in zip(sources, lengths.tolist(), strict=True):
            name = source_name(source)
            if self.names and self.names[-1] == name and self.ends[-1] == position:
                self.ends[-1] += length
            else:
                self.names.append(name)
                self.starts.append(position)
                self.ends.append(position + length)
            self.tokens[name] = self.tokens.get(name, 0) + length
            self.documents[name] = self.documents.get(name, 0) + 1
            position += length

    def counts(self) -> dict[str, dict[str, int]]:
        """Per source: documents and tokens of the split, by name."""
        return {name: {"documents": self.documents[name], "tokens": self.tokens[name]}
                for name in sorted(self.tokens)}

    def write(self, split_dir: Path) -> None:
        table = pa.table({"source": self.names, "start": self.starts, "end": self.ends},
                         schema=_SPANS_SCHEMA)
        with atomic_path(split_dir / SPANS_NAME) as tmp:
            pq.write_table(table, tmp, compression="zstd", write_statistics=False)


@dataclass(frozen=True)
class SourceSpans:
    """Where each source's documents lie in a split's token stream."""

    names: list[str]  # (R,) the source of each run of consecutive documents
    starts: np.ndarray  # (R,) int64: the run's first token
    ends: np.ndarray  # (R,) int64: one past its last token

    def sources(self) -> list[str]:
        return sorted(set(self.names))

    def tokens(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for name, start, end in zip(self.names, self.starts.tolist(), self.ends.tolist(),
                                    strict=True):
            found[name] = found.get(name, 0) + end - start
        return {name: found[name] for name in sorted(found)}


def read_spans(split_dir: Path) -> SourceSpans | None:
    """The split's source spans, or None where tokenize wrote none (one source)."""
    path = Path(split_dir) / SPANS_NAME
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        return SourceSpans(table.column("source").to_pylist(),
                           table.column("start").to_numpy().astype(np.int64),
                           table.column("end").to_numpy().astype(np.int64))
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise GptpipeError(f"{path}: not a readable source span table ({err}); "
                           "run dvc repro tokenize") from None


@dataclass(frozen=True)
class WeightedStarts:
    """The window starts training may draw, each source's given its share.

    A window start is drawn by picking a source with probability ``shares`` and then a
    start uniformly among that source's starts: its runs' token positions, those before
    ``high`` (a window must fit in the stream). A window may run on past its source's
    last token, as windows run on past a document's."""

    run_starts: np.ndarray  # (R,) int64: each run's first start
    run_lengths: np.ndarray  # (R,) int64: how many starts it offers (0: none fit)
    source_of_run: np.ndarray  # (R,) int64: index into names
    names: list[str]
    shares: np.ndarray  # (S,) float64: each source's probability, summing to 1

    def draw(self, count: int, generator) -> np.ndarray:
        """(count,) int64 window starts, drawn with the torch ``generator``."""
        import torch  # training's generator; the data stages never need torch

        shares = torch.from_numpy(self.shares)
        picked = torch.multinomial(shares, count, replacement=True, generator=generator)
        where = torch.rand(count, generator=generator, dtype=torch.float64).numpy()
        picked = picked.numpy()
        starts = np.empty(count, np.int64)
        for index in range(len(self.names)):
            chosen = np.flatnonzero(picked == index)
            if len(chosen) == 0:
                continue
            runs = np.flatnonzero(self.source_of_run == index)
            lengths = self.run_lengths[runs]
            cumulative = np.cumsum(lengths)  # (r,) starts up to each run's end
            # A uniform position among the source's starts, then its run.
            position = np.minimum((where[chosen] * cumulative[-1]).astype(np.int64),
                                  cumulative[-1] - 1)
            run = np.searchsorted(cumulative, position, side="right")
            before = cumulative[run] - lengths[run]
            starts[chosen] = self.run_starts[runs[run]] + position - before
        return starts


def weighted_starts(spans: SourceSpans, weights: Mapping[str, float],
                    high: int) -> WeightedStarts | None:
    """The sampling plan for ``weights`` (unnamed sources weigh 1) over window starts
    below ``high``; None when every source weighs the same, where plain uniform sampling
    over the stream is the very same distribution (and keeps today's draws)."""
    names = spans.sources()
    factors = np.array([weights.get(name, 1.0) for name in names], np.float64)
    if len(set(factors.tolist())) <= 1:
        return None
    index = {name: i for i, name in enumerate(names)}
    run_starts = np.minimum(spans.starts, high)
    run_lengths = np.clip(np.minimum(spans.ends, high) - run_starts, 0, None)
    source_of_run = np.array([index[name] for name in spans.names], np.int64)
    starts_per_source = np.bincount(source_of_run, weights=run_lengths,
                                    minlength=len(names))
    mass = factors * starts_per_source
    if not mass.sum() > 0 or not all(math.isfinite(m) for m in mass):
        weighed = ", ".join(n for n, f in zip(names, factors, strict=True) if f > 0)
        raise GptpipeError(f"train.source_weights = {dict(weights)!r}: the sources weighted "
                           f"above 0 ({weighed}) hold no training window; allowed: a weight "
                           "> 0 on a source with at least one window of model.context tokens")
    return WeightedStarts(run_starts, run_lengths, source_of_run, names, mass / mass.sum())


def source_shares(spans: SourceSpans | None, weights: Mapping[str, float],
                  plan: WeightedStarts | None) -> dict[str, dict[str, float]]:
    """Per source: its train tokens, weight and share of the training windows (its share
    of the tokens, or the weighted ``plan``'s); {} for a corpus of one source."""
    if spans is None:
        return {}
    tokens = spans.tokens()
    total = sum(tokens.values())
    drawn = dict(zip(plan.names, plan.shares.tolist(), strict=True)) if plan else {}
    return {name: {"train_tokens": count, "weight": float(weights.get(name, 1.0)),
                   "window_share": round(drawn.get(name, count / total), 6)}
            for name, count in tokens.items()}
