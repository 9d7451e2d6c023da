"""RLHF for the GPT policy: PPO with a KL penalty, REINFORCE with a baseline, and DPO.

The pieces, each usable on its own (the ``rlhf`` stage is glue around :func:`tune`):

- :class:`PolicyWithValue`: the policy GPT plus a linear value head (PPO's critic).
- :func:`collect_rollout`: sample completions of a batch of equal-length prompts with the
  key/value cache, then score the whole batch in one forward pass each of the policy and
  the frozen reference: log-probabilities, values, per-token KL, the reward model's score
  and the InstructGPT per-token reward (score at the last token, -kl_coef * KL at each).
- :func:`ppo_update`, :func:`reinforce_update`, :func:`dpo_update`: one policy update
  each, with the health checks below. The maths is in :mod:`pipeline.rl_losses`.
- :func:`evaluate_policy` and :func:`win_rate`: fresh samples on held-out prompts, scored
  by the reward model and by the gold judge, and head-to-head comparisons.
- :func:`tune` and :class:`Tuner`: the loop: updates, an evaluation every
  ``rlhf.eval_every`` steps, and the best policy by gold score; given a checkpoint folder,
  a resumable snapshot at every evaluation (and on Ctrl-C), like pretraining's.

Rewards come from any ``Scorer``: a callable ``(prompt_ids, completion_ids) -> (B,)``
tensor, prompt ids without the leading ``<bos>`` and completion ids cut before ``<eos>``.
``RewardModel.score_ids`` is one; a test plugs in a toy rule. The gold score is any
``GoldScorer``, ``(prompt_ids, completion_ids) -> float`` with the same conventions.

Prompts are fixed-length token prefixes, ``<bos>`` + K prompt tokens, all the same
length, so a batch samples at once (``sampling.sample_batch``): the model has no padding
mask, and left padding would shift rotary positions. A rollout is prompt + completion;
the logits at position T0 - 1 + i predict completion token i, and the value at that
position is the value of the state before token i (TRL's alignment).

Dropout is off for the whole run (the policy stays in eval mode; gradients still flow):
dropout would make the log-probabilities of the rollout and of the update differ even
before any step, so PPO's importance ratio would start away from 1. For the same reason
everything runs in float32, with no autocast: bfloat16 matmuls over differently shaped
batches (the rollout's whole batch, an update's minibatch) round differently by more
than the ratio check allows.

Health checks (each a one-line ``GptpipeError`` naming the update):
- before the first optimizer step of an update the importance ratio must be 1 on every
  real token (|ratio - 1| < 1e-4): otherwise the rollout was not made by this policy (a
  stale copy, a different mode, a mismatched alignment), and every PPO statistic is wrong;
- a NaN or infinite loss stops the run at that update;
- the policy's KL to the reference, in nats per sequence, must stay at or below
  ``rlhf.kl_ceiling`` (checked on every rollout and on every evaluation's samples; DPO
  has no rollouts, so there at every evaluation).

Resuming (:class:`Tuner` with a ``state_dir``): a snapshot holds everything the rest of
the run depends on, so a resumed run is bit-for-bit the uninterrupted one on the same
device: the policy and value head, the optimizer moments, the KL coefficient, the states
of the generators that sample rollouts and shuffle batches and minibatches, the indices
drawn but not yet served, and the evaluations so far (the final metrics need the starting
policy's samples). The best policy's weights live in a folder of their own, written only
when a snapshot would otherwise lose them (see :meth:`Tuner.save_state`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import (
    load_model,
    load_training_state,
    read_training_info,
    save_model,
    save_training_state,
)
from pipeline.errors import GptpipeError
from pipeline.model import GPT
from pipeline.params import RlhfParams
from pipeline.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    sequence_logprobs,
    shaped_rewards,
)
from pipeline.sampling import SamplingConfig, sample_batch
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID

Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
GoldScorer = Callable[[list[int], list[int]], float]

# The value head's own learning rate. rlhf.lr (1e-5 by default) is a fine-tuning rate for
# a pretrained body; a freshly initialized linear head needs far larger steps to fit the
# returns within a 60-update run (at 1e-5 it barely leaves 0).
VALUE_HEAD_LR = 1e-3

# The adaptive KL controller's horizon, in rollout steps (n_steps = 1 per rollout): a 20%
# KL error moves the coefficient by at most 2% per step, about TRL's default rate
# (horizon 10,000 episodes at 256 episodes per batch: 2.6%).
KL_HORIZON_STEPS = 10

# |ratio - 1| allowed before any optimizer step: float32 noise between the rollout's
# whole-batch forward pass and a minibatch's is ~1e-6.
RATIO_TOLERANCE = 1e-4

# Offsets from rlhf.seed for each independent stream of randomness.
_SAMPLE_SEED, _SHUFFLE_SEED, _EVAL_SEED = 0, 1, 2

# Inside the checkpoint folder: the resumable snapshot, and the best policy so far (apart,
# so that replacing the snapshot never touches it).
SNAPSHOT_DIR = "snapshot"
BEST_DIR = "best"


class Judge(Protocol):
    """What :func:`win_rate` needs of ``pipeline.gold.GoldJudge``."""

    def score(self, prompt: str, completion: str) -> float: ...

    def prefer(self, prompt: str, a: str, b: str, rng: np.random.Generator) -> int: ...


# ------------------------------------------------------------------------------- model


class PolicyWithValue(nn.Module):
    """The policy GPT and a linear value head on its final hidden states.

    Why a head on the policy's own hidden states (TRL's default) and not a separate value
    model initialized from the reward model (InstructGPT): one forward pass gives both the
    logits and the values, where a second 4 x 256 body would add about half again to
    every update's compute on CPU, where the default run has about 5 minutes.

    The head reads the hidden states *detached*: the value loss trains the head alone and
    never the body, so only the policy gradient moves the language model. A value loss
    through a shared body drags the features the policy samples from, in units (reward
    model logits) unrelated to the policy loss's, and that drift shows up as KL the
    penalty then has to fight. The price: the critic is a linear probe of the policy's
    features, which suffices to learn a per-prompt baseline for completions of 40 tokens.

    The head starts at zero (values 0, so early advantages are plain reward-to-go, like
    REINFORCE) and trains at :data:`VALUE_HEAD_LR` (see :func:`make_optimizer`).
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> logits (B, T - start, V) and values (B, T - start).

        ``start`` skips the first positions' outputs (a rollout needs only those from the
        prompt's last token on); they are still run, as context.
        """
        hidden = self.gpt.hidden_states(idx)[:, start:]  # (B, T', C)
        logits = self.gpt.lm_head(hidden)  # (B, T', V)
        values = self.value_head(hidden.detach()).squeeze(-1)  # (B, T')
        return logits, values


def completion_logits(gpt: GPT, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Logits (B, N, V) that predict each of the (B, N) completion tokens after the
    (B, T0) prompts: one forward pass over prompt + completion minus its last token."""
    tokens = torch.cat((prompts, completions), dim=1)[:, :-1]  # (B, T0 + N - 1)
    hidden = gpt.hidden_states(tokens)[:, prompts.shape[1] - 1 :]  # (B, N, C)
    return gpt.lm_head(hidden)


