"""Policy updates: one PPO, REINFORCE or DPO step each, with the health checks.

The maths is in :mod:`pipeline.alignment.rl_losses` (pure functions); here it meets the
model. Log-probabilities and entropies are those of the distribution the rollout was
sampled from (``rollout.temperature``, see :mod:`pipeline.alignment.rollout`); DPO
samples nothing and scores the policy itself.

Health checks, each a one-line ``GptpipeError`` naming the update:

- before the first optimizer step of an update the importance ratio must be 1 on every
  real token (|ratio - 1| < :data:`RATIO_TOLERANCE`): otherwise the rollout was not made
  by this policy (a stale copy, a different mode, a mismatched alignment), and every
  PPO statistic is wrong;
- a NaN or infinite loss stops the run at that update, and so does a NaN or infinite
  gradient (a finite loss can still overflow on its way back), before the optimizer
  step, so no weight ever takes it;
- the policy's KL to the reference, in nats per sequence, must stay at or below
  ``rlhf.kl_ceiling`` (checked on every rollout; DPO has no rollouts, so its KL is
  checked at every evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.alignment.gradients import finite_gradient_norm
from pipeline.alignment.inputs import EncodedPair
from pipeline.alignment.policy import PolicyWithValue, completion_logits
from pipeline.alignment.rl_losses import (
    dpo_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_loss,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    rloo_baseline,
    sequence_logprobs,
    tempered_logits,
)
from pipeline.alignment.rollout import Rollout
from pipeline.core.errors import GptpipeError
from pipeline.core.params import RlhfParams
from pipeline.data.tokenizer import PAD_ID
from pipeline.lm.model import GPT

# |ratio - 1| allowed before any optimizer step: float32 noise between the rollout's
# whole-batch forward pass and a minibatch's is ~1e-6.
RATIO_TOLERANCE = 1e-4



def check_kl(kl_per_sequence: float, ceiling: float, where: str) -> None:
    """Stop when the mean KL to the reference (nats per sequence) exceeds ``ceiling``."""
    if not kl_per_sequence <= ceiling:  # NaN fails too
        raise GptpipeError(
            f"rlhf: the policy's KL to the reference is {kl_per_sequence:.3f} nats per "
            f"sequence {where}, above rlhf.kl_ceiling = {ceiling:g}; the policy has drifted "
            "too far from the pretrained model (reward hacking or a too large step); "
            "lower rlhf.lr, raise rlhf.kl_coef, or raise rlhf.kl_ceiling"
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
            f"step the importance ratio is off 1 by {worst:.3g} (tolerance "
            f"{RATIO_TOLERANCE:g}); the rollout was not sampled and scored by this policy"
        )
    return worst


def check_finite(loss: torch.Tensor, what: str, update: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise GptpipeError(
            f"rlhf: the {what} loss is {value} at update {update}; stopped before writing "
            "any model; lower rlhf.lr or set rlhf.grad_clip > 0"
        )
    return value


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, policy: PolicyWithValue,
          grad_clip: float, what: str, update: int) -> None:
    """Backward, clip, check and step. The GPT and the value head are clipped separately:
    their gradients are independent (the head reads detached features), and the value
    loss's scale (reward units) must not shrink the policy's step through a joint norm.
    A gradient norm that is not finite stops the run before the optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for part, module in (("policy", policy.gpt), ("value head", policy.value_head)):
        finite_gradient_norm(module, grad_clip,
                             f"rlhf: at update {update} the {what} loss's gradient in the {part}",
                             "rlhf.lr")
    optimizer.step()



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
            logits = tempered_logits(logits, rollout.temperature)
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
            _step(optimizer, loss, policy, rlhf.grad_clip, "PPO", update)
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

    Each completion's return is its reward minus kl_coef times its summed KL to the
    reference. The baseline: REINFORCE's :func:`leave_one_out_baseline` over the whole
    batch (one sample per prompt); RLOO's ``rl_losses.rloo_baseline`` over the other
    ``rlhf.samples_per_prompt`` samples of the same prompt. The loss is
    ``rl_losses.reinforce_loss``. Returns policy_loss, the mean return and the ratio
    check's worst deviation.
    """
    check_kl(float(rollout.kl_per_sequence.mean()), rlhf.kl_ceiling, f"at update {update}")
    returns = rollout.returns  # (B,)
    if rlhf.algo == "rloo":
        baseline = rloo_baseline(returns, rlhf.samples_per_prompt)
    else:
        baseline = leave_one_out_baseline(returns)
    logits = tempered_logits(completion_logits(policy.gpt, rollout.prompts,
                                               rollout.completions),
                             rollout.temperature)  # (B, N, V)
    logprobs = sequence_logprobs(logits, rollout.completions)  # (B, N)
    ratio_error = check_in_step(logprobs, rollout.logprobs, rollout.mask, update)
    loss = reinforce_loss(logprobs, rollout.mask, returns, baseline)
    what = "RLOO" if rlhf.algo == "rloo" else "REINFORCE"
    check_finite(loss, what, update)
    _step(optimizer, loss, policy, rlhf.grad_clip, what, update)
    return {"policy_loss": float(loss.detach()), "return": float(returns.mean()),
            "ratio_error": ratio_error}


def grpo_update(
    policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout,
    rlhf: RlhfParams, generator: torch.Generator, update: int,
) -> dict[str, float]:
    """GRPO on one rollout of ``rlhf.samples_per_prompt`` samples per prompt.

    Advantages are the raw rewards normalised within each prompt's group
    (``rl_losses.grpo_advantages``; the KL is a loss term, not part of the reward); then
    ``rlhf.ppo_epochs`` passes over shuffled minibatches of ``rlhf.minibatch_size``
    completions minimize ``rl_losses.grpo_loss`` with the clipped ratio and
    kl_coef * k3 KL to the reference. No value head. Returns the means over minibatches
    of policy_loss, clip_fraction and kl_term, the advantages' spread and the ratio
    check's worst deviation.
    """
    check_kl(float(rollout.kl_per_sequence.mean()), rlhf.kl_ceiling, f"at update {update}")
    advantages = grpo_advantages(rollout.scores, rlhf.samples_per_prompt)  # (B,)
    size = rollout.prompts.shape[0]
    totals = dict.fromkeys(("policy_loss", "clip_fraction", "kl_term"), 0.0)
    ratio_error, minibatches = None, 0
    for _ in range(rlhf.ppo_epochs):
        order = torch.randperm(size, generator=generator).to(rollout.prompts.device)
        for first in range(0, size, rlhf.minibatch_size):
            rows = order[first : first + rlhf.minibatch_size]
            logits = tempered_logits(completion_logits(policy.gpt, rollout.prompts[rows],
                                                       rollout.completions[rows]),
                                     rollout.temperature)  # (b, N, V)
            logprobs = sequence_logprobs(logits, rollout.completions[rows])  # (b, N)
            mask = rollout.mask[rows]
            if ratio_error is None:
                ratio_error = check_in_step(logprobs, rollout.logprobs[rows], mask, update)
            loss, clip_fraction, kl = grpo_loss(
                logprobs, rollout.logprobs[rows], rollout.ref_logprobs[rows],
                advantages[rows], mask, rlhf.clip_range, rollout.kl_coef)
            check_finite(loss, "GRPO", update)
            _step(optimizer, loss, policy, rlhf.grad_clip, "GRPO", update)
            minibatches += 1
            for name, value in (("policy_loss", loss), ("clip_fraction", clip_fraction),
                                ("kl_term", kl)):
                totals[name] += float(value.detach())
    stats = {name: total / minibatches for name, total in totals.items()}
    stats["advantage_std"] = float(advantages.std()) if size > 1 else 0.0
    stats["ratio_error"] = ratio_error
    return stats


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
    _step(optimizer, loss, policy, rlhf.grad_clip, "DPO", update)
    return {"dpo_loss": float(loss.detach()), "reward_accuracy": float(accuracy),
            "reward_margin": float((chosen - rejected).mean()),
            "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean())}
