"""The mathematics of RLHF as pure functions on tensors: reward model, KL, GAE, PPO, DPO,
REINFORCE, RLOO, GRPO and supervised fine-tuning's response-only loss.

Every function takes and returns plain tensors and holds no state (the two KL
controllers at the end are the exception: they are the state). Each is tested against
numbers worked out by hand in tests/test_rl_losses.py.

Shapes: B sequences, T completion positions, V vocabulary. ``mask`` is a float or bool
(B, T) tensor that is true (1) at real completion tokens and false (0) at padding; every
mean is over the masked elements only, and a padding position never changes a result,
even when it holds inf or NaN (values there are replaced before any arithmetic, since
``nan * 0`` is still NaN).

Conventions follow InstructGPT (Ouyang et al. 2022), PPO (Schulman et al. 2017), GAE
(Schulman et al. 2016), DPO (Rafailov et al. 2023), RLOO (Kool et al. 2019; Ahmadian et
al. 2024), GRPO (Shao et al. 2024, DeepSeekMath) and TRL's implementations of them; each
docstring says which.

Group algorithms (RLOO, GRPO) sample ``group_size`` completions of each prompt; their
rows are consecutive, so row ``b`` belongs to group ``b // group_size``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

# Added to a variance before its square root, so a constant input whitens to zeros.
_WHITEN_EPS = 1e-8


# ------------------------------------------------------------------------------ masking


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with padding positions set to 0 (not multiplied: inf * 0 is NaN)."""
    return torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is true.

    sum(x * mask) / sum(mask), over all elements (``dim=None``: a scalar) or along ``dim``
    (that dimension removed). A slice with no real element has mean 0, not NaN (0 / 1),
    so an all-padding row cannot poison a batch statistic.
    """
    bool_mask = _as_bool(mask)
    total = _zero_padding(x, bool_mask)
    count = bool_mask.to(total.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8), mean and var over the masked elements of the batch.

    Used on PPO advantages (TRL ``masked_whiten``). The variance is the population one
    (divide by the count, not count - 1), so the masked result has exactly zero mean and
    unit variance. Padding positions come back as 0.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    return _zero_padding((x - mean) * torch.rsqrt(variance + _WHITEN_EPS), mask)


# ------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss on pairs: mean(-log sigmoid(chosen - rejected)), a scalar.

    Scores are (B,). Under the Bradley-Terry model P(chosen preferred) =
    sigmoid(r_chosen - r_rejected); this is its negative log-likelihood (InstructGPT
    eq. 1, with one pair per prompt). ``logsigmoid`` keeps large margins finite.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of (B,) pairs where chosen scores above rejected; a tie counts half.

    Counting ties as half makes a constant scorer (an untrained model, say) read 0.5,
    chance level, rather than 0.
    """
    wins = (chosen_scores > rejected_scores).float()
    ties = (chosen_scores == rejected_scores).float()
    return float((wins + 0.5 * ties).mean())


# ---------------------------------------------------------------------------------- KL


def per_token_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: Literal["k1", "k3"] = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, (B, T).

    ``logprobs`` and ``ref_logprobs`` are (B, T) log-probabilities of the tokens the
    policy sampled, under the policy and the reference. With d = ref - logp
    (Schulman, "Approximating KL divergence", 2020):

    - k1 = logp - ref = -d: unbiased, but a single token can be negative. What
      InstructGPT and TRL's PPO put in the per-token reward.
    - k3 = exp(d) - 1 - d: also unbiased (E[exp(d)] = 1 under the policy) and never
      negative (exp(d) >= 1 + d), with lower variance when the policies are close.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator = {estimator!r}; allowed: 'k1' or 'k3'")


