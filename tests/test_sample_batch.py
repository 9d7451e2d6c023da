"""sample_batch: one cache for a batch of equal-length prompts, the eos mask, early stop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from pipeline.lm.model import GPT, GPTConfig, KVCache
from pipeline.lm.sampling import SamplingConfig, generate_ids, sample_batch

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)


def _tiny_gpt(seed: int = 0, weight_std: float = 0.3) -> GPT:
    """A random GPT with large weights: at GPT-2's init (std 0.02) the tied embeddings make a
    tiny model greedily repeat its last token forever, which would test nothing."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=12, context=24, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, weight_std)
    return model


class _ChainModel(nn.Module):
    """A stand-in GPT whose next token is a fixed function of the last input token.

    ``successor[i]`` is the token that follows token ``i``, so each row's greedy output is
    known in advance. It records every forward pass's input length, and it still writes
    its inputs through the cache, so the cache's capacity is exercised.
    """

    def __init__(self, successor: list[int], context: int = 32) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=len(successor), context=context, n_layer=1)
        self.successor = torch.tensor(successor)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.calls: list[int] = []
        self.modes: list[bool] = []

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        self.calls.append(idx.shape[1])
        self.modes.append(self.training)
        if cache is not None:
            placeholder = torch.zeros(idx.shape[0], 1, idx.shape[1], 1)
            cache.update(0, placeholder, placeholder)
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits.scatter_(-1, self.successor[idx].unsqueeze(-1), 10.0)
        return logits, None


# 5 -> 6 -> eos; 7 -> 8 -> 9 -> eos; 4 -> 4 -> ... never ends; eos -> 5 (after eos a row
# keeps producing tokens, which must be masked out).
CHAIN = [0, 0, 0, 5, 4, 6, EOS_ID, 8, 9, EOS_ID]


def _greedy(max_new_tokens: int, stop_at_eos: bool = True) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos)


def test_greedy_rows_equal_generate_ids_on_each_prompt_alone():
    model = _tiny_gpt(seed=3)
    generator = torch.Generator().manual_seed(0)
    candidates = torch.cat((torch.full((40, 1), BOS_ID),
                            torch.randint(1, 12, (40, 3), generator=generator)), dim=1)
    alone = {tuple(p): list(generate_ids(model, p, GREEDY, generator))  # cut after <eos>
             for p in candidates.tolist()}
    # Which prompts make this random model write <eos> depends on the machine's float
    # rounding, so the rows are picked from the reference outputs: three that finish
    # early and three that run to max_new_tokens, so both kinds of row are compared.
    finished = [p for p, out in alone.items() if len(out) < GREEDY.max_new_tokens]
    running = [p for p, out in alone.items() if len(out) == GREEDY.max_new_tokens]
    assert finished and running, (len(finished), len(running))
    prompts = torch.tensor(finished[:3] + running[:3])
    tokens, mask = sample_batch(model, prompts, GREEDY, generator)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.shape == mask.shape == (len(prompts), 8)
    for row, prompt in enumerate(prompts.tolist()):
        assert tokens[row][mask[row]].tolist() == alone[tuple(prompt)]


def test_mask_is_true_through_eos_and_false_after_with_pad_tokens():
    model = _ChainModel(CHAIN)
    prompts = torch.tensor([[BOS_ID, 5], [BOS_ID, 7], [BOS_ID, 4]])
    tokens, mask = sample_batch(model, prompts, _greedy(6), torch.Generator())
    # Row 0: 6 eos, then masked; row 1: 8 9 eos; row 2: 4 forever (never finishes).
    assert tokens.tolist() == [
        [6, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        [8, 9, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
        [4, 4, 4, 4, 4, 4],
    ]
    assert mask.tolist() == [
        [True, True, False, False, False, False],
        [True, True, True, False, False, False],
        [True] * 6,
    ]
    # The prompt once, then one token per step; no forward pass after the last token.
    assert model.calls == [2, 1, 1, 1, 1, 1]


def test_stops_early_once_every_row_has_finished():
    model = _ChainModel(CHAIN)
    prompts = torch.tensor([[BOS_ID, 5], [BOS_ID, 7]])
    tokens, mask = sample_batch(model, prompts, _greedy(10), torch.Generator())
    # Row 1 ends at step 3, row 0 at step 2: N = 3, not 10.
    assert tokens.tolist() == [[6, EOS_ID, PAD_ID], [8, 9, EOS_ID]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert model.calls == [2, 1, 1]


def test_without_stop_at_eos_eos_is_an_ordinary_token():
    model = _ChainModel(CHAIN)
    tokens, mask = sample_batch(
        model, torch.tensor([[BOS_ID, 5]]), _greedy(4, stop_at_eos=False), torch.Generator()
    )
    assert tokens.tolist() == [[6, EOS_ID, 5, 6]]
    assert mask.all()


def test_eval_mode_during_generation_and_the_mode_restored():
    model = _ChainModel(CHAIN)
    model.train()
    sample_batch(model, torch.tensor([[BOS_ID, 7]]), _greedy(3), torch.Generator())
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    sample_batch(model, torch.tensor([[BOS_ID, 7]]), _greedy(3), torch.Generator())
    assert not model.training


def test_refuses_a_request_longer_than_the_context():
    model = _ChainModel(CHAIN, context=10)
    prompts = torch.tensor([[BOS_ID, 5, 5, 5]])
    # 4 + 6 = 10 fits exactly; 4 + 7 = 11 does not.
    sample_batch(model, prompts, _greedy(6), torch.Generator())
    with pytest.raises(ValueError, match="longer than the model's context"):
        sample_batch(model, prompts, _greedy(7), torch.Generator())


def test_refuses_malformed_prompts():
    model = _ChainModel(CHAIN)
    with pytest.raises(ValueError, match="shape"):
        sample_batch(model, torch.tensor([BOS_ID, 5]), _greedy(2), torch.Generator())
    with pytest.raises(ValueError, match="outside"):
        sample_batch(model, torch.tensor([[BOS_ID, 99]]), _greedy(2), torch.Generator())


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = _tiny_gpt(seed=1)
    config = SamplingConfig(temperature=1.0, top_k=5, max_new_tokens=10)
    prompts = torch.tensor([[BOS_ID, 4, 5]] * 6)

    def draw(seed: int):
        return sample_batch(model, prompts, config, torch.Generator().manual_seed(seed))

    tokens, mask = draw(0)
    again, mask_again = draw(0)
    assert torch.equal(tokens, again) and torch.equal(mask, mask_again)
    assert 1 <= tokens.shape[1] <= 10
    assert ((tokens >= 0) & (tokens < model.config.vocab_size)).all()
    # Identical prompts, independent draws: the rows are not all the same sample.
    assert len({tuple(row) for row in tokens.tolist()}) > 1
    # Every row's mask is a prefix that ends at its first <eos> (or runs to the end).
    for row, row_mask in zip(tokens.tolist(), mask.tolist(), strict=True):
        real = sum(row_mask)
        assert row_mask == [True] * real + [False] * (len(row) - real)
        assert EOS_ID not in row[: real - 1]
        assert real == len(row) or row[real - 1] == EOS_ID
