"""Evaluation maths on tiny inputs, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.device import Runtime
from pipeline.core.errors import GptpipeError
from pipeline.lm.batching import eval_windows
from pipeline.lm.evaluation import (
    BigramModel,
    TokenScores,
    UnigramModel,
    baseline_bpb,
    baseline_metrics,
    bits_per_byte,
    corpus_fingerprint,
    document_openings,
    evaluate_split,
    fit_baselines,
    perplexity,
    score_tokens,
    scoring_plan,
)
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.training import mean_loss

CPU = torch.device("cpu")
VOCAB, CONTEXT = 40, 8


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, n_layer=2, n_head=2, n_embd=32))


def random_stream(length: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, length).astype(np.uint16)


# --- bits per byte, perplexity -------------------------------------------------------


def test_bits_per_byte_is_total_bits_over_bytes():
    # ln 2 nats per token = 1 bit per token; 10 tokens over 10 bytes = 1 bit per byte.
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    # 2 nats x 3 tokens = 6 nats = 8.656 bits, over 4 bytes.
    assert bits_per_byte(2.0, 3, 4) == pytest.approx(6 / math.log(2) / 4)
    with pytest.raises(ValueError, match="text_bytes"):
        bits_per_byte(1.0, 3, 0)


def test_perplexity_is_exp_of_nats_per_token():
    assert perplexity(math.log(7)) == pytest.approx(7.0)
    assert perplexity(0.0) == 1.0


def test_token_scores_accuracy_and_perplexity():
    scores = TokenScores(tokens=4, loss=math.log(2), correct=1)
    assert scores.accuracy == 0.25
    assert scores.perplexity == pytest.approx(2.0)


# --- the GPT on every token ------------------------------------------------------------


def brute_force(model: GPT, tokens: np.ndarray, context: int) -> tuple[float, int]:
    """Mean nats and top-1 hits, one forward pass per predicted position.

    Token i (i >= 1) belongs to window (i - 1) // context, which starts at
    ((i - 1) // context) * context: it is predicted from the tokens of its window before it.
    """
    ids = torch.from_numpy(tokens.astype(np.int64))
    nats, hits = [], 0
    model.eval()
    with torch.no_grad():
        for i in range(1, len(ids)):
            start = (i - 1) // context * context
            logits, _ = model(ids[None, start:i])  # (1, i - start, V)
            last = logits[0, -1].double()
            nats.append(-F.log_softmax(last, dim=-1)[ids[i]].item())
            hits += int(last.argmax().item() == ids[i].item())
    return sum(nats) / len(nats), hits


@pytest.mark.parametrize(
    ("length", "batch_size"),
    [
        (22, 1),  # two full windows and a 6-token tail
        (22, 3),
        (17, 2),  # exactly two full windows: no tail
        (5, 4),  # shorter than one window: the tail alone
        (2, 1),  # one predicted token
    ],
)
def test_score_tokens_predicts_every_token_once_as_brute_force(length, batch_size):
    model = tiny_gpt()
    tokens = random_stream(length)
    scores = score_tokens(model, tokens, CONTEXT, batch_size, CPU)
    loss, hits = brute_force(model, tokens, CONTEXT)
    assert scores.tokens == length - 1
    assert scores.loss == pytest.approx(loss, abs=1e-5)
    assert scores.correct == hits


def test_score_tokens_matches_training_mean_loss_when_windows_cover_the_stream():
    model = tiny_gpt()
    tokens = random_stream(3 * CONTEXT + 1)
    expected = mean_loss(model, eval_windows(tokens, CONTEXT), Runtime(CPU, torch.float32), 2)
    assert score_tokens(model, tokens, CONTEXT, 2, CPU).loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_score_tokens_restores_mode_and_builds_no_graph(training):
    model = tiny_gpt()
    model.train(training)
    score_tokens(model, random_stream(20), CONTEXT, 2, CPU)
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())


def test_score_tokens_refuses_a_stream_with_nothing_to_predict():
    with pytest.raises(GptpipeError, match="at least 2"):
        score_tokens(tiny_gpt(), np.array([2], np.uint16), CONTEXT, 1, CPU)


def test_a_model_that_knows_the_stream_is_scored_near_zero_loss():
    # A bigram-perfect model: logits put all mass on (previous + 1) % V.
    class NextId(torch.nn.Module):
        def forward(self, idx, targets=None):
            return F.one_hot((idx + 1) % VOCAB, VOCAB).float() * 50.0, None

    tokens = (np.arange(30) % VOCAB).astype(np.uint16)
    scores = score_tokens(NextId(), tokens, CONTEXT, 2, CPU)
    assert scores.tokens == 29 and scores.correct == 29
    assert scores.loss < 1e-12 + 40 * math.exp(-50)


def test_evaluate_split_reports_flat_consistent_metrics():
    model = tiny_gpt()
    tokens = random_stream(30)
    metrics = evaluate_split(model, tokens, 100, CONTEXT, 4, CPU)
    assert set(metrics) == {"loss", "ppl", "bpb", "acc", "tokens", "bytes"}
    assert metrics["tokens"] == 29 and metrics["bytes"] == 100
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["bpb"] == pytest.approx(metrics["loss"] * 29 / 100 / math.log(2))
    assert 0.0 <= metrics["acc"] <= 1.0


# --- a budget of tokens --------------------------------------------------------------


def test_a_budget_scores_evenly_spread_windows_the_same_every_time():
    whole = scoring_plan(1001, 10)
    assert whole.whole and whole.predicted == 1000 and whole.tail is None
    plan = scoring_plan(1001, 10, max_tokens=300)
    assert not plan.whole and plan.predicted == 300 and plan.tail is None
    # 30 of the 100 windows, first and last among them, spread evenly.
    assert plan.starts[0] == 0 and plan.starts[-1] == 990 and len(plan.starts) == 30
    assert np.array_equal(plan.starts, scoring_plan(1001, 10, max_tokens=300).starts)
    assert len(set(np.diff(plan.starts)) - {30, 40}) == 0
    # A split within the budget is scored whole, tail included.
    small = scoring_plan(1006, 10, max_tokens=5000)
    assert small.whole and small.predicted == 1005 and small.tail == 1000


def test_a_budget_counts_the_scored_tokens_own_bytes():
    model = tiny_gpt()
    tokens = random_stream(401)  # ids 0..VOCAB-1
    lengths = np.arange(VOCAB) % 3 + 1  # each id stands for 1 to 3 bytes
    total = int(lengths[tokens].sum())
    plan = scoring_plan(len(tokens), CONTEXT, max_tokens=4 * CONTEXT)
    metrics = evaluate_split(model, tokens, 5000, CONTEXT, 4, CPU, max_tokens=4 * CONTEXT,
                             byte_lengths=lengths, split_token_bytes=total)
    targets = np.concatenate([tokens[start + 1 : start + CONTEXT + 1] for start in plan.starts])
    assert metrics["tokens"] == len(targets) == 4 * CONTEXT
    # The split's 5000 bytes, times the share of its token bytes the targets hold.
    assert metrics["bytes"] == pytest.approx(5000 * lengths[targets].sum() / total, abs=1e-3)
    scores = score_tokens(model, tokens, CONTEXT, 4, CPU, plan=plan)
    assert metrics["bpb"] == pytest.approx(scores.loss * scores.tokens / metrics["bytes"]
                                           / math.log(2))


def test_streams_on_disk_score_and_fit_exactly_as_in_memory(tmp_path):
    from pipeline.data.shards import ShardWriter, read_tokens

    stream = random_stream(3000)
    with ShardWriter(tmp_path, np.dtype(np.uint16), 700) as writer:
        writer.append(stream)
    on_disk = read_tokens(tmp_path)
    model = tiny_gpt()
    for budget in (None, 200):
        plan = scoring_plan(len(stream), CONTEXT, budget)
        assert score_tokens(model, on_disk, CONTEXT, 8, CPU, plan=plan) == score_tokens(
            model, stream, CONTEXT, 8, CPU, plan=plan)
    # Baselines fitted chunk by chunk (chunks smaller than the stream) equal one pass.
    import pipeline.data.shards as shards

    original = shards._READ_TOKENS
    shards._READ_TOKENS = 256
    try:
        streamed = fit_baselines(read_tokens(tmp_path), VOCAB)
    finally:
        shards._READ_TOKENS = original
    whole = fit_baselines(stream, VOCAB)
    assert np.array_equal(streamed["unigram"].probabilities, whole["unigram"].probabilities)
    for name in ("pair_codes", "pair_counts", "context_counts", "distinct_followers"):
        assert np.array_equal(getattr(streamed["bigram"], name), getattr(whole["bigram"], name))


# --- baselines -------------------------------------------------------------------------

# Train [0, 1, 0, 1, 2] over a vocabulary of 4, alpha 1:
#   unigram counts 0:2 1:2 2:1 3:0, N = 5: P = (c + 1) / (5 + 4) = [3/9, 3/9, 2/9, 1/9]
#   pairs (0,1) (1,0) (0,1) (1,2): c(0) = 2, T(0) = 1 ({1}); c(1) = 2, T(1) = 2 ({0, 2});
#   2 and 3 never precede anything: c = T = 0, so they fall back to the unigram.
#   P(w | h) = (c(h, w) + T(h) P_uni(w)) / (c(h) + T(h)):
#   P(1 | 0) = (2 + 3/9) / 3 = 7/9       P(2 | 1) = (1 + 2 * 2/9) / 4 = 13/36
#   P(3 | 0) = (0 + 1/9) / 3 = 1/27      (unseen pair)
TOY_TRAIN = np.array([0, 1, 0, 1, 2], np.uint16)
TOY_SCORE = np.array([0, 1, 2], np.uint16)


def test_unigram_by_hand():
    unigram = UnigramModel.fit(TOY_TRAIN, vocab_size=4)
    np.testing.assert_allclose(unigram.probabilities, [3 / 9, 3 / 9, 2 / 9, 1 / 9])
    total, count = unigram.nll(TOY_SCORE)  # predicts 1 then 2; the first 0 is not predicted
    assert count == 2
    assert total == pytest.approx(-math.log(3 / 9) - math.log(2 / 9))


def test_unigram_alpha_smooths_and_must_be_positive():
    unigram = UnigramModel.fit(TOY_TRAIN, vocab_size=4, alpha=0.5)
    # (c + 0.5) / (5 + 2)
    np.testing.assert_allclose(unigram.probabilities, [2.5 / 7, 2.5 / 7, 1.5 / 7, 0.5 / 7])
    with pytest.raises(ValueError, match="alpha"):
        UnigramModel.fit(TOY_TRAIN, vocab_size=4, alpha=0.0)


def test_bigram_by_hand():
    bigram = BigramModel.fit(TOY_TRAIN, vocab_size=4)
    np.testing.assert_allclose(bigram.token_probabilities(TOY_SCORE), [7 / 9, 13 / 36])
    total, count = bigram.nll(TOY_SCORE)
    assert count == 2
    assert total == pytest.approx(-math.log(7 / 9) - math.log(13 / 36))


def test_bigram_gives_unseen_pairs_and_contexts_nonzero_probability():
    bigram = BigramModel.fit(TOY_TRAIN, vocab_size=4)
    assert bigram.token_probabilities(np.array([0, 3]))[0] == pytest.approx(1 / 27)
    unigram = [3 / 9, 3 / 9, 2 / 9, 1 / 9]
    for unseen_context in (2, 3):  # 2 was seen, but only as the last token; 3 never
        following = [bigram.token_probabilities(np.array([unseen_context, w]))[0]
                     for w in range(4)]
        np.testing.assert_allclose(following, unigram)


def test_every_context_is_a_distribution_over_the_vocabulary():
    vocab = 7
    train = random_stream(60, seed=1, vocab=5)  # ids 5 and 6 never occur
    for model in (UnigramModel.fit(train, vocab), BigramModel.fit(train, vocab, alpha=0.3)):
        for context in range(vocab):
            pairs = np.array([[context, w] for w in range(vocab)])
            following = np.array([model.token_probabilities(pair)[0] for pair in pairs])
            assert (following > 0).all()
            assert following.sum() == pytest.approx(1.0, abs=1e-12)


def test_bigram_beats_unigram_on_a_sequential_stream():
    # Each token is mostly the one after its predecessor: all the structure is sequential,
    # none in the frequencies (every id is about equally common).
    rng = np.random.default_rng(0)

    def stream(length: int) -> np.ndarray:
        ids = [0]
        for _ in range(length - 1):
            ids.append((ids[-1] + 1) % 20 if rng.random() < 0.9 else int(rng.integers(20)))
        return np.array(ids, np.uint16)

    train, held_out = stream(5000), stream(1000)
    unigram_nats, count = UnigramModel.fit(train, 20).nll(held_out)
    bigram_nats, _ = BigramModel.fit(train, 20).nll(held_out)
    assert unigram_nats / count == pytest.approx(math.log(20), abs=0.05)
    assert bigram_nats / count < 0.5 * unigram_nats / count


def test_bigram_stays_sparse_for_a_large_vocabulary():
    vocab = 50_000  # a dense V x V table would be 2.5e9 cells
    train = random_stream(20_000, seed=2, vocab=vocab)
    bigram = BigramModel.fit(train, vocab)
    assert bigram.pair_codes.size <= len(train) - 1
    assert bigram.context_counts.sum() == len(train) - 1
    total, count = bigram.nll(random_stream(1000, seed=3, vocab=vocab))
    assert count == 999 and math.isfinite(total)


def test_baselines_refuse_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        BigramModel.fit(np.array([0, 4]), vocab_size=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        UnigramModel.fit(TOY_TRAIN, vocab_size=4).nll(np.array([0, 9]))


def test_baseline_bpb_and_metrics():
    # Unigram total on [0, 1, 2]: ln 3 + ln 4.5 = ln 13.5 nats, over 3 bytes.
    unigram = UnigramModel.fit(TOY_TRAIN, vocab_size=4)
    assert baseline_bpb(unigram, TOY_SCORE, 3) == pytest.approx(math.log(13.5) / 3 / math.log(2))
    metrics = baseline_metrics(fit_baselines(TOY_TRAIN, 4), TOY_SCORE, 3)
    assert set(metrics) == {"unigram_bpb", "bigram_bpb"}
    assert metrics["bigram_bpb"] == pytest.approx(
        -(math.log(7 / 9) + math.log(13 / 36)) / 3 / math.log(2)
    )


# --- corpus fingerprint ----------------------------------------------------------------


def test_corpus_fingerprint_changes_with_any_byte_and_only_then(tmp_path):
    table = tmp_path / "clean"
    (table / "part").mkdir(parents=True)
    (table / "part" / "a.parquet").write_bytes(b"alpha")
    (table / "b.parquet").write_bytes(b"beta")
    meta = tmp_path / "meta.json"
    meta.write_text("{}")

    first = corpus_fingerprint([table, meta])
    assert len(first) == 64
    assert corpus_fingerprint([meta, table]) == first  # order of the arguments: no matter

    (table / "part" / "a.parquet").write_bytes(b"alphA")
    assert corpus_fingerprint([table, meta]) != first
    (table / "part" / "a.parquet").write_bytes(b"alpha")
    assert corpus_fingerprint([table, meta]) == first

    (table / "b.parquet").rename(table / "c.parquet")  # same bytes, another name
    assert corpus_fingerprint([table, meta]) != first


def test_corpus_fingerprint_refuses_a_missing_path(tmp_path):
    with pytest.raises(GptpipeError, match="not found"):
        corpus_fingerprint([tmp_path / "absent"])


def test_document_openings_count_words_in_any_script_and_leave_something(tmp_path):
    from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter

    texts = ["北京是中国的首都，也是一座城市。",  # one unspaced paragraph: 4 characters
             "Short.",  # no word left after the opening: skipped
             "The Eiffel Tower (French: tour Eiffel) is in Paris.",
             "def main():\n    return 0  # done\n"]
    with DocumentWriter(tmp_path, DOCUMENT_SCHEMA) as writer:
        for index, text in enumerate(texts):
            writer.append(id=index, source=f"d{index}", text=text)
    assert document_openings(tmp_path, 3, 4) == [
        "北京是中", "The Eiffel Tower (French", "def main():\n    return 0"]
    assert document_openings(tmp_path, 1, 4) == ["北京是中"]
