"""Per-document sums of a scored split, and the standard errors they give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.stats import MIN_UNITS
from pipeline.data.shards import ShardWriter, read_tokens
from pipeline.data.tokenizer import BOS_ID, EOS_ID
from pipeline.lm.evaluation import evaluate_split, score_split, score_tokens, scoring_plan
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.unit_scores import (
    ScoreLedger,
    UnitSums,
    document_starts,
    resampling_units,
    split_errors,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB, CONTEXT = 30, 4


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, n_layer=1, n_head=2, n_embd=16))


def stream_of(lengths: list[int], seed: int = 0) -> np.ndarray:
    """Documents of the given lengths, each ``<bos> ids <eos>`` as tokenize writes them."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate(([BOS_ID], rng.integers(4, VOCAB, n), [EOS_ID])) for n in lengths]
    return np.concatenate(parts).astype(np.uint16)


def test_document_starts_in_memory_and_on_disk(tmp_path):
    stream = stream_of([3, 1, 5])  # bos at 0, 5, 8
    assert document_starts(stream).tolist() == [0, 5, 8]
    with ShardWriter(tmp_path, stream.dtype, 4) as writer:
        writer.append(stream)
    assert document_starts(read_tokens(tmp_path)).tolist() == [0, 5, 8]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_every_target_is_counted_once_in_its_own_document(batch_size):
    # Documents of 3, 1 and 5 ids hold 5, 3 and 7 tokens; every one is a target but the
    # stream's first <bos>: 4, 3 and 7 targets.
    stream = stream_of([3, 1, 5])
    byte_lengths = np.arange(VOCAB, dtype=np.int64) % 3  # any bytes per id
    ledger = ScoreLedger(document_starts(stream), byte_lengths)
    plan = scoring_plan(len(stream), CONTEXT)
    scores = score_tokens(tiny_gpt(), stream, CONTEXT, batch_size, "cpu", plan=plan,
                          ledger=ledger)
    documents = ledger.documents()
    assert documents.index.tolist() == [0, 1, 2]
    assert documents.tokens.tolist() == [4, 3, 7]
    assert documents.nats.sum() == pytest.approx(scores.loss * scores.tokens, rel=1e-12)
    assert documents.correct.sum() == scores.correct
    targets = stream[1:].astype(np.int64)
    bounds = [(0, 4), (4, 7), (7, 14)]
    assert documents.weight.tolist() == [float(byte_lengths[targets[a:b]].sum())
                                         for a, b in bounds]
    windows = ledger.windows()  # 15 tokens: windows of 4 targets at 0, 4, 8, a tail of 2
    assert windows.tokens.tolist() == [4, 4, 4, 2]
    assert windows.nats.sum() == pytest.approx(documents.nats.sum(), rel=1e-12)


def test_per_document_nats_are_each_documents_own():
    # Scored alone in one window, a document's nats are its targets' cross-entropy.
    stream = stream_of([1, 1])  # [bos a eos bos b eos]: 5 targets
    model = tiny_gpt()
    ledger = ScoreLedger(document_starts(stream), None)
    score_tokens(model, stream, CONTEXT, 8, "cpu", ledger=ledger)
    with torch.no_grad():
        ids = torch.tensor(stream.astype(np.int64))
        first, _ = model(ids[None, :4])  # targets 1..4
        tail, _ = model(ids[None, 4:5])  # target 5 (the tail window)
    nats = torch.cat([torch.nn.functional.cross_entropy(first[0], ids[1:5], reduction="none"),
                      torch.nn.functional.cross_entropy(tail[0], ids[5:6], reduction="none")])
    documents = ledger.documents()
    assert documents.nats.tolist() == pytest.approx(
        [float(nats[:2].sum()), float(nats[2:].sum())], rel=1e-6)
    assert documents.weight.tolist() == [2.0, 3.0]  # no byte lengths: one per target


def test_a_budget_keeps_only_the_documents_it_scores():
    stream = stream_of([30] * 10)  # 320 tokens
    scored = score_split(tiny_gpt(), stream, 1000, CONTEXT, 16, "cpu", max_tokens=20)
    documents = scored.documents
    assert documents.tokens.sum() == scored.metrics["tokens"] == 20
    assert 0 < len(documents) < 10 and scored.documents_in_stream == 10
    assert evaluate_split(tiny_gpt(), stream, 1000, CONTEXT, 16, "cpu",
                          max_tokens=20) == scored.metrics


def test_split_errors_are_zero_for_identical_documents_and_seeded():
    same = UnitSums(np.arange(40), np.full(40, 10), np.full(40, 23.0), np.full(40, 4),
                    np.full(40, 40.0))
    errors = split_errors(same, 1600.0, 500, 0)
    assert errors == pytest.approx({"loss_se": 0.0, "ppl_se": 0.0, "bpb_se": 0.0,
                                    "acc_se": 0.0}, abs=1e-12)
    rng = np.random.default_rng(1)
    mixed = UnitSums(np.arange(40), rng.integers(5, 15, 40), rng.uniform(10, 40, 40),
                     rng.integers(0, 5, 40), rng.uniform(20, 60, 40))
    first = split_errors(mixed, float(mixed.weight.sum()), 500, 0)
    assert first == split_errors(mixed, float(mixed.weight.sum()), 500, 0)
    assert all(value > 0 for value in first.values())
    # ppl = exp(loss): its error is ppl times the loss's, to first order.
    loss = mixed.nats.sum() / mixed.tokens.sum()
    assert first["ppl_se"] == pytest.approx(math.exp(loss) * first["loss_se"], rel=0.05)
    # Bytes scaled by c change bits per byte by 1/c, and its error alike.
    halved = split_errors(mixed, 2 * float(mixed.weight.sum()), 500, 0)
    assert halved["bpb_se"] == pytest.approx(first["bpb_se"] / 2, rel=1e-12)


def test_few_documents_are_resampled_by_windows():
    def units(count: int) -> UnitSums:
        return UnitSums(np.arange(count), np.ones(count, np.int64), np.ones(count),
                        np.ones(count, np.int64), np.ones(count))

    name, _ = resampling_units(units(MIN_UNITS), units(500))
    assert name == "documents"
    name, chosen = resampling_units(units(MIN_UNITS - 1), units(500))
    assert name == "windows" and len(chosen) == 500
    scored = score_split(tiny_gpt(), stream_of([40, 40]), 400, CONTEXT, 16, "cpu")
    errors = scored.errors(200, 0)
    assert errors["documents"] == 2 and errors["windows"] == len(scored.windows) > 2
