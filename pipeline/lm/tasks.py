"""Downstream multiple-choice tasks, scored by the model's log-likelihood of each choice.

An item is a context, two or more choices and the index of the right one. The model reads
``<bos> context`` and each choice after it, and answers three ways:

- ``acc``: the choice with the highest total log-likelihood;
- ``acc_norm``: the highest log-likelihood per UTF-8 byte of the choice, so that a long
  choice is not penalized for its length (lm-eval's, nanochat's and OLMo's normalized
  accuracy; bytes, as bits per byte, so that two tokenizers compare);
- ``acc_pmi``: the highest log-likelihood given the context minus that of the choice
  alone after ``<bos>``: how much the context raised it (OLMo's ``pmi_dc``, from Holtzman
  et al. 2021, "Surface Form Competition"). A small model's raw log-likelihood is mostly
  how common a choice's words are, which the context hardly moves; this cancels it.

The Witten-Bell bigram of :mod:`pipeline.lm.evaluation`, fitted on the train split,
answers the same items the same three ways (its only context is the context's last
token), and ``chance`` is the mean of 1 / choices: a model has learned something only
where it beats both.

Two sources of items:

- :func:`next_sentence_items`, built from the test split's own text, deterministically,
  in any script: a document's first two successive sentences of 2 to 48 words each
  whose second is no earlier item's answer (usually its first two) give the context and
  the true choice; the second sentences of
  ``choices - 1`` other documents' pairs (drawn with a generator seeded by the task seed
  and the item's index) are the other choices, in a seeded order (the right one is
  equally likely in every place, so a model that learned nothing, ties included, scores
  chance). Every choice follows the context with the document's own separator (a space,
  a newline, nothing in Chinese). Sentences are :func:`pipeline.data.units.sentence_spans`
  (lines, in code). Items depend on the text alone, never on the tokenizer, so models
  with different vocabularies answer the very same items.
- :func:`read_task_file`, a user's JSONL file: ``{"context": ..., "choices": [...],
  "label": i}`` per line, each choice appended to the context as written (so
  ``" Paris"`` carries its space), every line checked with a one-line error.

Scoring is batched: every (item, choice) sequence is one row, and every distinct choice
alone one more; rows are sorted by length and run ``batch_size`` at a time, and only the
choice positions go through the output matrix. A sequence longer than the model's
context loses tokens from its left (the context's start, then ``<bos>``), as lm-eval
truncates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import GptpipeError
from pipeline.core.io import json_line, numbered_lines
from pipeline.data.doctable import iter_texts
from pipeline.data.tokenizer import BOS_ID, PAD_ID, TextTokenizer
from pipeline.data.units import sentence_spans, words
from pipeline.lm.evaluation import BigramModel
from pipeline.lm.model import GPT

# A sentence of the next-sentence task has this many words (a Chinese character is one):
# fewer is a fragment (an abbreviation taken for an end), more rarely fits beside the
# context in a small model's window.
MIN_WORDS, MAX_WORDS = 2, 48


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: ``choices[label]`` is the right continuation."""

    context: str
    choices: tuple[str, ...]
    label: int


# ------------------------------------------------------------------------ the builtin task


def _sentence_pairs(text: str) -> Iterator[tuple[str, str, str]]:
    """(sentence, separator, next sentence) for every two successive sentences of a
    document with MIN_WORDS to MAX_WORDS words each, in document order."""
    # Lazy: the caller usually takes the first pair, so later sentences are never counted.
    previous: tuple[int, int] | None = None  # the sentence before, when it has the length
    for start, end in sentence_spans(text):
        if not MIN_WORDS <= len(words(text[start:end])) <= MAX_WORDS:
            previous = None
            continue
        if previous is not None:
            yield text[previous[0]:previous[1]], text[previous[1]:start], text[start:end]
        previous = (start, end)


