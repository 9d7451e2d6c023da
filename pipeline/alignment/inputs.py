"""RL inputs as token ids: equal-length prompt tensors for rollouts, and DPO's pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.alignment.preference_data import Pair
from pipeline.core.errors import GptpipeError
from pipeline.data.tokenizer import BOS_ID, TextTokenizer


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as ids: the prompt with ``<bos>`` first; completions without
    ``<eos>`` (a pair's text does not say whether its sample ended, so neither
    completion is credited with the ending; the reward model reads them the same way)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]



def prompt_tensors(
    tokenizer: TextTokenizer, train: list[str], heldout: list[str], context: int,
    max_new_tokens: int, eval_prompts: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train prompts (P, 1 + K), eval prompts (E, 1 + K), K): <bos> + the first K ids of
    each distinct prompt, K the shortest prompt's length within the context budget."""
    train = list(dict.fromkeys(train))
    heldout = list(dict.fromkeys(heldout))[:eval_prompts]
    encoded = tokenizer.encode_batch(train + heldout)
    budget = context - 1 - max_new_tokens
    if budget < 0:
        raise GptpipeError(
            f"rlhf.max_new_tokens = {max_new_tokens}; allowed: at most {context - 1} (the "
            f"model's context, {context}, holds <bos> + prompt + completion)"
        )
    length = min(min(len(ids) for ids in encoded), budget)
    rows = [[BOS_ID, *ids[:length]] for ids in encoded]
    train_rows = torch.tensor(rows[: len(train)], dtype=torch.long)
    eval_rows = torch.tensor(rows[len(train) :], dtype=torch.long)
    return train_rows, eval_rows, length


def encode_pairs(tokenizer: TextTokenizer, pairs: list[Pair]) -> list[EncodedPair]:
    """DPO's pairs as ids: <bos> + prompt; completions encoded apart (a token boundary at
    the prompt's end, as the policy sampled them) and without <eos>."""
    count = len(pairs)
    encoded = tokenizer.encode_batch([p.prompt for p in pairs] + [p.chosen for p in pairs]
                                     + [p.rejected for p in pairs])
    return [EncodedPair([BOS_ID, *encoded[i]], encoded[count + i], encoded[2 * count + i])
            for i in range(count)]
