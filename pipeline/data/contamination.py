"""How much of a held-out text the training text already holds: pure functions.

Three measures, each for any script and for code (words are :func:`pipeline.data.units.words`:
a run of letters or an identifier where the text has spaces, one character where it has none,
as in Chinese, Japanese or Thai):

- **exact duplicate**: the same words in the same order, case, punctuation and spacing
  aside (:func:`word_key`). The split hashes the text itself, so identical texts never
  straddle two splits; this finds the copies that differ only in those details;
- **near duplicate** (a near twin): a train document whose MinHash Jaccard over word
  shingles reaches a threshold, found by the MinHashLSH that the clean stage's
  near-duplicate filter uses (:class:`TwinFinder`);
- **n-gram overlap**: the share of a text's distinct word n-grams (GPT-3's 13-grams by
  default) that occur anywhere in the train split (:class:`NgramIndex`). A text shorter than
  n words has no n-gram and is counted apart, as too short to check. On a corpus too big
  to hold 8 bytes per train n-gram, a fixed share of n-grams, picked by hash, stands
  for all (:func:`sampled`): the share's interval widens, the memory shrinks.

A share over documents is an estimate of the rate for texts like them, so it carries its
uncertainty: :func:`ratio_standard_error` (n-grams pooled over documents, the document being
the unit that was sampled) and :func:`wilson_interval` (a share of documents or items: it
stays honest at 0 found). Counts are counts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.params import ContaminationParams
from pipeline.data.cleaning import MINHASH_SEED, lsh_index
from pipeline.data.text import word_shingles
from pipeline.data.units import words

if TYPE_CHECKING:
    from datasketch import MinHash

# The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def word_key(text: str) -> bytes:
    """A 16-byte digest of ``text``'s casefolded words joined by one space: equal keys mean
    the same words in the same order, whatever the case, punctuation or spacing."""
    joined = " ".join(words(text.casefold()))
    return hashlib.blake2b(joined.encode("utf-8"), digest_size=16).digest()


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The distinct casefolded word n-grams of ``text``, each as the first 8 bytes of its
    blake2b digest (uint64, sorted); empty for a text of fewer than ``n`` words.

    8 bytes keep a train split's n-grams small (8 bytes each in a sorted array); two
    n-grams share a hash with probability about 2**-64 per pair, far below any share
    this reports.
    """
    if n < 1:
        raise ValueError(f"n-gram length must be >= 1, got {n}")
    units = words(text.casefold())
    grams = {" ".join(units[i:i + n]) for i in range(len(units) - n + 1)}
    hashes = [int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "big")
              for g in grams]
    return np.unique(np.array(hashes, dtype=np.uint64))


def sampled(hashes: np.ndarray, sample: float) -> np.ndarray:
    """The hashes below ``sample`` * 2**64: the same n-grams are kept in every text, so a
    held-out n-gram kept is found exactly when train has it, and about ``sample`` of
    them are kept (hashes are uniform)."""
    if sample >= 1.0:
        return hashes
    return hashes[hashes < np.uint64(int(sample * 2**64))]