def next_sentence_items(table_dir: Path, count: int, choices: int, seed: int) -> list[Item]:
    """The next-sentence task from the first ``count`` documents of ``table_dir`` (the test
    split, in stored order) that have two successive sentences of the right length (module
    docstring); the same items for the same split and seed. Distractors are other items'
    second sentences."""
    found: list[tuple[str, str, str]] = []
    seconds: set[str] = set()
    for batch in iter_texts(table_dir):
        for text in batch:
            # The document's first pair whose answer no earlier item has: usually its first
            # two sentences; past a title, a fragment, a docstring's quotes or a licence
            # header that many files share (an item every file answers alike tests nothing).
            pair = next((p for p in _sentence_pairs(text) if p[2] not in seconds), None)
            if pair is not None:
                found.append(pair)
                seconds.add(pair[2])
        if len(found) >= count:
            break
    found = found[:count]
    distinct = len({second for _, _, second in found})
    if distinct < choices:
        raise GptpipeError(
            f"{table_dir}: {len(found)} documents with two successive sentences of {MIN_WORDS} to "
            f"{MAX_WORDS} words ({distinct} distinct second sentences); the next-sentence "
            f"task needs evaluate.task_choices = {choices} of them; allowed: a larger test "
            "split, fewer evaluate.task_choices, or evaluate.task: file or none"
        )
    items = []
    for index, (first, separator, second) in enumerate(found):
        # Seeded by (seed, index): an item's draws are its own, whatever the others drew.
        rng = np.random.default_rng([seed, index])
        others: list[str] = []
        for other in rng.permutation(len(found)):
            candidate = found[other][2]
            if candidate != second and candidate not in others:
                others.append(candidate)
                if len(others) == choices - 1:
                    break
        label = int(rng.integers(choices))
        options = [*others[:label], second, *others[label:]]
        items.append(Item(first, tuple(separator + o for o in options), label))
    return items


# ---------------------------------------------------------------------------- task files


def read_task_file(path: Path) -> list[Item]:
    """Every item of a JSONL task file, in file order; a one-line error names the line and
    what is wrong (invalid JSON, an empty context, fewer than two choices, an empty choice,
    a label out of range), and a file without items is refused."""
    items = [item for number, line in numbered_lines(path, "task file")
             if (item := _parse_item(f"{path}: line {number}", line)) is not None]
    if not items:
        raise GptpipeError(f"{path}: no items; allowed: JSONL lines with context, choices "
                           "and label")
    return items


def _parse_item(where: str, line: bytes) -> Item | None:
    record = json_line(where, line)
    if record is None:
        return None
    shape = "an object with context (text), choices (a list of texts) and label (an index)"
    if not isinstance(record, dict):
        raise GptpipeError(f"{where}: a JSON {type(record).__name__}; allowed: {shape}")
    for name in ("context", "choices", "label"):
        if name not in record:
            raise GptpipeError(f"{where}: field '{name}' missing; allowed: {shape}")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str) or not context.strip():
        raise GptpipeError(f"{where}: context = {context!r}; allowed: a non-empty text")
    if not isinstance(choices, list) or len(choices) < 2:
        raise GptpipeError(f"{where}: choices = {choices!r}; allowed: a list of 2 or more "
                           "texts")
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise GptpipeError(f"{where}: choices[{index}] = {choice!r}; allowed: a "
                               "non-empty text")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise GptpipeError(f"{where}: label = {label!r}; allowed: an integer in 0 .. "
                           f"{len(choices) - 1} (the index of the right choice)")
    for name, text in (("context", context), *((f"choices[{i}]", c)
                                               for i, c in enumerate(choices))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise GptpipeError(f"{where}: {name} holds a lone surrogate escape (\\ud800-"
                               "\\udfff); allowed: text that is valid Unicode") from None
    return Item(context, tuple(choices), label)


# ------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Row:
    """One sequence to score: what the model reads and how many of its last targets are
    the choice's tokens."""

    ids: list[int]  # at most context + 1 tokens: inputs ids[:-1], targets ids[1:]
    scored: int


def _row(prefix: list[int], choice: list[int], context: int) -> _Row:
    """``prefix + choice`` cut from the left to fit the model's window."""
    ids = (prefix + choice)[-(context + 1):]
    return _Row(ids, min(len(choice), len(ids) - 1))


@torch.no_grad()
def choice_loglikelihoods(model: GPT, rows: Sequence[_Row], batch_size: int,
                          device: torch.device | str,
                          autocast: Callable[[], AbstractContextManager] = nullcontext
                          ) -> np.ndarray:
    """Summed log-probabilities (float64, one per row) of each row's scored targets, in
    batches of rows of similar length (little padding)."""
    totals = np.zeros(len(rows), np.float64)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].ids), reverse=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            totals[chunk] = _score_batch(model, [rows[r] for r in chunk], device, autocast)
    finally:
        model.train(was_training)
    return totals


def _score_batch(model: GPT, rows: Sequence[_Row], device, autocast) -> np.ndarray:
    width = max(len(row.ids) for row in rows)
    batch = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for b, row in enumerate(rows):  # right-padded: a causal model never sees the padding
        batch[b, : len(row.ids)] = torch.tensor(row.ids)
    # Row b's scored targets are its last `scored`; the inputs that predict them sit one
    # position earlier. N = the scored targets of every row.
    which = torch.cat([torch.full((row.scored,), b) for b, row in enumerate(rows)])  # (N,)
    where = torch.cat([torch.arange(len(row.ids) - 1 - row.scored, len(row.ids) - 1)
                       for row in rows])  # (N,)
    batch, rows_at, inputs_at = batch.to(device), which.to(device), where.to(device)
    with autocast():
        hidden = model.hidden_states(batch[:, :-1])  # (B, T, C)
        # Only the scored positions go through the output matrix: (N, C) -> (N, V).
        logits = model.lm_head(hidden[rows_at, inputs_at])
    targets = batch[rows_at, inputs_at + 1]  # (N,)
    picked = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]  # (N,)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    return sums.index_add_(0, which, picked.cpu().double()).numpy()


