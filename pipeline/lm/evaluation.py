"""Scoring a language model on a held-out split, and the baselines it must beat.

Every number here is over the same quantity: the negative log-likelihood, in nats, of
each token of a split's stream given the tokens before it, with the first token of the
stream the only one not predicted (it has no history). The GPT, the unigram and the
bigram baselines all follow that convention, so their bits per byte compare directly.

- ``score_tokens`` predicts every token exactly once (not a sample of windows), so the
  number is the same every time it is measured and covers the whole split.
- ``UnigramModel`` and ``BigramModel`` are fitted on the train split's ids of the same
  tokenizer. A GPT that does not beat the bigram has learned no more than which token
  tends to follow which; one that does not beat the unigram has learned nothing at all.
- ``corpus_fingerprint`` names the exact data a metric was measured on.

Bits per byte vs perplexity: perplexity is exp(nats per token), and what a token is
depends on the tokenizer: a character-level model predicts many easy tokens, a BPE model
few hard ones, so their per-token losses (and perplexities) differ even for the same
knowledge of the text. Bits per byte divides the total information, in bits, by the
UTF-8 byte count of the split's text, which no tokenizer changes: so it compares models
with different vocabularies on the same text. Two caveats: ``<bos>``/``<eos>`` tokens
cost nats but have no bytes (a small per-document cost, the price of knowing where a
document ends), and a tokenizer that maps text to ``<unk>`` discards information it then
gets to predict cheaply, so its bits per byte looks better than it deserves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file
from pipeline.data.doctable import iter_texts
from pipeline.data.shards import TokenFile, TokenStream, windows
from pipeline.data.units import opening
from pipeline.lm.unit_scores import (
    ScoreLedger,
    UnitSums,
    document_starts,
    resampling_units,
    split_errors,
)


def bits_per_byte(loss_nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Total information of ``tokens`` predicted tokens in bits, per byte of their text.

    Tokenizer-independent (see the module docstring), so models with different
    vocabularies are compared by this number.
    """
    if text_bytes <= 0:
        raise ValueError(f"text_bytes must be > 0, got {text_bytes}")
    return loss_nats_per_token * tokens / text_bytes / math.log(2)


def perplexity(loss_nats_per_token: float) -> float:
    """exp(mean nats per token): the effective number of equally likely next tokens.

    Per token, so it only compares models that share a tokenizer.
    """
    return math.exp(loss_nats_per_token)


@dataclass(frozen=True)
class TokenScores:
    """How well a model predicted every token of a stream but the first."""

    tokens: int  # predicted tokens: len(stream) - 1
    loss: float  # mean negative log-likelihood, nats per token
    correct: int  # tokens that were the model's top-1 prediction

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else 0.0

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


@dataclass(frozen=True)
class ScoringPlan:
    """Which windows of a stream are scored: ``starts`` of full (context + 1)-token
    windows and the start of a shorter ``tail`` window (None: no tail), and how many
    tokens that predicts. The GPT and the baselines score the same plan."""

    starts: np.ndarray  # (N,) int64
    tail: int | None
    context: int
    length: int
    whole: bool  # every token but the first is predicted

    @property
    def predicted(self) -> int:
        tail = self.length - 1 - self.tail if self.tail is not None else 0
        return len(self.starts) * self.context + tail


