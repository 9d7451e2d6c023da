"""RLHF maths against numbers worked out by hand on tiny tensors (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.alignment.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_loss,
    masked_mean,
    masked_whiten,
    pairwise_accuracy,
    per_token_kl,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    response_loss,
    rloo_baseline,
    sequence_logprobs,
    shaped_rewards,
    tempered_logits,
)

NAN, INF = math.nan, math.inf
# Two rows: three real tokens, then two real tokens and one padding position.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _close(actual: torch.Tensor | float, expected, atol: float = 1e-6) -> bool:
    actual = torch.as_tensor(actual, dtype=torch.float32)
    return torch.allclose(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol)


# ------------------------------------------------------------------------------ masking


def test_masked_mean_ignores_padding_even_nan_and_inf():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, NAN]])
    # (1 + 2 + 3 + 4 + 6) / 5 = 16 / 5
    assert _close(masked_mean(x, MASK), 3.2)
    assert _close(masked_mean(x, MASK.bool()), 3.2)  # bool masks mean the same
    # Per row: (1 + 2 + 3) / 3 = 2; (4 + 6) / 2 = 5
    assert _close(masked_mean(x, MASK, dim=1), [2.0, 5.0])
    # Per column: (1 + 4) / 2, (2 + 6) / 2, 3 / 1
    assert _close(masked_mean(x, MASK, dim=0), [2.5, 4.0, 3.0])
    x[1, 2] = INF
    assert _close(masked_mean(x, MASK), 3.2)


def test_masked_mean_of_nothing_is_zero():
    assert masked_mean(torch.tensor([[5.0]]), torch.tensor([[0.0]])).item() == 0.0


def test_masked_whiten_gives_zero_mean_unit_variance_over_real_elements():
    x = torch.tensor([[1.0, 3.0, 5.0], [7.0, 9.0, 1000.0]])
    # Real: 1 3 5 7 9, mean 5, population variance (16 + 4 + 0 + 4 + 16) / 5 = 8
    expected = torch.tensor([[-4.0, -2.0, 0.0], [2.0, 4.0, 0.0]]) / math.sqrt(8)
    whitened = masked_whiten(x, MASK)
    assert _close(whitened, expected, atol=1e-5)
    assert _close(masked_mean(whitened, MASK), 0.0, atol=1e-6)
    assert _close(masked_mean(whitened**2, MASK), 1.0, atol=1e-5)


def test_masked_whiten_of_a_constant_is_zero():
    assert torch.equal(masked_whiten(torch.full((2, 3), 4.0), MASK), torch.zeros(2, 3))


# ------------------------------------------------------------------------- reward model


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert _close(bradley_terry_loss(chosen, rejected), expected)
    # A huge margin stays finite: -log sigmoid(-1000) = 1000.
    assert _close(bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0])), 1000.0)


def test_pairwise_accuracy_counts_ties_half():
    chosen = torch.tensor([2.0, 1.0, 0.5, 0.0])
    rejected = torch.tensor([1.0, 1.0, 1.0, -3.0])
    # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
    assert pairwise_accuracy(chosen, rejected) == 0.625
    assert isinstance(pairwise_accuracy(chosen, rejected), float)


# ---------------------------------------------------------------------------------- KL


def test_per_token_kl_k1_and_k3_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    # k1 = logp - ref
    assert _close(per_token_kl(logprobs, ref, "k1"), [[1.0, -1.0, 0.0]])
    # k3 with d = ref - logp = -1, 1, 0: e^-1 - 1 + 1 = 0.367879; e - 1 - 1 = 0.718282; 0
    expected_k3 = [[math.exp(-1.0), math.e - 2.0, 0.0]]
    assert _close(per_token_kl(logprobs, ref, "k3"), expected_k3)
    with pytest.raises(ValueError, match="estimator"):
        per_token_kl(logprobs, ref, "k2")


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 16, generator=generator) * 5
    ref = -torch.rand(64, 16, generator=generator) * 5
    assert (per_token_kl(logprobs, ref, "k1") < 0).any()  # k1 can be, per token
    assert (per_token_kl(logprobs, ref, "k3") >= 0).all()


def test_shaped_rewards_kl_penalty_everywhere_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 99.0]])
    ref = torch.tensor([[-2.0, -1.0, -3.0], [-1.5, -0.5, NAN]])
    score = torch.tensor([10.0, 20.0])
    rewards, kl = shaped_rewards(score, logprobs, ref, MASK, kl_coef=0.1)
    # kl = logp - ref: row 0: 1, 0, 2; row 1: 0.5, -0.5, padding 0
    assert _close(kl, [[1.0, 0.0, 2.0], [0.5, -0.5, 0.0]])
    # rewards = -0.1 * kl, + score at the last real token (row 0: t=2, row 1: t=1)
    # row 0: -0.1, 0, -0.2 + 10 = 9.8; row 1: -0.05, 0.05 + 20 = 20.05, padding 0
    assert _close(rewards, [[-0.1, 0.0, 9.8], [-0.05, 20.05, 0.0]])


def test_shaped_rewards_with_a_hole_in_the_mask_and_an_empty_row():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    zeros = torch.zeros(2, 3)
    rewards, _ = shaped_rewards(torch.tensor([3.0, 4.0]), zeros, zeros, mask, kl_coef=1.0)
    # No KL; row 0's score lands on t=1, its last real token; row 1 has nowhere to put one.
    assert _close(rewards, [[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])


def test_shaped_rewards_k3():
    logprobs, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    rewards, kl = shaped_rewards(torch.tensor([1.0]), logprobs, ref, torch.ones(1, 1), 0.5, "k3")
    # k3 = e^-1 - 1 + 1 = 0.367879; reward = 1 - 0.5 * 0.367879 = 0.816060
    assert _close(kl, [[math.exp(-1.0)]])
    assert _close(rewards, [[1.0 - 0.5 * math.exp(-1.0)]])


# --------------------------------------------------------------------------------- GAE


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 777.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 3.0, 888.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    # Reward-to-go: row 0: 6, 5, 3; row 1: 9, 5 (padding ignored, never added)
    assert _close(returns, [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])
    # minus the values: 6 - 0.5, 5 - 1, 3 - 1.5; 9 - 2, 5 - 3
    assert _close(advantages, [[5.5, 4.0, 1.5], [7.0, 2.0, 0.0]])


def test_gae_by_hand_with_discounting():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 0.5]])
    mask = torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: delta = 2 + 0.9 * 0 - 0.5 = 1.5; A = 1.5
    # t=1: delta = 0 + 0.9 * 0.5 - 1 = -0.55; A = -0.55 + 0.45 * 1.5 = 0.125
    # t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4; A = 1.4 + 0.45 * 0.125 = 1.45625
    assert _close(advantages, [[1.45625, 0.125, 1.5]])
    # returns = A + V: 1.95625, 1.125, 2.0
    assert _close(returns, [[1.95625, 1.125, 2.0]])


def test_gae_skips_padding_inside_a_row():
    # A hole at t=1 is skipped: t=0 bootstraps from t=2 as if t=1 were not there.
    rewards = torch.tensor([[1.0, 50.0, 2.0]])
    values = torch.tensor([[0.5, 60.0, 1.0]])
    mask = torch.tensor([[True, False, True]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # t=2: A = 2 - 1 = 1; t=0: delta = 1 + 0.5 * 1 - 0.5 = 1; A = 1 + 0.5 * 1 = 1.5
    assert _close(advantages, [[1.5, 0.0, 1.0]])
    assert _close(returns, [[2.0, 0.0, 2.0]])


def test_gae_outputs_are_detached():
    values = torch.zeros(1, 2, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 2), values, torch.ones(1, 2), 1.0, 1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------------- PPO


def _policy_loss_of_one_token(ratio: float, advantage: float, clip_range: float = 0.2):
    logprob = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, clip_fraction, approx_kl = ppo_policy_loss(
        logprob, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), clip_range
    )
    loss.backward()
    return loss.item(), clip_fraction.item(), approx_kl.item(), logprob.grad.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped"),
    [
        # Inside [0.8, 1.2]: loss = -A * ratio, gradient flows.
        (1.1, 2.0, -2.2, False),
        # A > 0, ratio 1.5 above 1.2: max(-3, -2.4) = -2.4, the clipped term, no gradient.
        (1.5, 2.0, -2.4, True),
        # A > 0, ratio 0.5 below 0.8: max(-1, -1.6) = -1, unclipped: the policy may still
        # raise a ratio it had pushed down.
        (0.5, 2.0, -1.0, False),
        # A < 0, ratio 0.5 below 0.8: max(1, 1.6) = 1.6, clipped, no gradient.
        (0.5, -2.0, 1.6, True),
        # A < 0, ratio 1.5 above 1.2: max(3, 2.4) = 3, unclipped (pessimistic bound).
        (1.5, -2.0, 3.0, False),
    ],
)
def test_ppo_policy_clip_behaviour(ratio, advantage, loss, clipped):
    actual_loss, clip_fraction, approx_kl, grad = _policy_loss_of_one_token(ratio, advantage)
    assert actual_loss == pytest.approx(loss, abs=1e-6)
    assert clip_fraction == (1.0 if clipped else 0.0)
    if clipped:
        assert grad == 0.0
    else:
        # d(-A * ratio)/d logprob = -A * ratio
        assert grad == pytest.approx(-advantage * ratio, abs=1e-6)
    # approx_kl = (ratio - 1) - log ratio
    assert approx_kl == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-6)


def test_ppo_policy_loss_masks_and_averages():
    logprobs = torch.tensor([[0.0, math.log(1.5), 0.0], [0.0, 0.0, 50.0]])
    old = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, 2.0, -1.0], [3.0, -3.0, NAN]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, old, advantages, MASK, 0.2)
    # Per real token: -1; max(-3, -2.4) = -2.4 (clipped); 1; -3; 3 -> sum -2.4, mean -0.48
    assert loss.item() == pytest.approx(-0.48, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(1 / 5)
    # approx_kl: only the 1.5 ratio is nonzero: (0.5 - log 1.5) / 5 = 0.018907
    assert approx_kl.item() == pytest.approx((0.5 - math.log(1.5)) / 5, abs=1e-6)


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, NAN]])
    old_values = torch.tensor([[0.0, 0.0, 0.0], [0.5, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 5.0]])
    loss = ppo_value_loss(values, old_values, returns, MASK, clip_range=0.2)
    # clipped = old + clip(v - old, -0.2, 0.2): 0.2, 0, 0.2; 0.5, 1.2
    # (v - R)^2:       0,    1,    4;    0.25, 0
    # (clipped - R)^2: 0.64, 1, 0.04;    0.25, 3.24
    # max:             0.64, 1,    4;    0.25, 3.24 -> sum 9.13, mean 1.826, * 0.5 = 0.913
    assert loss.item() == pytest.approx(0.913, abs=1e-6)


# ----------------------------------------------------------------------- entropy, logps


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [5.0, -INF, -INF, -INF]]])
    # uniform over 4: log 4; one token certain (the rest -inf): 0, not NaN
    entropy = entropy_from_logits(logits)
    assert _close(entropy, [[math.log(4.0), 0.0]])
    # p = (0.5, 0.25, 0.25): -(0.5 log 0.5 + 2 * 0.25 log 0.25) = 1.5 log 2
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log().unsqueeze(0)
    assert _close(entropy_from_logits(logits), [[1.5 * math.log(2.0)]])


def test_entropy_gradient_is_finite_with_filtered_logits():
    logits = torch.tensor([[[1.0, 2.0, -INF]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sequence_logprobs_picks_each_tokens_log_softmax_at_the_same_position():
    # Position 0: uniform over 4 -> log 1/4; position 1: probabilities 0.5, 0.25, 0.125,
    # 0.125 (logits are their logs) -> token 2 has log 0.125
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.125, 0.125]]])
    logits[0, 1] = logits[0, 1].log() + 7.0  # a constant shift does not change softmax
    tokens = torch.tensor([[3, 2]])
    assert _close(sequence_logprobs(logits, tokens), [[math.log(0.25), math.log(0.125)]])


def test_tempered_logits_are_the_logits_a_sampler_at_that_temperature_draws_from():
    # Logits (0, ln 4): at temperature 2 they are (0, ln 2), probabilities (1/3, 2/3); at
    # 0.5 (0, ln 16), probabilities (1/17, 16/17).
    logits = torch.tensor([[[0.0, math.log(4.0)]]])
    tokens = torch.tensor([[1]])
    assert _close(tempered_logits(logits, 2.0), [[[0.0, math.log(2.0)]]])
    assert _close(sequence_logprobs(tempered_logits(logits, 2.0), tokens), [[math.log(2 / 3)]])
    assert _close(sequence_logprobs(tempered_logits(logits, 0.5), tokens),
                  [[math.log(16 / 17)]])
    # Entropy at temperature 2: -(1/3 ln 1/3 + 2/3 ln 2/3)
    expected = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert _close(entropy_from_logits(tempered_logits(logits, 2.0)), [[expected]])
    # Temperature 1: the very tensor (the same bits as without tempering).
    assert tempered_logits(logits, 1.0) is logits
    for greedy_or_worse in (0.0, -1.0, NAN):
        with pytest.raises(ValueError, match="allowed: a number > 0"):
            tempered_logits(logits, greedy_or_worse)


# --------------------------------------------------------------------------------- DPO


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    logps = torch.tensor([-5.0, -7.0, -3.0])
    other = torch.tensor([-6.0, -2.0, -3.0])
    loss, accuracy, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert accuracy.item() == 0.5  # every pair ties
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_loss_by_hand():
    policy_chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    policy_rejected = torch.tensor([-8.0, -3.0])
    ref_chosen = torch.tensor([-5.0, -5.0])
    ref_rejected = torch.tensor([-6.0, -4.0])
    loss, accuracy, chosen, rejected = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5
    )
    # chosen rewards 0.5 * (1, -1) = (0.5, -0.5); rejected 0.5 * (-2, 1) = (-1, 0.5)
    assert _close(chosen, [0.5, -0.5]) and _close(rejected, [-1.0, 0.5])
    # margins 1.5 and -1: loss = (log(1 + e^-1.5) + log(1 + e^1)) / 2
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == 0.5  # first pair right, second wrong
    loss.backward()  # the gradient reaches the policy's log-probabilities
    assert policy_chosen.grad is not None and not chosen.requires_grad


# --------------------------------------------------------------------------- REINFORCE


def test_reinforce_loss_by_hand_and_padding_ignored():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, NAN]], requires_grad=True)
    returns = torch.tensor([2.0, -1.0])
    # Sequence log-probs: -6 and -1. Baseline 0.5: advantages 1.5 and -1.5.
    # loss = -mean(1.5 * -6, -1.5 * -1) = -mean(-9, 1.5) = 3.75
    loss = reinforce_loss(logprobs, MASK, returns, baseline=0.5)
    assert loss.item() == pytest.approx(3.75)
    loss.backward()
    # d loss / d logprob = -advantage / B: -0.75 on row 0, 0.75 on row 1, 0 at padding
    assert _close(logprobs.grad, [[-0.75, -0.75, -0.75], [0.75, 0.75, 0.0]])
    # A per-row baseline (B,), with gradient: the advantage is detached.
    baseline = torch.tensor([1.0, -1.0], requires_grad=True)
    loss = reinforce_loss(logprobs.detach(), MASK, returns, baseline)
    # advantages 1 and 0: loss = -mean(-6, 0) = 3
    assert loss.item() == pytest.approx(3.0)
    assert not loss.requires_grad


# ------------------------------------------------------------------------ KL controllers


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    # KL 9 > target: error = 9 / 6 - 1 = 0.5, clipped to 0.2; coef *= 1 + 0.2 * 10 / 100
    assert controller.update(9.0, n_steps=10) == pytest.approx(0.102)
    assert controller.value == controller.coef == pytest.approx(0.102)
    # KL 4.5 < target: error = 4.5 / 6 - 1 = -0.25 -> -0.2; coef *= 1 - 0.2 * 50 / 100
    controller.update(4.5, n_steps=50)
    assert controller.value == pytest.approx(0.102 * 0.9)
    # A small error is not clipped: 6.6 / 6 - 1 = 0.1; coef *= 1 + 0.1 * 100 / 100
    controller.update(6.6, n_steps=100)
    assert controller.value == pytest.approx(0.102 * 0.9 * 1.1)


def test_adaptive_kl_controller_moves_up_when_kl_is_above_target():
    controller = AdaptiveKLController(0.05, target=1.0, horizon=10)
    previous = controller.value
    for _ in range(5):
        assert controller.update(3.0, n_steps=1) > previous
        previous = controller.value
    assert AdaptiveKLController(0.05, 1.0, 10).update(0.5, 1) < 0.05
    assert AdaptiveKLController(0.05, 1.0, 10).update(1.0, 1) == 0.05


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.2)
    assert controller.update(100.0, n_steps=10) == 0.2
    assert controller.value == controller.coef == 0.2


# ------------------------------------------------------------------------- RLOO, GRPO


def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # two prompts, 3 samples each
    # Group 1 sums to 6: (6 - 1) / 2 = 2.5, (6 - 2) / 2 = 2, (6 - 3) / 2 = 1.5; group 2: 60.
    assert _close(rloo_baseline(returns, 3), [2.5, 2.0, 1.5, 25.0, 20.0, 15.0])
    # The advantages r - baseline of a group of two are +-(r1 - r2).
    pair = torch.tensor([4.0, 1.0])
    assert _close(pair - rloo_baseline(pair, 2), [3.0, -3.0])
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_baseline(returns, 4)


def test_grpo_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # Group 1: mean 2, sample std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1: (-1, 0, 1) / (1 + 1e-4).
    # Group 2: all equal: std 0, every advantage 0.
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]
    assert _close(grpo_advantages(rewards, 3), expected)
    with pytest.raises(ValueError, match="groups of 1"):
        grpo_advantages(rewards, 1)


def test_grpo_loss_at_the_rollout_policy_is_minus_the_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the second row has no token: left out
    loss, clip_fraction, kl = grpo_loss(logp, logp, logp, torch.tensor([2.0, 7.0]), mask,
                                        clip_range=0.2, kl_coef=0.1)
    # ratio 1, kl 0: each token -(1 * 2), the row's mean -2, the only row: -2.
    assert _close(loss, -2.0) and _close(clip_fraction, 0.0) and _close(kl, 0.0)


def test_grpo_loss_kl_term_is_k3_to_the_reference():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, _, kl = grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1),
                            clip_range=0.2, kl_coef=0.1)
    # d = ref - logp = ln 0.5; k3 = e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147.
    assert _close(kl, 0.193147) and _close(loss, 0.1 * 0.193147)


@pytest.mark.parametrize(("advantage", "expected_loss", "clipped"), [
    (1.0, -1.2, 1.0),  # ratio 1.5 > 1.2 with A > 0: the clipped surrogate, 1.2
    (-1.0, 1.5, 0.0),  # with A < 0 the smaller surrogate is the unclipped -1.5
])
def test_grpo_loss_clips_the_ratio(advantage, expected_loss, clipped):
    old = torch.log(torch.tensor([[0.2]]))
    new = torch.log(torch.tensor([[0.3]]))  # ratio 1.5
    loss, clip_fraction, _ = grpo_loss(new, old, new, torch.tensor([advantage]),
                                       torch.ones(1, 1), clip_range=0.2, kl_coef=0.0)
    assert _close(loss, expected_loss, atol=1e-5) and _close(clip_fraction, clipped)


def test_grpo_loss_gradient_flows_only_through_the_policy():
    logp = torch.log(torch.tensor([[0.5, 0.4]])).requires_grad_()
    old = logp.detach().clone()
    loss, _, _ = grpo_loss(logp, old, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.1)
    loss.backward()
    # d(loss)/d(logp_t) at ratio 1 with kl 0 (k3's gradient is 0 there): -A / tokens.
    assert _close(logp.grad, [[-0.5, -0.5]])


# -------------------------------------------------------------------------------- SFT


def test_sft_loss_counts_response_tokens_only():
    logits = torch.zeros(1, 4, 5)  # uniform over 5 tokens: ln 5 nats at every position
    logits[0, 3, 2] = 10.0  # the last position is sure of token 2
    targets = torch.tensor([[1, 1, 4, 2]])
    response = torch.tensor([[False, False, True, True]])
    expected = (math.log(5) + F.cross_entropy(logits[0, 3:], torch.tensor([2])).item()) / 2
    assert _close(response_loss(logits, targets, response), expected)
    # A prompt position's target does not matter, whatever it is.
    changed = targets.clone()
    changed[0, 0] = 3
    assert response_loss(logits, changed, response) == response_loss(logits, targets, response)
    # A response position's target does.
    changed[0, 3] = 0
    assert response_loss(logits, changed, response) > response_loss(logits, targets, response)