def _bigram_loglikelihood(bigram: BigramModel, previous: int, choice: list[int]) -> float:
    """log P(choice | previous token) under the bigram: its only context is one token."""
    return float(np.log(bigram.token_probabilities(np.array([previous, *choice]))).sum())


def _answers(items: Sequence[Item], given: np.ndarray, alone: np.ndarray
             ) -> dict[str, np.ndarray]:
    """Per item, whether each rule picks the right choice ((N,) bool each): acc (the
    highest log-likelihood given the context wins), acc_norm (per UTF-8 byte of the
    choice) and acc_pmi (given minus alone: how much the context raised it); the first
    of equal scores wins."""
    right = {"acc": [], "acc_norm": [], "acc_pmi": []}
    at = 0
    for item in items:
        n = len(item.choices)
        sizes = np.array([len(c.encode("utf-8")) for c in item.choices])
        scores = {"acc": given[at : at + n], "acc_norm": given[at : at + n] / sizes,
                  "acc_pmi": given[at : at + n] - alone[at : at + n]}
        at += n
        for key, values in scores.items():
            right[key].append(bool(np.argmax(values) == item.label))
    return {key: np.array(flags, dtype=bool) for key, flags in right.items()}


@dataclass(frozen=True)
class TaskScores:
    """A task's figures (:func:`score_task`) and, per item, which rules answered right:
    ``answers[rule]`` is (N,) bool for acc, acc_norm, acc_pmi and their bigram_*."""

    metrics: dict[str, float]
    answers: dict[str, np.ndarray]


def score_task(model: GPT, tokenizer: TextTokenizer, items: Sequence[Item],
               bigram: BigramModel, batch_size: int, device: torch.device | str,
               autocast: Callable[[], AbstractContextManager] = nullcontext
               ) -> dict[str, float]:
    """The model's and the bigram's accuracies on ``items``, with chance beside them:
    ``items``, ``acc``, ``acc_norm``, ``acc_pmi``, ``bigram_acc``, ``bigram_acc_norm``,
    ``bigram_acc_pmi``, ``chance`` (the module docstring says what each means)."""
    return score_task_items(model, tokenizer, items, bigram, batch_size, device,
                            autocast).metrics


def score_task_items(model: GPT, tokenizer: TextTokenizer, items: Sequence[Item],
                     bigram: BigramModel, batch_size: int, device: torch.device | str,
                     autocast: Callable[[], AbstractContextManager] = nullcontext
                     ) -> TaskScores:
    """:func:`score_task`, keeping each item's answers (for intervals and paired
    comparisons)."""
    context = model.config.context
    contexts = [[BOS_ID, *ids] for ids in tokenizer.encode_batch([i.context for i in items])]
    choices = tokenizer.encode_batch([c for item in items for c in item.choices])
    owner = [index for index, item in enumerate(items) for _ in item.choices]
    given_rows = [_row(contexts[i], ids, context) for i, ids in zip(owner, choices, strict=True)]
    # A choice alone, after <bos>, depends on its tokens only: each distinct one once (the
    # builtin task's distractors are other items' answers, so this is a quarter of them).
    distinct = list(dict.fromkeys(tuple(ids) for ids in choices))
    alone_rows = [_row([BOS_ID], list(ids), context) for ids in distinct]
    scores = choice_loglikelihoods(model, given_rows + alone_rows, batch_size, device,
                                   autocast)
    alone_of = dict(zip(distinct, scores[len(given_rows):], strict=True))
    model_given = scores[: len(given_rows)]
    model_alone = np.array([alone_of[tuple(ids)] for ids in choices])
    bigram_given = np.array([_bigram_loglikelihood(bigram, contexts[i][-1], ids)
                             for i, ids in zip(owner, choices, strict=True)])
    bigram_alone = np.array([_bigram_loglikelihood(bigram, BOS_ID, ids) for ids in choices])
    answers = {**_answers(items, model_given, model_alone),
               **{f"bigram_{k}": v for k, v in
                  _answers(items, bigram_given, bigram_alone).items()}}
    accuracies = {rule: int(right.sum()) / len(items) for rule, right in answers.items()}
    metrics = {"items": len(items), **accuracies,
               "chance": float(np.mean([1 / len(item.choices) for item in items]))}
    return TaskScores(metrics, answers)