def shaped_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: Literal["k1", "k3"] = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The InstructGPT per-token reward and the per-token KL it was built from.

    rewards[b, t] = -kl_coef * kl[b, t] at every real completion token, plus score[b]
    at the last real token of row b (InstructGPT eq. 2; TRL's ``compute_rewards``).
    ``score`` is (B,) (the reward model's output), log-probabilities and mask (B, T).
    Returns (rewards, kl), both (B, T) and 0 at padding. A row with no real token gets
    no score (there is no token to put it on).

    The result is a reward, a constant for the policy update: pass log-probabilities
    computed without gradient (rollout time).
    """
    bool_mask = _as_bool(mask)
    kl = _zero_padding(per_token_kl(logprobs, ref_logprobs, estimator), bool_mask)
    rewards = -kl_coef * kl
    # The last real position of each row: the highest index where the mask is true
    # (-1 when none), which also works when the mask is not a prefix.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(bool_mask)
    last = torch.where(bool_mask, positions, -1).max(dim=1).values  # (B,)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards = rewards.index_put(
        (rows, last[has_tokens]), score[has_tokens].to(rewards.dtype), accumulate=True
    )
    return rewards, kl


# --------------------------------------------------------------------------------- GAE


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), going backwards in time.

    For real positions t, with t' the next real position after t:
        delta_t = r_t + gamma * V_t' - V_t          (V after the last real token = 0)
        A_t     = delta_t + gamma * lam * A_t'      (A after the last real token = 0)
        returns_t = A_t + V_t                       (the value head's regression target)
    ``rewards``, ``values`` and ``mask`` are (B, T); returns (advantages, returns), both
    (B, T), 0 at padding. Padding positions are skipped, not treated as steps, so their
    rewards and values never matter. With gamma = lam = 1, A_t is the reward-to-go
    minus V_t. Both outputs are detached: they are constants in the PPO losses.
    """
    bool_mask = _as_bool(mask)
    rewards, values = rewards.detach(), values.detach()
    zeros = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zeros, zeros  # (B,): what follows the last real token
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        real = bool_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, advantage, zeros)
        # A padding position passes on what came after it unchanged.
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = _zero_padding(advantages + values, bool_mask)
    return advantages, returns


# --------------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimize.

    ratio = exp(logprobs - old_logprobs), all (B, T);
    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))).
    The max of the negated terms is the min of the surrogate: the policy gains nothing by
    moving the ratio past 1 + clip_range when A > 0, or below 1 - clip_range when A < 0.

    Returns (loss, clip_fraction, approx_kl); the last two are detached scalars:
    - clip_fraction: the fraction of real tokens where the clipped term was the larger
      loss, i.e. where the gradient was cut off (TRL's ``pg_clipfrac``).
    - approx_kl: masked mean of (ratio - 1) - log(ratio), Schulman's k3 estimator of
      KL(old || new) on tokens sampled from the old policy: unbiased and never negative.
    """
    bool_mask = _as_bool(mask)
    log_ratio = _zero_padding(logprobs - old_logprobs, bool_mask)
    advantages = _zero_padding(advantages, bool_mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), bool_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), bool_mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, bool_mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """PPO's clipped value loss (the OpenAI baselines / TRL form), a scalar.

    clipped = old_values + clip(values - old_values, -clip_range, clip_range);
    loss = 0.5 * masked_mean(max((values - returns)^2, (clipped - returns)^2)).
    All inputs (B, T). Taking the max makes the clip pessimistic: a value estimate that
    moved more than clip_range from the rollout's gets no credit for being closer.
    """
    bool_mask = _as_bool(mask)
    values = _zero_padding(values, bool_mask)
    old_values = _zero_padding(old_values, bool_mask)
    returns = _zero_padding(returns, bool_mask)
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    squared_error = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(squared_error, bool_mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits), (B, T, V) -> (B, T), in nats, computed in float32.

    H = -sum_v p_v log p_v. Tokens with p = 0 (logit -inf after filtering) contribute 0,
    not NaN (0 * -inf), in the value and in the gradient.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    finite_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * finite_log_probs).sum(dim=-1)


# --------------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimization (Rafailov et al. 2023, eq. 7).

    Inputs are (B,) sums of the completion's token log-probabilities under the policy
    and the frozen reference. The implicit rewards are r = beta * (policy - reference);
    loss = mean(-log sigmoid(r_chosen - r_rejected)): the Bradley-Terry loss on the
    implicit rewards. At initialization (policy == reference) every margin is 0 and the
    loss is log 2.

    Returns (loss, reward_accuracy, chosen_rewards, rejected_rewards): loss a scalar with
    gradient; reward_accuracy a detached scalar tensor, the fraction of pairs with
    r_chosen > r_rejected, ties counting half (as :func:`pairwise_accuracy`, so it reads
    0.5 at initialization); the rewards detached (B,) tensors (TRL's
    ``rewards/chosen`` and ``rewards/rejected``).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    wins = (chosen_rewards > rejected_rewards).float()
    ties = (chosen_rewards == rejected_rewards).float()
    reward_accuracy = (wins + 0.5 * ties).mean()
    return loss, reward_accuracy, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------- REINFORCE


def reinforce_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    returns: torch.Tensor,
    baseline: torch.Tensor | float,
) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992), sequence-level, a scalar.

    loss = -mean_b[(returns_b - baseline_b) * sum_t mask_bt * logprobs_bt], with
    ``logprobs`` and ``mask`` (B, T), ``returns`` (B,) and ``baseline`` (B,) or a float
    (a batch mean, say). The advantage is detached: the gradient flows only through the
    log-probabilities, so a learned baseline cannot lower the loss by itself.
    """
    advantage = (returns - baseline).detach()  # (B,)
    sequence_logprob = _zero_padding(logprobs, mask).sum(dim=1)  # (B,)
    return -(advantage * sequence_logprob).mean()


# ----------------------------------------------------------------- group baselines


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // group_size, group_size), refusing a B that groups do not divide."""
    if group_size < 2 or values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} rows do not form groups of {group_size} (>= 2)")
    return values.reshape(-1, group_size)


