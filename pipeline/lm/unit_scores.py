"""What a split's figures average, unit by unit: per-document and per-window sums of
the scored targets, and the standard errors they give.

A split's token stream holds its documents in table order, each as ``<bos> ids <eos>``
(:mod:`pipeline.data.shards`), so the ``<bos>`` positions say which document every
target belongs to: a target belongs to the document that holds its position (the
``<bos>`` that opens a document is its own first target, predicted after the previous
document's ``<eos>``). Bits per byte, loss and accuracy are ratios of sums over targets,
so they are also ratios of per-document sums, and resampling documents (the bootstrap
of :mod:`pipeline.core.stats`) says how much another test set of as many documents
would move them. A split of fewer than ``MIN_UNITS`` scored documents (a few books) is
resampled by windows instead: its documents are too few to show their own spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.stats import MIN_UNITS, bootstrap_sums, spread
from pipeline.data.shards import TokenFile, TokenStream
from pipeline.data.sources import source_name
from pipeline.data.tokenizer import BOS_ID


def document_starts(tokens: TokenStream, bos_id: int = BOS_ID) -> np.ndarray:
    """(D,) int64: the stream position of each document's ``<bos>``, in order."""
    if not isinstance(tokens, TokenFile):
        return np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
    found, offset = [], 0
    for chunk in tokens.chunks():
        found.append(np.flatnonzero(chunk == bos_id).astype(np.int64) + offset)
        offset += len(chunk)
    return np.concatenate(found) if found else np.empty(0, np.int64)


@dataclass(frozen=True)
class UnitSums:
    """Sums over the scored targets of each unit that has any (documents or windows)."""

    index: np.ndarray  # (U,) int64: the document's position in the split, or the window's
    tokens: np.ndarray  # (U,) int64: targets scored
    nats: np.ndarray  # (U,) float64: their summed negative log-likelihood
    correct: np.ndarray  # (U,) int64: targets that were the top-1 prediction
    weight: np.ndarray  # (U,) float64: the bytes the targets stand for (token bytes)

    def __len__(self) -> int:
        return len(self.index)


class ScoreLedger:
    """Per-target results added batch by batch, summed per document and per window.

    ``starts``: :func:`document_starts` of the stream; ``byte_lengths``: the bytes each
    id stands for (``TextTokenizer.byte_lengths``; None: every target weighs one)."""

    def __init__(self, starts: np.ndarray, byte_lengths: np.ndarray | None) -> None:
        self.starts = np.asarray(starts, dtype=np.int64)
        self.byte_lengths = byte_lengths
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._windows = 0

    def add(self, window_starts: np.ndarray, batch: np.ndarray, nats: np.ndarray,
            hits: np.ndarray) -> None:
        """One scored batch: its (B,) window start positions, its (B, T + 1) windows and
        the (B, T) nats and top-1 hits of their targets."""
        rows, width = nats.shape
        positions = np.asarray(window_starts, np.int64)[:, None] + 1 + np.arange(width)
        documents = np.searchsorted(self.starts, positions, side="right") - 1  # (B, T)
        windows = np.broadcast_to(self._windows + np.arange(rows)[:, None], (rows, width))
        targets = batch[:, 1:].astype(np.int64)
        weight = (self.byte_lengths[targets].astype(np.float64)
                  if self.byte_lengths is not None else np.ones(targets.shape))
        self._parts.append((documents.ravel(), windows.ravel(), nats.ravel(),
                            hits.ravel().astype(np.int64), weight.ravel()))
        self._windows += rows

    def documents(self) -> UnitSums:
        return self._sums(0, max(len(self.starts), 1))

    def windows(self) -> UnitSums:
        return self._sums(1, max(self._windows, 1))

    def _sums(self, which: int, count: int) -> UnitSums:
        if not self._parts:
            empty = np.empty(0, np.int64)
            return UnitSums(empty, empty, empty.astype(np.float64), empty,
                            empty.astype(np.float64))
        unit = np.clip(np.concatenate([part[which] for part in self._parts]), 0, None)
        nats, hits, weight = (np.concatenate([part[k] for part in self._parts])
                              for k in (2, 3, 4))
        tokens = np.bincount(unit, minlength=count)
        kept = np.flatnonzero(tokens)
        return UnitSums(kept, tokens[kept],
                        np.bincount(unit, weights=nats, minlength=count)[kept],
                        np.bincount(unit, weights=hits, minlength=count)[kept].astype(np.int64),
                        np.bincount(unit, weights=weight, minlength=count)[kept])


def resampling_units(documents: UnitSums, windows: UnitSums) -> tuple[str, UnitSums]:
    """("documents", their sums), or ("windows", ...) when too few documents were
    scored to resample them."""
    if len(documents) >= MIN_UNITS or len(windows) < len(documents):
        return "documents", documents
    return "windows", windows


def split_errors(units: UnitSums, scored_bytes: float, resamples: int,
                 seed: int) -> dict[str, float]:
    """Bootstrap standard errors of a split's loss, ppl, bpb and acc over ``units``
    (``scored_bytes``: the bytes the bits per byte divide by; the units' weights are
    scaled to it, so the resampled figures centre on the reported ones)."""
    sums = bootstrap_sums(np.column_stack([units.nats, units.tokens, units.correct,
                                           units.weight]), resamples, seed)  # (R, 4)
    loss = sums[:, 0] / sums[:, 1]  # (R,) nats per token
    per_weight = float(units.weight.sum()) / scored_bytes if scored_bytes > 0 else 1.0
    return {
        "loss_se": spread(loss),
        "ppl_se": spread(np.exp(loss)),
        "bpb_se": spread(sums[:, 0] / sums[:, 3] * per_weight / math.log(2)),
        "acc_se": spread(sums[:, 2] / sums[:, 1]),
    }


def source_figures(rows: dict[str, list], resamples: int, seed: int) -> dict[str, float]:
    """Bits per byte and loss of each source of each split, with their bootstrap standard
    errors over the source's documents, from the per-document rows
    (:func:`pipeline.lm.score_tables.document_rows`), as flat keys
    ``<split>.sources.<source>.<figure>``. A source of one scored document has no spread
    to show: its figures come without ``*_se``."""
    splits = np.asarray(rows["split"], dtype=object)
    names = np.asarray([source_name(source) for source in rows["source"]], dtype=object)
    tokens = np.asarray(rows["tokens"], np.int64)
    nats = np.asarray(rows["nats"], np.float64)
    weight = np.asarray(rows["bytes"], np.float64)  # scaled to the split's scored bytes
    correct = np.asarray(rows["correct"], np.int64)
    found: dict[str, float] = {}
    for split in dict.fromkeys(splits.tolist()):
        for name in sorted(set(names[splits == split].tolist())):
            chosen = np.flatnonzero((splits == split) & (names == name))
            units = UnitSums(chosen, tokens[chosen], nats[chosen], correct[chosen],
                             weight[chosen])
            scored_bytes = float(units.weight.sum())
            prefix = f"{split}.sources.{name}."
            found[prefix + "bpb"] = float(units.nats.sum()) / scored_bytes / math.log(2)
            found[prefix + "loss"] = float(units.nats.sum() / units.tokens.sum())
            if len(units) >= 2:
                errors = split_errors(units, scored_bytes, resamples, seed)
                found[prefix + "bpb_se"] = errors["bpb_se"]
                found[prefix + "loss_se"] = errors["loss_se"]
            found[prefix + "documents"] = len(units)
            found[prefix + "tokens"] = int(units.tokens.sum())
            found[prefix + "bytes"] = round(scored_bytes)
    return found