class NgramIndex:
    """The distinct n-gram hashes of a training text (the ``sample`` of them that
    :func:`sampled` keeps), sorted, for membership counts: 8 bytes per n-gram kept."""

    def __init__(self, n: int, sample: float = 1.0) -> None:
        self.n = n
        self.sample = sample
        self._parts: list[np.ndarray] = []
        self._sorted: np.ndarray | None = None

    def add(self, text: str) -> None:
        self._parts.append(sampled(ngram_hashes(text, self.n), self.sample))
        self._sorted = None

    def __len__(self) -> int:
        return len(self._table())

    def _table(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.unique(np.concatenate([np.zeros(0, np.uint64), *self._parts]))
            self._parts = [self._sorted]
        return self._sorted

    def count_found(self, hashes: np.ndarray) -> int:
        """How many of ``hashes`` (distinct) the index holds."""
        table = self._table()
        if len(table) == 0 or len(hashes) == 0:
            return 0
        where = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
        return int((table[where] == hashes).sum())


class TwinFinder:
    """Which held-out documents have a near twin among the train documents.

    A MinHashLSH over word shingles, built by :func:`pipeline.data.cleaning.lsh_index` with
    the contamination section's threshold and permutations, and used as the clean filter
    uses it (a candidate of the banding counts as a twin; the banding is tuned so that
    pairs below the threshold rarely collide). The held-out documents go into the index
    and the train documents query it: sharing a band is symmetric, so the verdicts are the
    same as the other way round, and the memory (about 3 KB per indexed document, see
    :class:`pipeline.data.cleaning.Filters`) is that of val and test, a fifth of the corpus.
    """

    def __init__(self, params: ContaminationParams) -> None:
        from datasketch import MinHash  # imported here: datasketch loads scipy (~0.3 s)

        self.ngram = params.near_dup_ngram
        self.lsh = lsh_index(params)  # the same fields and error as clean's
        self._template = MinHash(num_perm=params.near_dup_num_perm, seed=MINHASH_SEED)
        self.twinned: set[Hashable] = set()

    def minhash(self, text: str) -> MinHash | None:
        """The text's MinHash, or None for a text without a word."""
        shingles = word_shingles(text, self.ngram)
        if not shingles:
            return None
        # Copying one MinHash reuses its permutations instead of redrawing them per text.
        minhash = self._template.copy()
        minhash.update_batch(shingles)
        return minhash

    def add_held_out(self, key: Hashable, text: str) -> None:
        """Index a held-out document under ``key``."""
        minhash = self.minhash(text)
        if minhash is not None:
            self.lsh.insert(key, minhash, check_duplication=False)

    def add_train(self, text: str) -> None:
        """Mark the held-out documents this train document is a near twin of."""
        minhash = self.minhash(text)
        if minhash is not None:
            self.twinned.update(self.lsh.query(minhash))


def ratio_standard_error(found: np.ndarray, total: np.ndarray) -> tuple[float, float]:
    """The pooled share sum(found) / sum(total) over documents and its standard error.

    The documents are the sampled units and their n-grams are not independent, so the
    error is the ratio estimator's (the delta method over documents):
    se = sqrt(n / (n - 1) * sum((found_i - share * total_i)**2)) / sum(total_i).
    Fewer than two documents say nothing about the spread: se is then 0.5, the largest
    a share can have.
    """
    found = np.asarray(found, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    pooled = float(total.sum())
    share = float(found.sum()) / pooled if pooled else 0.0
    if len(total) < 2 or not pooled:
        return share, 0.5
    residuals = found - share * total
    n = len(total)
    return share, math.sqrt(n / (n - 1) * float((residuals ** 2).sum())) / pooled


def normal_interval(share: float, se: float) -> tuple[float, float]:
    """share -/+ 1.96 se, clipped to [0, 1]."""
    return max(0.0, share - Z95 * se), min(1.0, share + Z95 * se)


def wilson_interval(hits: int, trials: int) -> tuple[float, float]:
    """The 95% Wilson score interval of the share ``hits / trials`` (0 to 1 with no
    trials). Unlike share -/+ 1.96 se it stays meaningful at 0 or all found: 0 of 100
    gives (0, 0.037)."""
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # At 0 (or all) found the bound is 0 (or 1) exactly; centre - half leaves a rounding crumb.
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == trials else min(1.0, centre + half)
    return low, high


def share_metrics(prefix: str, hits: int, trials: int) -> dict[str, float | int]:
    """``prefix`` (the count), ``prefix_share`` and its Wilson ``_low`` and ``_high``."""
    low, high = wilson_interval(hits, trials)
    share = hits / trials if trials else 0.0
    return {prefix: hits, f"{prefix}_share": _round(share), f"{prefix}_share_low": _round(low),
            f"{prefix}_share_high": _round(high)}


def _round(value: float) -> float:
    # Six digits: finer than any share or error of a few thousand documents means.
    return round(value, 6)


class TrainText:
    """What a held-out text is checked against: the train split's word keys and n-grams,
    and which held-out documents (keyed ``(split name, position)``) have a near twin in it.
    Give the held-out texts first, then stream train through :meth:`add_all`."""

    def __init__(self, params: ContaminationParams,
                 held_out: dict[str, Iterable[str]]) -> None:
        self.keys: set[bytes] = set()
        self.ngrams = NgramIndex(params.ngram, params.ngram_sample)
        self.twins = TwinFinder(params)
        for name, texts in held_out.items():
            for position, text in enumerate(texts):
                self.twins.add_held_out((name, position), text)

    def add_all(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.keys.add(word_key(text))
            self.ngrams.add(text)
            self.twins.add_train(text)


def split_overlap(train: TrainText, name: str, texts: Iterable[str]) -> dict[str, float | int]:
    """The flat metrics of the held-out split ``name`` (the same texts, in the same order,
    as ``train`` was given) against ``train``: documents, exact and
    near duplicates (counts), documents too short for an n-gram, n-grams and those in
    train (counts) with their pooled share, its standard error and 95% interval, and the
    documents with at least one n-gram in train (count, share, Wilson interval)."""
    exact = near = 0
    found, total = [], []
    too_short = 0
    for position, text in enumerate(texts):
        exact += word_key(text) in train.keys
        near += (name, position) in train.twins.twinned
        hashes = ngram_hashes(text, train.ngrams.n)
        too_short += len(hashes) == 0
        hashes = sampled(hashes, train.ngrams.sample)
        found.append(train.ngrams.count_found(hashes))
        total.append(len(hashes))
    documents = len(total)
    checked = [i for i, t in enumerate(total) if t > 0]
    share, se = ratio_standard_error(np.array(found)[checked], np.array(total)[checked])
    low, high = normal_interval(share, se)
    return {
        f"{name}_documents": documents,
        f"{name}_exact_duplicates": exact,
        f"{name}_near_duplicates": near,
        f"{name}_documents_too_short": too_short,
        f"{name}_ngrams": int(sum(total)),
        f"{name}_ngrams_in_train": int(sum(found)),
        f"{name}_ngram_share": _round(share),
        f"{name}_ngram_share_se": _round(se),
        f"{name}_ngram_share_low": _round(low),
        f"{name}_ngram_share_high": _round(high),
        **share_metrics(f"{name}_documents_with_train_ngram",
                        sum(1 for f in found if f > 0), documents - too_short),
    }


def items_overlap(train: TrainText, name: str, texts: Iterable[str]) -> dict[str, float | int]:
    """The flat metrics of task items (each given as its context and right answer, joined
    as the model reads them) against ``train``: items, items too short for an n-gram, and
    items with at least one n-gram in train (GPT-3's "dirty" items: count, share, Wilson
    interval)."""
    items = too_short = dirty = 0
    for text in texts:
        items += 1
        hashes = ngram_hashes(text, train.ngrams.n)
        if len(hashes) == 0:
            too_short += 1
        elif train.ngrams.count_found(sampled(hashes, train.ngrams.sample)) > 0:
            dirty += 1
    return {
        f"{name}_items": items,
        f"{name}_items_too_short": too_short,
        **share_metrics(f"{name}_items_in_train", dirty, items - too_short),
    }
