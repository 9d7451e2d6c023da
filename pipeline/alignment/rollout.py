"""Rollouts: sample completions of a batch of prompts, then score everything PPO and
REINFORCE need in one forward pass each of the policy and the frozen reference.

A rollout is prompt + completion; the logits at position T0 - 1 + i predict completion
token i, and the value at that position is the value of the state before token i (TRL's
alignment). Rewards come from any :data:`Scorer`: a callable
``(prompt_ids, completion_ids) -> (B,)`` tensor, prompt ids without the leading ``<bos>``
and completion ids cut before ``<eos>`` (``RewardModel.score_ids`` is one; a test plugs in
a toy rule). A weighted list of rewards (``rewards.WeightedReward``) is a
:class:`ComponentScorer` too: each rollout then keeps every component's scores, to log.

Every quantity is computed under the distribution the completions were sampled from,
softmax(logits / rlhf.temperature) (:func:`sampling_temperature`), for the policy and the
reference alike: the PPO ratio is then 1 at the rollout policy, and the KL penalty is the
KL between the two tempered distributions (never a bonus, in expectation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from pipeline.alignment.policy import PolicyWithValue, completion_logits
from pipeline.alignment.rl_losses import (
    entropy_from_logits,
    masked_mean,
    sequence_logprobs,
    shaped_rewards,
    tempered_logits,
)
from pipeline.core.errors import GptpipeError
from pipeline.data.tokenizer import BOS_ID, EOS_ID
from pipeline.lm.model import GPT
from pipeline.lm.sampling import SamplingConfig, sample_batch

Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
GoldScorer = Callable[[list[int], list[int]], float]


@runtime_checkable
class ComponentScorer(Protocol):
    """A scorer that is a weighted sum of rewards and gives each one's scores too."""

    def __call__(self, prompt_ids: list[list[int]],
                 completion_ids: list[list[int]]) -> torch.Tensor: ...

    def score_components(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def score_with_components(scorer: Scorer, prompt_ids: list[list[int]],
                          completion_ids: list[list[int]],
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) what RL maximizes and, for a weighted list of rewards, each component's (B,)
    scores by name (none for a single reward)."""
    if isinstance(scorer, ComponentScorer):
        return scorer.score_components(prompt_ids, completion_ids)
    return torch.as_tensor(scorer(prompt_ids, completion_ids)), {}


def sampling_temperature(config: SamplingConfig) -> float:
    """The temperature RL samples and scores at; one line refusing a sampler whose
    distribution RL cannot score.

    Top-k and top-p keep a set of tokens that moves with the weights: a sampled token can
    fall outside the updated policy's set (ratio 0) or the reference's (log-probability
    -inf, an infinite KL). Greedy decoding has no distribution at all.
    """
    if config.greedy or config.top_k or config.top_p < 1:
        raise GptpipeError(
            f"rlhf: sampling with temperature {config.temperature:g}, top_k {config.top_k}, "
            f"top_p {config.top_p:g}; allowed for RL: a temperature > 0 with neither top_k "
            "nor top_p (RL scores each sample under the distribution it came from)"
        )
    return config.temperature


def split_ids(prompts: torch.Tensor, completions: torch.Tensor,
              mask: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: the prompt's ids without ``<bos>`` and the completion's real ids cut
    before ``<eos>`` (the reward model's and the gold judge's conventions)."""
    prompt_ids = [row[1:] if row[:1] == [BOS_ID] else row for row in prompts.tolist()]
    completion_ids = []
    for tokens, keep in zip(completions.tolist(), mask.tolist(), strict=True):
        real = [t for t, k in zip(tokens, keep, strict=True) if k]
        completion_ids.append(real[: real.index(EOS_ID)] if EOS_ID in real else real)
    return prompt_ids, completion_ids


@dataclass
class Rollout:
    """One batch of sampled completions and everything the updates need, all detached.

    Shapes: B prompts of T0 tokens, N completion positions (the longest completion).
    """

    prompts: torch.Tensor  # (B, T0) int64, <bos> first
    completions: torch.Tensor  # (B, N) int64, <pad> after <eos>
    mask: torch.Tensor  # (B, N) bool: real tokens, up to and including <eos>
    logprobs: torch.Tensor  # (B, N) under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, N) under the frozen reference
    values: torch.Tensor  # (B, N) the value head's estimates
    scores: torch.Tensor  # (B,) what RL maximizes (rlhf.reward: the reward model's score)
    kl: torch.Tensor  # (B, N) per-token k1 KL estimate, 0 at padding
    rewards: torch.Tensor  # (B, N) score at the last real token - kl_coef * kl
    entropy: float  # mean per-token entropy of the policy over real tokens
    kl_coef: float
    temperature: float  # what the completions were sampled at, and every column scored at
    # name -> (B,) each reward of a weighted list (empty for a single reward)
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kl_per_sequence(self) -> torch.Tensor:
        """(B,) the KL estimate summed over each completion, nats per sequence."""
        return self.kl.sum(dim=1)

    @property
    def returns(self) -> torch.Tensor:
        """(B,) each completion's total reward: score - kl_coef * summed KL."""
        return self.rewards.sum(dim=1)

    def stats(self) -> dict[str, float]:
        return {
            "rm_score": float(self.scores.mean()),
            "kl": float(self.kl_per_sequence.mean()),
            "entropy": self.entropy,
            "kl_coef": self.kl_coef,
            "completion_tokens": float(self.mask.sum(dim=1).float().mean()),
            **{f"reward/{name}": float(values.float().mean())
               for name, values in self.components.items()},
        }


@torch.no_grad()
def collect_rollout(
    policy: PolicyWithValue, reference: GPT, prompts: torch.Tensor, config: SamplingConfig,
    generator: torch.Generator, scorer: Scorer, kl_coef: float,
) -> Rollout:
    """Sample one completion per (B, T0) prompt and score the batch.

    Sampling uses the KV cache; then one forward pass of the policy (log-probabilities,
    values, entropy) and one of the reference over the whole batch, all at the sampling
    temperature, and one call of the scorer. Rewards follow InstructGPT: the score at the
    last real token, minus ``kl_coef`` times the per-token KL everywhere.
    """
    temperature = sampling_temperature(config)
    device = policy.value_head.weight.device
    prompts = prompts.to(device)
    completions, mask = sample_batch(policy.gpt, prompts, config, generator)  # (B, N) each
    tokens = torch.cat((prompts, completions), dim=1)[:, :-1]
    logits, values = policy(tokens, start=prompts.shape[1] - 1)  # (B, N, V), (B, N)
    logits = tempered_logits(logits, temperature)
    logprobs = sequence_logprobs(logits, completions)  # (B, N)
    entropy = float(masked_mean(entropy_from_logits(logits), mask))
    del logits
    ref_logits = tempered_logits(completion_logits(reference, prompts, completions),
                                 temperature)  # (B, N, V)
    ref_logprobs = sequence_logprobs(ref_logits, completions)
    del ref_logits
    prompt_ids, completion_ids = split_ids(prompts, completions, mask)
    total, components = score_with_components(scorer, prompt_ids, completion_ids)
    scores = total.to(device, torch.float32)
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    return Rollout(prompts, completions, mask, logprobs, ref_logprobs, values.float(), scores,
                   kl, rewards, entropy, kl_coef, temperature, components)