def scoring_plan(length: int, context: int, max_tokens: int | None = None) -> ScoringPlan:
    """Windows of stride ``context`` (consecutive windows share one token, so each token
    after the first is a target exactly once) and a shorter last window for the tail.

    With ``max_tokens`` and a stream that predicts more, an evenly spread subset of the
    full windows predicting at most ``max_tokens`` tokens (at least one window): the same
    windows every time for the same stream, so evaluation's cost stops growing with the
    corpus while every part of the split is sampled.
    """
    if length < 2:
        raise GptpipeError(
            f"the evaluated split has {length} token(s); at least 2 are needed to "
            "predict one; use a larger corpus or larger split.val / split.test fractions"
        )
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    full = (length - 1) // context
    starts = np.arange(full, dtype=np.int64) * context
    tail = full * context
    plan = ScoringPlan(starts, tail if tail < length - 1 else None, context, length, True)
    if max_tokens is None or plan.predicted <= max_tokens or full == 0:
        return plan
    count = max(1, min(full, max_tokens // context))
    chosen = np.unique(np.linspace(0, full - 1, count).round().astype(np.int64))
    return ScoringPlan(starts[chosen], None, context, length, False)


def iter_windows(tokens: TokenStream, plan: ScoringPlan, batch_size: int
                 ) -> Iterator[np.ndarray]:
    """The plan's windows, (B, T + 1) arrays of at most ``batch_size`` rows, then the
    tail as a (1, L) array."""
    for _, batch in iter_placed_windows(tokens, plan, batch_size):
        yield batch


def iter_placed_windows(tokens: TokenStream, plan: ScoringPlan, batch_size: int
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`iter_windows`' batches with the (B,) stream positions they start at."""
    for first in range(0, len(plan.starts), batch_size):
        starts = plan.starts[first : first + batch_size]
        yield starts, windows(tokens, starts, plan.context + 1)
    if plan.tail is not None:
        yield np.array([plan.tail], np.int64), np.asarray(tokens[plan.tail :])[None, :]


def score_tokens(
    model: nn.Module,
    tokens: TokenStream,
    context: int,
    batch_size: int,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    plan: ScoringPlan | None = None,
    ledger: ScoreLedger | None = None,
) -> TokenScores:
    """Mean cross-entropy and top-1 accuracy of ``model`` on the windows of ``plan``
    (default: every token of ``tokens`` but the first, :func:`scoring_plan`).

    A token early in its window sees less history than one late in it, as in
    ``training.mean_loss``. The sum is accumulated in float64: millions of float32
    additions would drift. ``autocast`` is a callable returning a context manager
    (``runtime.autocast``). The model's train/eval mode is restored afterwards.
    ``ledger``, when given, also receives every target's nats and hit (per-document
    sums, :mod:`pipeline.lm.unit_scores`).
    """
    plan = plan or scoring_plan(len(tokens), context)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total_nats, correct = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for starts, batch in iter_placed_windows(tokens, plan, batch_size):
                per_target, per_hit = _score_windows(model, batch, device, autocast)
                total_nats += per_target.sum().item()
                correct += int(per_hit.sum().item())
                if ledger is not None:
                    shape = (batch.shape[0], batch.shape[1] - 1)
                    ledger.add(starts, batch, per_target.numpy().reshape(shape),
                               per_hit.numpy().reshape(shape))
    finally:
        model.train(was_training)
    predicted = plan.predicted
    return TokenScores(tokens=predicted, loss=total_nats / predicted, correct=correct)


def _score_windows(model, batch: np.ndarray, device, autocast
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B*T,) nats (float64, on the CPU) and top-1 hits of the targets of (B, T + 1)
    windows."""
    ids = torch.from_numpy(batch.astype(np.int64)).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each
    with autocast():
        logits, _ = model(inputs)  # (B, T, V)
    logits = logits.float()
    nats = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="none")  # (B*T,)
    hits = (logits.argmax(dim=-1) == targets).reshape(-1)  # (B*T,)
    # float64 on the CPU: MPS has no float64, and B*T floats are a small copy.
    return nats.cpu().double(), hits.cpu()


def scored_bytes(tokens: TokenStream, plan: ScoringPlan, split_bytes: int,
                 byte_lengths: np.ndarray | None, split_token_bytes: int | None) -> float:
    """The UTF-8 bytes of the text that the plan's predicted tokens stand for.

    The whole split: ``split_bytes`` exactly. A subset: ``split_bytes`` times the share
    of the split's token bytes (``byte_lengths``, the bytes each id stands for; their sum
    over the split is ``split_token_bytes``) that the predicted tokens hold. For
    byte-level BPE every byte of the text is in exactly one token, so this is exact;
    for word and char vocabularies (separators and <unk> stand for bytes no single token
    holds) it assumes the subset has the split's share of them. Without byte lengths
    (token folders written before they were counted) the share is the tokens' own.
    """
    if plan.whole:
        return float(split_bytes)
    if byte_lengths is None or not split_token_bytes:
        predicted = sum(batch[:, 1:].size for batch in iter_windows(tokens, plan, 256))
        return split_bytes * predicted / max(1, len(tokens) - 1)
    held = sum(int(byte_lengths[batch[:, 1:].astype(np.int64)].sum())
               for batch in iter_windows(tokens, plan, 256))
    return split_bytes * held / split_token_bytes


def evaluate_split(
    model: nn.Module,
    tokens: TokenStream,
    split_bytes: int,
    context: int,
    batch_size: int,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    max_tokens: int | None = None,
    byte_lengths: np.ndarray | None = None,
    split_token_bytes: int | None = None,
) -> dict[str, float]:
    """The GPT's metrics on one split: loss (nats/token), ppl, bpb, acc, the number of
    predicted tokens (``tokens``) and the bytes they stand for (``bytes``).
    ``split_bytes`` is meta["splits"][split]["bytes"]; ``max_tokens`` the budget
    (:func:`scoring_plan`), with ``byte_lengths`` and ``split_token_bytes`` to count the
    bytes of a subset (:func:`scored_bytes`)."""
    return score_split(model, tokens, split_bytes, context, batch_size, device, autocast,
                       max_tokens, byte_lengths, split_token_bytes).metrics


@dataclass(frozen=True)
class SplitScores:
    """:func:`evaluate_split`'s metrics with the per-document and per-window sums they
    are ratios of (:mod:`pipeline.lm.unit_scores`)."""

    metrics: dict[str, float]
    documents: UnitSums
    windows: UnitSums
    documents_in_stream: int  # the <bos> tokens of the split, scored or not

    def errors(self, resamples: int, seed: int) -> dict[str, float]:
        """Bootstrap standard errors of loss, ppl, bpb and acc (``loss_se`` ...) over
        the scored documents (``documents``: how many), or over windows (``windows``:
        how many) when the documents are too few to resample."""
        name, units = resampling_units(self.documents, self.windows)
        errors = split_errors(units, float(self.metrics["bytes"]), resamples, seed)
        counts = {"documents": len(self.documents)}
        if name == "windows":
            counts["windows"] = len(units)
        return {**errors, **counts}


def score_split(
    model: nn.Module,
    tokens: TokenStream,
    split_bytes: int,
    context: int,
    batch_size: int,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    max_tokens: int | None = None,
    byte_lengths: np.ndarray | None = None,
    split_token_bytes: int | None = None,
) -> SplitScores:
    """:func:`evaluate_split`, keeping what each document and window contributed."""
    plan = scoring_plan(len(tokens), context, max_tokens)
    starts = document_starts(tokens)
    ledger = ScoreLedger(starts, byte_lengths)
    scores = score_tokens(model, tokens, context, batch_size, device, autocast, plan, ledger)
    size = scored_bytes(tokens, plan, split_bytes, byte_lengths, split_token_bytes)
    metrics = {
        "loss": scores.loss,
        "ppl": scores.perplexity,
        "bpb": bits_per_byte(scores.loss, scores.tokens, size),
        "acc": scores.accuracy,
        "tokens": scores.tokens,
        # Exact and whole for a whole split; a subset's share otherwise (unrounded: the
        # baselines divide by the same figure).
        "bytes": int(split_bytes) if plan.whole else size,
    }
    return SplitScores(metrics, ledger.documents(), ledger.windows(), len(starts))


def _check_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64, copy=False)


class TokenBaseline(Protocol):
    def nll(self, ids: np.ndarray) -> tuple[float, int]: ...


def _total_nats(probabilities: np.ndarray) -> tuple[float, int]:
    return float(-np.log(probabilities).sum(dtype=np.float64)), len(probabilities)


@dataclass(frozen=True, eq=False)
class UnigramModel:
    """P(w) = (c(w) + alpha) / (N + alpha * V): token frequencies with add-alpha smoothing,
    so a token never seen in train still gets a nonzero probability."""

    probabilities: np.ndarray  # (V,) float64, sums to 1

    @classmethod
    def fit(cls, train_ids: TokenStream, vocab_size: int, alpha: float = 1.0) -> UnigramModel:
        """Counted chunk by chunk: memory follows the vocabulary, not the stream."""
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (every token needs a probability), got {alpha}")
        counts = np.zeros(vocab_size, np.float64)  # (V,)
        total = 0
        for chunk in _chunks(train_ids):
            ids = _check_ids(chunk, vocab_size)
            counts += np.bincount(ids, minlength=vocab_size)
            total += len(ids)
        return cls((counts + alpha) / (total + alpha * vocab_size))

    @property
    def vocab_size(self) -> int:
        return len(self.probabilities)

    def token_probabilities(self, ids: np.ndarray) -> np.ndarray:
        """P(ids[i]) for i >= 1: (len(ids) - 1,) float64 (the first token is not predicted)."""
        ids = _check_ids(ids, self.vocab_size)
        return self.probabilities[ids[1:]]

    def nll(self, ids: np.ndarray) -> tuple[float, int]:
        """(total nats, predicted tokens) over every token of ``ids`` but the first."""
        return _total_nats(self.token_probabilities(ids))


def _merge_counts(codes: np.ndarray, counts: np.ndarray, new_codes: np.ndarray,
                  new_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted, distinct code arrays and their counts merged into one, in time linear
    in their sizes (no re-sort of what was already counted)."""
    at = np.searchsorted(codes, new_codes)  # (k,) where each new code goes
    known = at < len(codes)
    known[known] = codes[at[known]] == new_codes[known]
    counts = counts.copy()
    counts[at[known]] += new_counts[known]
    fresh = ~known
    return (np.insert(codes, at[fresh], new_codes[fresh]),
            np.insert(counts, at[fresh], new_counts[fresh]))


@dataclass(frozen=True, eq=False)
class BigramModel:
    """P(w | h), the bigram estimate interpolated with the add-alpha unigram, Witten-Bell:

        P(w | h) = lambda(h) * c(h, w) / c(h) + (1 - lambda(h)) * P_uni(w)
        lambda(h) = c(h) / (c(h) + T(h))       T(h) = distinct tokens seen after h

    = (c(h, w) + T(h) * P_uni(w)) / (c(h) + T(h)). Witten-Bell needs no tuning: a context
    followed by many different tokens (large T) trusts its counts less. An unseen context
    (c(h) = 0) falls back to the unigram, and every (h, w) gets a nonzero probability.

    Counts are sparse: only the pairs seen, as sorted codes h * V + w looked up with
    ``np.searchsorted``, so memory grows with the distinct pairs, never with V * V (2.5e9
    cells at V = 50k), and fitting reads the train stream chunk by chunk, merging each
    chunk's counted pairs into the running ones.
    """

    unigram: UnigramModel
    pair_codes: np.ndarray  # (P,) int64, sorted: h * V + w of every pair seen in train
    pair_counts: np.ndarray  # (P,) int64: c(h, w)
    context_counts: np.ndarray  # (V,) int64: c(h), times h is followed by some token
    distinct_followers: np.ndarray  # (V,) int64: T(h)

    @classmethod
    def fit(cls, train_ids: TokenStream, vocab_size: int, alpha: float = 1.0) -> BigramModel:
        pair_codes = np.empty(0, np.int64)
        pair_counts = np.empty(0, np.int64)
        context_counts = np.zeros(vocab_size, np.int64)
        previous = np.empty(0, np.int64)  # the last token of the chunk before
        for chunk in _chunks(train_ids):
            ids = np.concatenate((previous, _check_ids(chunk, vocab_size)))
            codes = ids[:-1] * vocab_size + ids[1:]  # (n - 1,) the pairs ending in this chunk
            found, counts = np.unique(codes, return_counts=True)
            pair_codes, pair_counts = _merge_counts(pair_codes, pair_counts, found,
                                                    counts.astype(np.int64))
            context_counts += np.bincount(ids[:-1], minlength=vocab_size)
            previous = ids[-1:]
        return cls(
            unigram=UnigramModel.fit(train_ids, vocab_size, alpha),
            pair_codes=pair_codes,
            pair_counts=pair_counts,
            context_counts=context_counts,
            distinct_followers=np.bincount(
                pair_codes // vocab_size, minlength=vocab_size
            ).astype(np.int64),
        )

    @property
    def vocab_size(self) -> int:
        return self.unigram.vocab_size

    def pair_count(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """c(h, w) for aligned arrays of h and w (0 for pairs never seen)."""
        codes = previous * self.vocab_size + following
        if not len(self.pair_codes):
            return np.zeros(len(codes), np.int64)
        where = np.searchsorted(self.pair_codes, codes).clip(max=len(self.pair_codes) - 1)
        return np.where(self.pair_codes[where] == codes, self.pair_counts[where], 0)

    def token_probabilities(self, ids: np.ndarray) -> np.ndarray:
        """P(ids[i] | ids[i - 1]) for i >= 1: (len(ids) - 1,) float64."""
        ids = _check_ids(ids, self.vocab_size)
        previous, following = ids[:-1], ids[1:]
        seen = self.context_counts[previous]  # c(h)
        followers = self.distinct_followers[previous]  # T(h)
        backoff = self.unigram.probabilities[following]  # P_uni(w)
        numerator = self.pair_count(previous, following) + followers * backoff
        denominator = seen + followers
        # An unseen context has c(h) = T(h) = 0: the unigram alone.
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), backoff)

    def nll(self, ids: np.ndarray) -> tuple[float, int]:
        """(total nats, predicted tokens) over every token of ``ids`` but the first."""
        return _total_nats(self.token_probabilities(ids))


def baseline_bpb(model_obj: TokenBaseline, tokens: TokenStream, split_bytes: float,
                 plan: ScoringPlan | None = None) -> float:
    """Bits per byte of a baseline on the targets of ``plan`` (default: every token of
    the split but the first), ``split_bytes`` being the bytes those targets stand for."""
    plan = plan or scoring_plan(len(tokens), 4096)  # every target, in long windows
    total, count = 0.0, 0
    for batch in iter_windows(tokens, plan, 256):
        for row in batch:
            nats, predicted = model_obj.nll(row)
            total += nats
            count += predicted
    return bits_per_byte(total / count if count else 0.0, count, split_bytes)


def fit_baselines(
    train_ids: TokenStream, vocab_size: int, alpha: float = 1.0
) -> dict[str, TokenBaseline]:
    """{"unigram": ..., "bigram": ...} fitted once on the train split, to score every split."""
    return {
        "unigram": UnigramModel.fit(train_ids, vocab_size, alpha),
        "bigram": BigramModel.fit(train_ids, vocab_size, alpha),
    }


def baseline_metrics(
    baselines: dict[str, TokenBaseline], tokens: TokenStream, split_bytes: float,
    plan: ScoringPlan | None = None,
) -> dict[str, float]:
    """{"unigram_bpb": ..., "bigram_bpb": ...} on one split's ``plan`` (the windows the
    GPT is scored on), beside evaluate_split's keys."""
    return {f"{name}_bpb": baseline_bpb(m, tokens, split_bytes, plan)
            for name, m in baselines.items()}


def _chunks(tokens: TokenStream) -> Iterator[np.ndarray]:
    """A stream in pieces of bounded size (an array in memory: itself)."""
    if isinstance(tokens, TokenFile):
        yield from tokens.chunks()
    else:
        yield np.asarray(tokens)


def document_openings(table_dir: Path, count: int, words: int) -> list[str]:
    """The openings of the first ``count`` documents (of the document table ``table_dir``)
    longer than ``words`` words, in stored order, for sample prompts: each document up to
    the end of its ``words``-th word, as written.

    Words as :mod:`pipeline.data.units` counts them in any script (a Chinese character
    is a word), so an opening never swallows a whole unspaced paragraph and always
    leaves the model something to continue.
    """
    prompts: list[str] = []
    for batch in iter_texts(table_dir, batch_size=max(count, 1)):
        for text in batch:
            start = opening(text, words)
            if start is not None and start.strip():
                prompts.append(start)
            if len(prompts) == count:
                return prompts
    return prompts


def _fingerprint_entries(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs: a file under its own name, a directory's files as
    ``<dir name>/<relative path>``, so the fingerprint does not depend on where the
    checkout lives."""
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        return [
            ((Path(path.name) / file.relative_to(path)).as_posix(), file)
            for file in path.rglob("*")
            if file.is_file()
        ]
    raise GptpipeError(f"{path}: not found; cannot fingerprint the evaluated data")


def corpus_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over each file's name and sha256, in sorted name order.

    Metrics carry it so two numbers are known to come from the very same data: any changed
    byte, added, removed or renamed file changes it; re-reading or re-listing does not.
    """
    entries = sorted(entry for path in paths for entry in _fingerprint_entries(Path(path)))
    digest = hashlib.sha256()
    for name, file in entries:
        digest.update(f"{name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
