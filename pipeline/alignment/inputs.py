"""RL inputs as token ids: equal-length prompt tensors for rollouts, and DPO's pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.alignment.preference_data import HELDOUT_FILE, TRAIN_FILE, Pair
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


@dataclass(frozen=True)
class RolloutPrompts:
    """The prompts rollouts and evaluations continue: ``<bos>`` + K tokens each."""

    train: torch.Tensor  # (P, 1 + K) int64: the distinct train prompts
    heldout: torch.Tensor  # (E, 1 + K) int64: the first rlhf.eval_prompts distinct held-out
    length: int  # K
    empty: int  # distinct prompts of no token, left out


def prompt_tensors(
    tokenizer: TextTokenizer, train: list[str], heldout: list[str], context: int,
    max_new_tokens: int, eval_prompts: int, pairs_dir: str | Path = "",
    need_train: bool = True,
) -> RolloutPrompts:
    """<bos> + the first K ids of each distinct prompt, K the shortest prompt's length
    within the context budget (<bos> + K + max_new_tokens fits ``context``).

    Why one length: ``sampling.sample_batch`` runs a batch without padding (left padding
    would shift rotary positions), so every prompt is cut to the shortest. Builtin pairs
    all have preferences.prompt_tokens tokens, so nothing is cut; a file with one short
    prompt cuts every prompt to it (the stage says K). A prompt of no token (an empty
    one: a pair may have none) would cut every other to nothing, so it is left out and
    counted (``empty``); a side left with no prompt at all is one line naming its file of
    ``pairs_dir`` (the train side only when ``need_train``: DPO trains on the pairs
    themselves). Duplicate prompts count once; evaluation takes the first
    ``eval_prompts`` distinct held-out ones.
    """
    budget = context - 1 - max_new_tokens
    if budget < 0:
        raise GptpipeError(
            f"rlhf.max_new_tokens = {max_new_tokens}; allowed: at most {context - 1} (the "
            f"model's context, {context}, holds <bos> + prompt + completion)"
        )
    train = list(dict.fromkeys(train))
    heldout = list(dict.fromkeys(heldout))
    encoded = tokenizer.encode_batch(train + heldout)
    train_ids = [ids for ids in encoded[: len(train)] if ids]
    heldout_ids = [ids for ids in encoded[len(train) :] if ids]
    empty = len(encoded) - len(train_ids) - len(heldout_ids)
    heldout_ids = heldout_ids[:eval_prompts]
    for side, ids, name, needed in (("train", train_ids, TRAIN_FILE, need_train),
                                    ("held-out", heldout_ids, HELDOUT_FILE, True)):
        if needed and not ids:
            raise GptpipeError(
                f"{Path(pairs_dir) / name}: no {side} prompt of at least one token; allowed: "
                "pairs with prompts (RL samples continuations of them)"
            )
    length = min(min(len(ids) for ids in train_ids + heldout_ids), budget)

    def rows(prompts: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[BOS_ID, *ids[:length]] for ids in prompts],
                            dtype=torch.long).reshape(len(prompts), 1 + length)

    return RolloutPrompts(rows(train_ids), rows(heldout_ids), length, empty)


def encode_pairs(tokenizer: TextTokenizer, pairs: list[Pair]) -> list[EncodedPair]:
    """DPO's pairs as ids: <bos> + prompt; completions encoded apart (a token boundary at
    the prompt's end, as the policy sampled them) and without <eos>."""
    count = len(pairs)
    encoded = tokenizer.encode_batch([p.prompt for p in pairs] + [p.chosen for p in pairs]
                                     + [p.rejected for p in pairs])
    return [EncodedPair([BOS_ID, *encoded[i]], encoded[count + i], encoded[2 * count + i])
            for i in range(count)]