def frozen_copy(gpt: GPT) -> GPT:
    """A copy of ``gpt`` with no gradients, in eval mode: the KL reference."""
    reference = copy.deepcopy(gpt).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def make_optimizer(policy: PolicyWithValue, rlhf: RlhfParams,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW on the GPT (weight decay on matrices only, as in pretraining) at rlhf.lr,
    and on the value head at :data:`VALUE_HEAD_LR` without decay.

    Betas (0.9, 0.95), those of pretraining. The value head's group is always there; it
    simply gets no gradient under REINFORCE and DPO.
    """
    decay = [p for p in policy.gpt.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in policy.gpt.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": rlhf.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": list(policy.value_head.parameters()), "weight_decay": 0.0,
         "lr": VALUE_HEAD_LR},
    ]
    return torch.optim.AdamW(groups, lr=rlhf.lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def kl_controller(rlhf: RlhfParams) -> AdaptiveKLController | FixedKLController:
    if rlhf.adaptive_kl:
        return AdaptiveKLController(rlhf.kl_coef, rlhf.target_kl, KL_HORIZON_STEPS)
    return FixedKLController(rlhf.kl_coef)


# ----------------------------------------------------------------------------- rollout


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
    scores: torch.Tensor  # (B,) the reward model's scores
    kl: torch.Tensor  # (B, N) per-token k1 KL estimate, 0 at padding
    rewards: torch.Tensor  # (B, N) score at the last real token - kl_coef * kl
    entropy: float  # mean per-token entropy of the policy over real tokens
    kl_coef: float

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
        }


@torch.no_grad()
def collect_rollout(
    policy: PolicyWithValue, reference: GPT, prompts: torch.Tensor, config: SamplingConfig,
    generator: torch.Generator, scorer: Scorer, kl_coef: float,
) -> Rollout:
    """Sample one completion per (B, T0) prompt and score the batch.

    Sampling uses the KV cache; then one forward pass of the policy (log-probabilities,
    values, entropy) and one of the reference over the whole batch, and one call of the
    scorer. Rewards follow InstructGPT: the score at the last real token, minus
    ``kl_coef`` times the per-token KL everywhere.
    """
    device = policy.value_head.weight.device
    prompts = prompts.to(device)
    completions, mask = sample_batch(policy.gpt, prompts, config, generator)  # (B, N) each
    tokens = torch.cat((prompts, completions), dim=1)[:, :-1]
    logits, values = policy(tokens, start=prompts.shape[1] - 1)  # (B, N, V), (B, N)
    logprobs = sequence_logprobs(logits, completions)  # (B, N)
    entropy = float(masked_mean(entropy_from_logits(logits), mask))
    del logits
    ref_logprobs = sequence_logprobs(completion_logits(reference, prompts, completions),
                                     completions)
    prompt_ids, completion_ids = split_ids(prompts, completions, mask)
    scores = torch.as_tensor(scorer(prompt_ids, completion_ids)).to(device, torch.float32)
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    return Rollout(prompts, completions, mask, logprobs, ref_logprobs, values.float(), scores,
                   kl, rewards, entropy, kl_coef)


# ------------------------------------------------------------------------ health checks


def check_kl(kl_per_sequence: float, ceiling: float, where: str) -> None:
    """Stop when the mean KL to the reference (nats per sequence) exceeds ``ceiling``."""
    if not kl_per_sequence <= ceiling:  # NaN fails too
        raise GptpipeError(
            f"rlhf: the policy's KL to the reference is {kl_per_sequence:.3f} nats per "
            f"sequence {where}, above rlhf.kl_ceiling = {ceiling:g}; the policy has drifted "
            "too far from the pretrained model (reward hacking or a too large step); "
            "allowed: a KL at or below the ceiling (lower rlhf.lr, raise rlhf.kl_coef, "
            "or raise rlhf.kl_ceiling)"
        )


def check_in_step(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                  update: int) -> float:
    """Before any optimizer step, new and rollout log-probabilities must agree.

    Returns max |ratio - 1| over real tokens; raises when it is not below
    :data:`RATIO_TOLERANCE` (NaN included).
    """
    ratio = torch.exp(logprobs.detach() - old_logprobs)  # (B, N)
    worst = float(torch.where(mask, (ratio - 1).abs(), torch.zeros_like(ratio)).max())
    if not worst < RATIO_TOLERANCE:
        raise GptpipeError(
            f"rlhf: policy and rollout out of step at update {update}: before any optimizer "
            f"step the importance ratio is off 1 by {worst:.3g} (allowed: < "
            f"{RATIO_TOLERANCE:g}); the rollout was not sampled and scored by this policy"
        )
    return worst


def check_finite(loss: torch.Tensor, what: str, update: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise GptpipeError(
            f"rlhf: the {what} loss is {value} at update {update}; stopped before writing "
            "any model; allowed: a finite loss (lower rlhf.lr or set rlhf.grad_clip > 0)"
        )
    return value


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, policy: PolicyWithValue,
          grad_clip: float) -> None:
    """Backward, clip and step. The GPT and the value head are clipped separately: their
    gradients are independent (the head reads detached features), and the value loss's
    scale (reward units) must not shrink the policy's step through a joint norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(policy.gpt.parameters(), grad_clip)
        torch.nn.utils.clip_grad_norm_(policy.value_head.parameters(), grad_clip)
    optimizer.step()


# ------------------------------------------------------------------------------ updates


def ppo_update(
    policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout,
    rlhf: RlhfParams, generator: torch.Generator, update: int,
) -> dict[str, float]:
    """PPO on one rollout: ``rlhf.ppo_epochs`` passes over shuffled minibatches.

    Advantages from GAE (``rlhf.gamma``, ``rlhf.gae_lambda``) on the shaped rewards and
    the rollout's values, whitened over the batch's real tokens. Each minibatch of
    ``rlhf.minibatch_size`` rollouts minimizes the clipped policy loss +
    ``value_coef`` * clipped value loss - ``entropy_coef`` * entropy. ``generator`` (CPU)
    shuffles. Returns the means over minibatches of policy_loss, value_loss,
    clip_fraction, approx_kl and entropy (the rollout's when ``entropy_coef`` is 0), with
    the ratio check's worst deviation.
    """
    check_kl(float(rollout.kl_per_sequence.mean()), rlhf.kl_ceiling, f"at update {update}")
    advantages, returns = gae(rollout.rewards, rollout.values, rollout.mask, rlhf.gamma,
                              rlhf.gae_lambda)
    advantages = masked_whiten(advantages, rollout.mask)
    tokens = torch.cat((rollout.prompts, rollout.completions), dim=1)[:, :-1]
    start = rollout.prompts.shape[1] - 1
    size = tokens.shape[0]
    totals = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "approx_kl",
                            "entropy"), 0.0)
    ratio_error, minibatches = None, 0
    # The entropy's (b, N, V) terms cost about a tenth of a minibatch: only computed when
    # they are trained; otherwise the rollout's (the policy at the update's start) is given.
    entropy_bonus = rlhf.entropy_coef > 0
    for _ in range(rlhf.ppo_epochs):
        order = torch.randperm(size, generator=generator).to(tokens.device)
        for first in range(0, size, rlhf.minibatch_size):
            rows = order[first : first + rlhf.minibatch_size]
            mask = rollout.mask[rows]
            logits, values = policy(tokens[rows], start=start)  # (b, N, V), (b, N)
            logprobs = sequence_logprobs(logits, rollout.completions[rows])  # (b, N)
            if ratio_error is None:
                ratio_error = check_in_step(logprobs, rollout.logprobs[rows], mask, update)
            policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
                logprobs, rollout.logprobs[rows], advantages[rows], mask, rlhf.clip_range)
            value_loss = ppo_value_loss(values, rollout.values[rows], returns[rows], mask,
                                        rlhf.value_clip)
            loss = policy_loss + rlhf.value_coef * value_loss
            if entropy_bonus:
                entropy = masked_mean(entropy_from_logits(logits), mask)
                loss = loss - rlhf.entropy_coef * entropy
                totals["entropy"] += float(entropy.detach())
            check_finite(loss, "PPO", update)
            _step(optimizer, loss, policy, rlhf.grad_clip)
            minibatches += 1
            for name, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                                ("clip_fraction", clip_fraction), ("approx_kl", approx_kl)):
                totals[name] += float(value.detach())
    stats = {name: total / minibatches for name, total in totals.items()}
    if not entropy_bonus:
        stats["entropy"] = rollout.entropy
    stats["ratio_error"] = ratio_error
    return stats