def rloo_baseline(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) each return's RLOO baseline: the mean of the other returns of its group.

    baseline_i = (sum_group - r_i) / (k - 1) for a group of k samples of one prompt
    (Ahmadian et al. 2024): unbiased like REINFORCE's batch leave-one-out, but compared
    with answers to the same prompt, so a prompt's difficulty cancels out.
    """
    groups = _groups(returns, group_size)  # (G, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return baseline.reshape(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(B,) GRPO's group-normalised advantages: (r_i - mean_group) / (std_group + eps).

    The standard deviation is the sample one (divide by k - 1), as TRL's GRPO computes
    it. A group whose rewards are all equal teaches nothing: its advantages are 0.
    """
    groups = _groups(rewards.float(), group_size)  # (G, k)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's objective (Shao et al. 2024, eq. 3) as a loss to minimize.

    Per real token: ratio = exp(logprobs - old_logprobs); surrogate =
    min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range) * A) with A the row's
    advantage ((B,), broadcast over its tokens); kl = k3(policy || reference) =
    exp(ref - logp) - (ref - logp) - 1. The token's loss is -(surrogate - kl_coef * kl);
    each row's loss is the mean over its real tokens, and the loss the mean over rows
    with at least one. Unlike PPO the KL is a loss term, not part of the reward, and
    there is no value head: the group is the baseline.

    Returns (loss, clip_fraction, kl): kl the detached mean of the rows' mean token KL.
    """
    bool_mask = _as_bool(mask)
    log_ratio = _zero_padding(logprobs - old_logprobs, bool_mask)
    ratio = torch.exp(log_ratio)
    advantage = advantages.detach()[:, None].to(ratio.dtype)  # (B, 1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantage
    surrogate = torch.minimum(unclipped, clipped)
    kl = _zero_padding(per_token_kl(logprobs, ref_logprobs, "k3"), bool_mask)
    per_token = -(surrogate - kl_coef * kl)
    rows = bool_mask.any(dim=1)
    row_loss = masked_mean(per_token, bool_mask, dim=1)  # (B,)
    loss = row_loss[rows].mean() if rows.any() else per_token.sum() * 0.0
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).float(), bool_mask)
        row_kl = masked_mean(kl, bool_mask, dim=1)
        mean_kl = row_kl[rows].mean() if rows.any() else row_kl.sum() * 0.0
    return loss, clip_fraction, mean_kl


# -------------------------------------------------------------------------------- SFT


def response_loss(logits: torch.Tensor, targets: torch.Tensor,
                  response_mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning's loss: mean cross-entropy over response tokens only.

    ``logits`` (B, T, V) predict ``targets`` (B, T); ``response_mask`` (B, T) is true
    where the target is a response token (or its closing ``<eos>``), false on the prompt
    and padding, whose targets then never matter: the model learns to answer, not to
    write prompts. The mean is over all response tokens of the batch.
    """
    nats = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                           reduction="none").view(targets.shape)  # (B, T)
    return masked_mean(nats, response_mask)


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the distribution a sampler at ``temperature`` draws from: (..., V)
    logits / temperature in float32, as ``sampling.filter_logits`` scales them.

    RL scores a sample under the distribution it came from: a rollout drawn at
    temperature T has the log-probabilities, entropy and KL of softmax(logits / T), and
    its PPO ratio is 1 at the rollout policy only when both sides are tempered alike. At
    temperature 1 the logits come back as they are (the same tensor, the same bits).
    """
    if not temperature > 0:  # NaN too
        raise ValueError(f"temperature = {temperature}; allowed: a number > 0 (greedy "
                         "decoding has no distribution to score)")
    if temperature == 1.0:
        return logits
    return logits.float() / temperature


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[b, t, tokens[b, t]], (B, T, V) and (B, T) -> (B, T), float32.

    Alignment: ``logits[:, t]`` is the distribution that ``tokens[:, t]`` is scored
    against; no shift is done here. For a causal LM run on ``ids`` (B, L), whose output
    at position i predicts ids[:, i + 1], pass ``logits[:, :-1]`` and ``ids[:, 1:]``;
    the completion's part is then the last N columns for an N-token completion.

    Computed as logit - logsumexp(logits), which avoids materializing a second (B, T, V)
    tensor of log-probabilities.
    """
    logits = logits.float()
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return chosen - torch.logsumexp(logits, dim=-1)


# ------------------------------------------------------------------------ KL controllers


class AdaptiveKLController:
    """The KL coefficient that steers the policy's KL toward a target (Ziegler et al. 2019).

    After each batch: error = clip(current_kl / target - 1, -0.2, 0.2) and
    value *= 1 + error * n_steps / horizon. Too much KL raises the penalty, too little
    lowers it; the clip bounds how fast it can move (at most 20% per ``horizon`` steps).
    ``current_kl`` is in the units of ``target`` (nats per sequence, as TRL uses).
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target = {target}, horizon = {horizon}; both must be > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    @property
    def coef(self) -> float:
        """The current coefficient (an alias of ``value``, the name TRL uses)."""
        return self.value

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust the coefficient after ``n_steps`` steps at ``current_kl``; return it."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A KL coefficient that never changes; the same interface as the adaptive one."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    @property
    def coef(self) -> float:
        return self.value

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