def leave_one_out_baseline(returns: torch.Tensor) -> torch.Tensor:
    """(B,) each return's baseline: the mean of the other B - 1 returns (0 when B = 1).

    The batch-mean baseline without its own sample (RLOO, Kool et al. 2019; Ahmadian et
    al. 2024): it keeps the policy gradient unbiased, where a mean that includes the
    sample's own return biases it by 1/B, and, unlike a moving average, it reflects the
    current policy and needs no state.
    """
    count = returns.shape[0]
    if count < 2:
        return torch.zeros_like(returns)
    return (returns.sum() - returns) / (count - 1)


def reinforce_update(
    policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout,
    rlhf: RlhfParams, update: int,
) -> dict[str, float]:
    """One Monte-Carlo policy-gradient step on a rollout (on-policy: one step per batch).

    Each completion's return is its reward-model score minus kl_coef times its summed KL
    to the reference; the baseline is :func:`leave_one_out_baseline`. The loss is
    ``rl_losses.reinforce_loss``. Returns policy_loss, the baseline's mean and the ratio
    check's worst deviation.
    """
    check_kl(float(rollout.kl_per_sequence.mean()), rlhf.kl_ceiling, f"at update {update}")
    returns = rollout.returns  # (B,)
    baseline = leave_one_out_baseline(returns)
    logits = completion_logits(policy.gpt, rollout.prompts, rollout.completions)  # (B, N, V)
    logprobs = sequence_logprobs(logits, rollout.completions)  # (B, N)
    ratio_error = check_in_step(logprobs, rollout.logprobs, rollout.mask, update)
    loss = reinforce_loss(logprobs, rollout.mask, returns, baseline)
    check_finite(loss, "REINFORCE", update)
    _step(optimizer, loss, policy, rlhf.grad_clip)
    return {"policy_loss": float(loss.detach()), "return": float(returns.mean()),
            "ratio_error": ratio_error}


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as ids: the prompt with ``<bos>`` first; completions without
    ``<eos>`` (a pair's text does not say whether its sample ended, so neither
    completion is credited with the ending; the reward model reads them the same way)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def completion_logprob_sums(model: GPT, prompts: Sequence[Sequence[int]],
                            completions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B,) the summed log-probability of each completion after its prompt, one forward.

    Rows are prompt + completion, cut to the model's context (the completion loses its
    end), right-padded with <pad>: causal attention keeps padding from changing any real
    position. A completion with no room left sums to 0.
    """
    context = model.config.context
    device = model.lm_head.weight.device
    rows = [(list(p) + list(c))[:context] for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # targets that count
    for index, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        scored[index, len(prompt) - 1 : len(row) - 1] = True
    ids, scored = ids.to(device), scored.to(device)
    logits, _ = model(ids[:, :-1])  # (B, L - 1, V)
    logprobs = sequence_logprobs(logits, ids[:, 1:])  # (B, L - 1)
    return torch.where(scored, logprobs, torch.zeros_like(logprobs)).sum(dim=1)


def dpo_update(
    policy: PolicyWithValue, reference: GPT, optimizer: torch.optim.Optimizer,
    pairs: Sequence[EncodedPair], rlhf: RlhfParams, update: int,
) -> dict[str, float]:
    """One DPO step on a batch of pairs (chosen and rejected in one forward pass each
    of the policy and the reference); ``rlhf.dpo_beta`` scales the implicit reward.

    Returns dpo_loss, reward_accuracy, reward_margin (mean chosen - rejected implicit
    reward), chosen_reward and rejected_reward.
    """
    prompts = [p.prompt for p in pairs] * 2
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    count = len(pairs)
    policy_logps = completion_logprob_sums(policy.gpt, prompts, completions)  # (2B,)
    with torch.no_grad():
        ref_logps = completion_logprob_sums(reference, prompts, completions)
    loss, accuracy, chosen, rejected = dpo_loss(
        policy_logps[:count], policy_logps[count:], ref_logps[:count], ref_logps[count:],
        rlhf.dpo_beta)
    check_finite(loss, "DPO", update)
    _step(optimizer, loss, policy, rlhf.grad_clip)
    return {"dpo_loss": float(loss.detach()), "reward_accuracy": float(accuracy),
            "reward_margin": float((chosen - rejected).mean()),
            "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean())}


# --------------------------------------------------------------------------- evaluation


def sequence_kl(logits: torch.Tensor, ref_logits: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(policy || reference) summed over each completion's real positions, nats.

    At each position the exact KL between the two next-token distributions (B, N, V)
    (not a one-sample estimate): never negative, and of far lower variance than the
    summed k1 of the sampled tokens, whose expectation it equals. Evaluation uses it.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(dim=-1)  # (B, N)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=1)


@dataclass
class PolicyEval:
    """A policy's fresh samples on the evaluation prompts, and their scores."""

    rm_score: float  # mean reward-model score
    gold_score: float  # mean gold score
    kl: float  # mean KL to the reference, nats per sequence (exact per position)
    entropy: float  # mean per-token entropy
    completions: list[list[int]] = field(repr=False)  # ids, cut before <eos>

    def stats(self) -> dict[str, float]:
        return {"rm_score": self.rm_score, "gold_score": self.gold_score, "kl": self.kl,
                "entropy": self.entropy}

    def to_json(self) -> dict[str, Any]:
        """A snapshot's copy (JSON keeps a float's every bit: it writes repr)."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PolicyEval:
        return cls(float(raw["rm_score"]), float(raw["gold_score"]), float(raw["kl"]),
                   float(raw["entropy"]), [[int(t) for t in ids] for ids in raw["completions"]])


@torch.no_grad()
def evaluate_policy(
    gpt: GPT, reference: GPT, prompts: torch.Tensor, config: SamplingConfig, seed: int,
    scorer: Scorer, gold: GoldScorer, batch_size: int,
) -> PolicyEval:
    """Sample one completion per (P, T0) prompt and score them.

    Sampling uses ``config`` (the rollout temperature, not greedy: what the policy is
    trained to produce) from a generator seeded with ``seed`` afresh on every call, so
    two evaluations of one policy give the same samples and evaluations of different
    policies are compared on the same random draws. ``batch_size`` prompts at a time
    (part of what fixes the draws: the generator serves a batch's rows together).
    Returns the mean reward-model score, gold score, KL to ``reference``
    (:func:`sequence_kl`) and entropy, and the completions.
    """
    device = gpt.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    rm_scores, gold_scores, kls, entropies, counts = [], [], [], [], []
    completions: list[list[int]] = []
    for first in range(0, prompts.shape[0], batch_size):
        chunk = prompts[first : first + batch_size].to(device)  # (b, T0)
        new_tokens, mask = sample_batch(gpt, chunk, config, generator)  # (b, N)
        logits = completion_logits(gpt, chunk, new_tokens)  # (b, N, V)
        entropies.append(float(masked_mean(entropy_from_logits(logits), mask)) *
                         float(mask.sum()))
        counts.append(float(mask.sum()))
        ref_logits = completion_logits(reference, chunk, new_tokens)
        kls += sequence_kl(logits, ref_logits, mask).tolist()
        del logits, ref_logits
        prompt_ids, completion_ids = split_ids(chunk, new_tokens, mask)
        rm_scores += torch.as_tensor(scorer(prompt_ids, completion_ids)).float().tolist()
        gold_scores += [float(gold(p, c)) for p, c in zip(prompt_ids, completion_ids,
                                                          strict=True)]
        completions += completion_ids
    return PolicyEval(
        rm_score=float(np.mean(rm_scores)), gold_score=float(np.mean(gold_scores)),
        kl=float(np.mean(kls)), entropy=sum(entropies) / max(sum(counts), 1.0),
        completions=completions,
    )


def win_rate(judge: Judge, prompts: Sequence[str], completions_a: Sequence[str],
             completions_b: Sequence[str], rng: np.random.Generator) -> float:
    """The fraction of prompts where ``judge`` prefers completion a over completion b.

    A tie (the same text, or equal gold scores) counts 0.5 and draws nothing; otherwise
    ``judge.prefer`` decides, with ``rng`` (so its Bradley-Terry noise, if any, applies).
    """
    if not prompts:
        return 0.5
    wins = 0.0
    for prompt, a, b in zip(prompts, completions_a, completions_b, strict=True):
        if a == b or judge.score(prompt, a) == judge.score(prompt, b):
            wins += 0.5
        else:
            wins += 1.0 - judge.prefer(prompt, a, b, rng)
    return wins / len(prompts)


# --------------------------------------------------------------------------------- loop


class BatchCycle:
    """Endless batches of ``batch_size`` indices into ``count`` items: shuffled passes,
    each item once per pass; a batch may straddle two passes.

    An iterator object rather than a generator function so that a snapshot can record
    where it stands: ``pending`` (the current pass's indices not yet served) together with
    ``generator``'s state says exactly which batches come next.
    """

    def __init__(self, count: int, batch_size: int, generator: torch.Generator,
                 pending: Sequence[int] = ()) -> None:
        self.count, self.batch_size, self.generator = count, batch_size, generator
        self.pending = list(pending)

    def __iter__(self) -> BatchCycle:
        return self

    def __next__(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            self.pending += torch.randperm(self.count, generator=self.generator).tolist()
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return batch


@dataclass
class TuneResult:
    """What :func:`tune` leaves: the best and last policies and their evaluations."""

    best_state: dict[str, torch.Tensor]  # the GPT's state dict at best_step (on CPU)
    best_step: int  # 0: no update beat the starting policy on gold score
    start: PolicyEval  # the starting (pretrained) policy, step 0
    best: PolicyEval
    last: PolicyEval
    steps: int
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list, repr=False)


def _cpu_state(gpt: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in gpt.state_dict().items()}


def _snapshot_module(policy: PolicyWithValue) -> nn.Module:
    """The policy's parameters (not copies) under the names that
    ``checkpoint.save_training_state`` handles: the GPT as ``body``, whose tied
    ``body.lm_head.weight`` it leaves out (safetensors refuses shared storage) and loading
    re-ties, beside the value head."""
    return nn.ModuleDict({"body": policy.gpt, "value_head": policy.value_head})


class Tuner:
    """One run of :func:`tune`, resumable when given a checkpoint folder ``state_dir``.

    The constructor builds the run and, with a ``state_dir``, resumes from its snapshot
    when that is an unfinished snapshot of this very run (same ``fingerprint``: the caller
    hashes the params and inputs the run depends on). Otherwise it says why, if there was
    a snapshot, and empties the folder: another run's best weights must never be mixed
    with this one's. ``resumed_from`` is the step resumed from, or None; ``step`` the
    number of updates done.

    The frozen reference is copied from ``gpt`` before any snapshot is loaded into it:
    the KL is always to the starting policy, whatever step the run resumes from.
    """

    def __init__(
        self, gpt: GPT, rlhf: RlhfParams, scorer: Scorer, gold: GoldScorer,
        train_prompts: torch.Tensor, eval_prompts: torch.Tensor,
        pairs: Sequence[EncodedPair] = (), state_dir: str | Path | None = None,
        fingerprint: str = "",
    ) -> None:
        if rlhf.algo == "dpo" and not pairs:
            raise GptpipeError("rlhf: rlhf.algo = 'dpo' needs preference pairs; none were given")
        self.gpt, self.rlhf, self.scorer, self.gold = gpt, rlhf, scorer, gold
        self.train_prompts, self.eval_prompts, self.pairs = train_prompts, eval_prompts, pairs
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.fingerprint = fingerprint
        device = gpt.lm_head.weight.device
        self.reference = frozen_copy(gpt)
        self.policy = PolicyWithValue(gpt).to(device).eval()  # eval: no dropout (module doc)
        self.optimizer = make_optimizer(self.policy, rlhf, device)
        self.controller = kl_controller(rlhf)
        self.config = SamplingConfig(temperature=rlhf.temperature,
                                     max_new_tokens=rlhf.max_new_tokens)
        self.sample_generator = torch.Generator(device).manual_seed(rlhf.seed + _SAMPLE_SEED)
        self.shuffle_generator = torch.Generator().manual_seed(rlhf.seed + _SHUFFLE_SEED)
        source = len(pairs) if rlhf.algo == "dpo" else train_prompts.shape[0]
        self.batches = BatchCycle(source, rlhf.batch_size, self.shuffle_generator)
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.start: PolicyEval | None = None  # None until the step-0 evaluation
        self.best: PolicyEval | None = None
        self.last: PolicyEval | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.resumed_from: int | None = None
        self._best_on_disk: int | None = None  # the step whose weights BEST_DIR holds
        self._log: Callable[[int, dict[str, float]], None] | None = None
        self._interrupted = False
        if self.state_dir is not None:
            self._maybe_resume()

    # ------------------------------------------------------------------------ resume

    def _resume_problem(self, info: Any) -> str | None:
        """Why the snapshot described by ``info`` cannot be resumed, or None."""
        if not isinstance(info, dict):
            return "the checkpoint folder holds an unreadable snapshot"
        if info.get("fingerprint") != self.fingerprint:
            return ("the checkpoint folder holds a snapshot of a different run (other rlhf or "
                    "gold params, another device, or changed inputs)")
        step, best_step = int(info.get("step", 0)), int(info.get("best_step", 0))
        if 0 < best_step < step and self._best_dir_step() != best_step:
            return (f"the best weights the snapshot needs (step {best_step}) are not in "
                    f"{self.state_dir / BEST_DIR}")
        return None

    def _best_dir_step(self) -> int | None:
        """The step whose weights the best folder holds, when they are from this run."""
        path = self.state_dir / BEST_DIR / "config.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            return None
        step = meta.get("rlhf_step")
        return step if isinstance(step, int) else None

    def _maybe_resume(self) -> None:
        snapshot = self.state_dir / SNAPSHOT_DIR
        try:
            info = read_training_info(snapshot)
            reason = None if info is None else self._resume_problem(info)
        except GptpipeError:  # a damaged state.json: nothing to resume
            info, reason = None, "the checkpoint folder holds an unreadable snapshot"
        if info is None or reason:
            if reason:
                print(f"rlhf: {reason}: starting afresh", flush=True)
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            return
        best_step = int(info["best_step"])
        best = None
        if 0 < best_step < int(info["step"]):
            # Loaded first: building a GPT draws from the global generator, restored below.
            best, _ = load_model(self.state_dir / BEST_DIR)
            self._best_on_disk = best_step
        rng, info = load_training_state(snapshot, _snapshot_module(self.policy), self.optimizer)
        self.sample_generator.set_state(rng["sample"])
        self.shuffle_generator.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])
        self.batches.pending = [int(index) for index in info["pending"]]
        self.controller.value = float(info["kl_coef"])
        self.step = int(info["step"])
        self.start, self.best, self.last = (PolicyEval.from_json(info[key])
                                            for key in ("start", "best", "last"))
        self.best_step = best_step
        source = self.reference if best_step == 0 else best if best is not None else self.gpt
        self.best_state = _cpu_state(source)
        self.history = [(int(step), {name: float(value) for name, value in metrics.items()})
                        for step, metrics in info["history"]]
        self.resumed_from = self.step
        if self.step >= self.rlhf.steps:  # killed after the last snapshot: no step left
            print(f"rlhf: the checkpoint folder holds this run, finished at step {self.step}: "
                  "writing its outputs", flush=True)
        else:
            print(f"rlhf: resuming from step {self.step} of {self.rlhf.steps}", flush=True)

    def save_state(self) -> None:
        """Snapshot the run at this step boundary, atomically (``state_dir``/snapshot).

        The best weights need a folder of their own only when the snapshot cannot stand for
        them: step 0's are the reference's (the starting policy), and a snapshot taken at
        the best step holds them as its policy. So the best folder is written just before
        the first snapshot after the best step, never after it (a kill in between would
        leave a snapshot naming weights that are nowhere), and it is replaced only while
        the snapshot on disk is the one taken at the new best step (every evaluation, and
        so every new best, is snapshotted), which does not need the folder.
        """
        if 0 < self.best_step < self.step and self._best_on_disk != self.best_step:
            with torch.random.fork_rng(devices=[]):  # GPT() draws its initial weights
                best = GPT(self.gpt.config)
            best.load_state_dict(self.best_state)
            save_model(self.state_dir / BEST_DIR, best, best.config,
                       {"rlhf_step": self.best_step, "fingerprint": self.fingerprint})
            self._best_on_disk = self.best_step
        rng = {"sample": self.sample_generator.get_state(),
               "shuffle": self.shuffle_generator.get_state(), "torch": torch.get_rng_state()}
        info = {
            "step": self.step,
            "steps": self.rlhf.steps,
            "fingerprint": self.fingerprint,
            "kl_coef": self.controller.value,
            "pending": self.batches.pending,
            "best_step": self.best_step,
            "start": self.start.to_json(),
            "best": self.best.to_json(),
            "last": self.last.to_json(),
            "history": [[step, metrics] for step, metrics in self.history],
        }
        save_training_state(self.state_dir / SNAPSHOT_DIR, _snapshot_module(self.policy),
                            self.optimizer, rng, info)

    # -------------------------------------------------------------------------- loop

    def run(self, log: Callable[[int, dict[str, float]], None] | None = None,
            progress: Callable[[int], None] | None = None) -> TuneResult:
        """Tune to ``rlhf.steps`` updates from where the run stands (see :func:`tune`).

        With a checkpoint folder, Ctrl-C (SIGINT) does not interrupt an update half-way:
        the step in hand finishes, a snapshot is saved and a one-line GptpipeError says
        where (as in pretraining). A second Ctrl-C aborts at once.
        """
        self._log, self._interrupted = log, False
        if self.state_dir is None or threading.current_thread() is not threading.main_thread():
            return self._loop(progress)

        def request_stop(signum, frame) -> None:
            self._interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            return self._loop(progress)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, metrics))
        if self._log is not None:
            self._log(step, metrics)

    def _evaluate(self, step: int) -> PolicyEval:
        rlhf = self.rlhf
        result = evaluate_policy(self.gpt, self.reference, self.eval_prompts, self.config,
                                 rlhf.seed + _EVAL_SEED, self.scorer, self.gold,
                                 rlhf.batch_size)
        self._record(step, {f"eval/{k}": v for k, v in result.stats().items()})
        check_kl(result.kl, rlhf.kl_ceiling, f"on the evaluation samples at step {step}")
        return result

    def _update(self, step: int) -> dict[str, float]:
        rlhf = self.rlhf
        rows = next(self.batches)
        if rlhf.algo == "dpo":
            return dpo_update(self.policy, self.reference, self.optimizer,
                              [self.pairs[i] for i in rows], rlhf, step)
        rollout = collect_rollout(self.policy, self.reference, self.train_prompts[rows],
                                  self.config, self.sample_generator, self.scorer,
                                  self.controller.coef)
        if rlhf.algo == "ppo":
            update = ppo_update(self.policy, self.optimizer, rollout, rlhf,
                                self.shuffle_generator, step)
        else:
            update = reinforce_update(self.policy, self.optimizer, rollout, rlhf, step)
        # The rollout's entropy (of the policy that sampled) over the update's mean.
        metrics = {**update, **rollout.stats()}
        self.controller.update(metrics["kl"], 1)
        return metrics

    def _loop(self, progress: Callable[[int], None] | None) -> TuneResult:
        rlhf = self.rlhf
        if self.start is None:
            self.start = self.best = self.last = self._evaluate(0)
            self.best_step, self.best_state = 0, _cpu_state(self.gpt)
        while self.step < rlhf.steps:
            step = self.step + 1
            metrics = self._update(step)
            self.step = step
            self._record(step, metrics)
            evaluated = step % rlhf.eval_every == 0 or step == rlhf.steps
            if evaluated:
                self.last = self._evaluate(step)
                if self.last.gold_score > self.best.gold_score:
                    self.best, self.best_step = self.last, step
                    self.best_state = _cpu_state(self.gpt)
            if progress is not None:
                progress(step)
            if self.state_dir is not None and (evaluated or self._interrupted):
                self.save_state()
                if self._interrupted and step < rlhf.steps:
                    # Ctrl-C: the step in hand finished and was snapshotted; stop here.
                    raise GptpipeError(
                        f"rlhf: interrupted at step {step}; a checkpoint was saved in "
                        f"{self.state_dir}; run dvc repro again to resume"
                    )
        return TuneResult(self.best_state, self.best_step, self.start, self.best, self.last,
                          rlhf.steps, self.history)


def tune(
    gpt: GPT, rlhf: RlhfParams, scorer: Scorer, gold: GoldScorer, train_prompts: torch.Tensor,
    eval_prompts: torch.Tensor, pairs: Sequence[EncodedPair] = (),
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    state_dir: str | Path | None = None, fingerprint: str = "",
) -> TuneResult:
    """Tune ``gpt`` in place with ``rlhf.algo`` for ``rlhf.steps`` updates.

    - ppo / reinforce: each step samples a rollout on ``rlhf.batch_size`` of the
      (P, T0) ``train_prompts`` (shuffled passes), then updates.
    - dpo: each step is one update on ``rlhf.batch_size`` of ``pairs``.

    Evaluates (:func:`evaluate_policy` on ``eval_prompts``) before the first update, every
    ``rlhf.eval_every`` updates and after the last, and keeps the weights with the best
    gold score: the gold judge stands in for the humans whose preferences the reward
    model only approximates, so selecting by reward-model score would reward exploiting
    its errors. The starting policy competes too (best_step 0: nothing beat it).

    ``log(step, metrics)`` receives each update's statistics (rollout: rm_score, kl,
    entropy, kl_coef; PPO: policy_loss, value_loss, clip_fraction, approx_kl; DPO:
    dpo_loss, reward_accuracy, ...) and, at evaluations, ``eval/rm_score``,
    ``eval/gold_score``, ``eval/kl`` and ``eval/entropy``.

    ``state_dir``: a checkpoint folder, snapshotted at every evaluation and resumed from
    when it holds an unfinished snapshot with this ``fingerprint`` (:class:`Tuner`).
    """
    return Tuner(gpt, rlhf, scorer, gold, train_prompts, eval_prompts, pairs, state_dir,
                 fingerprint).run(log, progress)
