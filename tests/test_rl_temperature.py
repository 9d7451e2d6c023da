"""RL at a temperature other than 1: every quantity is that of the distribution the
completions were sampled from, softmax(logits / T), for the policy and the reference.

Each expected value is recomputed here from the model's own logits and
``sampling.filter_logits`` (what ``sample_batch`` draws with), so the tests hold on any
machine: they compare two computations of one float, never a float with a constant.
"""

from __future__ import annotations

import pytest
import torch
from test_rlhf import CPU, rlhf_params, tiny_gpt, toy_gold, toy_prompts, toy_scorer

from pipeline.alignment.policy import PolicyWithValue, frozen_copy, make_optimizer
from pipeline.alignment.policy_eval import evaluate_policy
from pipeline.alignment.rollout import collect_rollout
from pipeline.alignment.updates import grpo_update, ppo_update, reinforce_update
from pipeline.core.errors import GptpipeError
from pipeline.lm.model import GPT
from pipeline.lm.sampling import SamplingConfig, filter_logits, sample_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPERATURE = 0.7


def _sampler_log_probs(gpt: GPT, prompts: torch.Tensor, completions: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """(B, N, V) the log-probabilities sample_batch drew each completion token from: the
    model's logits over prompt + completion through filter_logits at ``temperature``."""
    tokens = torch.cat((prompts, completions), dim=1)[:, :-1]
    with torch.no_grad():
        logits, _ = gpt(tokens)
    logits = logits[:, prompts.shape[1] - 1 :]  # (B, N, V): those that predict completions
    rows = [filter_logits(logits[:, i], temperature) for i in range(logits.shape[1])]
    return torch.stack(rows, dim=1).log_softmax(dim=-1)


def _reference(seed: int = 9) -> GPT:
    """A frozen reference that is not the policy (so the KL is not 0)."""
    return frozen_copy(tiny_gpt(seed=seed))


def _rollout(policy: PolicyWithValue, reference: GPT, temperature: float):
    config = SamplingConfig(temperature=temperature, max_new_tokens=8)
    return collect_rollout(policy, reference, toy_prompts(16, 1), config,
                           torch.Generator().manual_seed(0), toy_scorer, kl_coef=0.05)


def test_the_ratio_is_exactly_one_at_the_rollout_policy_at_temperature_0_7():
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    rollout = _rollout(policy, _reference(), TEMPERATURE)
    sampled_from = _sampler_log_probs(gpt, rollout.prompts, rollout.completions, TEMPERATURE)
    behaviour = sampled_from.gather(-1, rollout.completions.unsqueeze(-1)).squeeze(-1)
    # The rollout's log-probabilities are those of the distribution the tokens were drawn
    # from: the ratio new / behaviour policy is 1 on every real token.
    ratio = torch.exp(rollout.logprobs - behaviour)[rollout.mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # Not the untempered ones (what the rollout held before), which are far off.
    untempered = _sampler_log_probs(gpt, rollout.prompts, rollout.completions, 1.0)
    untempered = untempered.gather(-1, rollout.completions.unsqueeze(-1)).squeeze(-1)
    assert (rollout.logprobs - untempered)[rollout.mask].abs().max() > 0.1
    # Each update recomputes them at the same temperature: in step before any change.
    assert rollout.temperature == TEMPERATURE
    params = rlhf_params(temperature=TEMPERATURE)
    stats = ppo_update(policy, make_optimizer(policy, params, CPU), rollout, params,
                       torch.Generator().manual_seed(0), 1)
    assert stats["ratio_error"] < 1e-5


@pytest.mark.parametrize("algo", ["reinforce", "grpo"])
def test_reinforce_and_grpo_score_at_the_sampling_temperature(algo):
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    rollout = _rollout(policy, _reference(), TEMPERATURE)
    params = rlhf_params(algo=algo, temperature=TEMPERATURE, samples_per_prompt=2)
    optimizer = make_optimizer(policy, params, CPU)
    if algo == "grpo":
        stats = grpo_update(policy, optimizer, rollout, params,
                            torch.Generator().manual_seed(0), 1)
    else:
        stats = reinforce_update(policy, optimizer, rollout, params, 1)
    assert stats["ratio_error"] < 1e-5


def test_the_kl_and_entropy_of_a_rollout_are_those_of_the_tempered_distributions():
    gpt, reference = tiny_gpt(), _reference()
    policy = PolicyWithValue(gpt).eval()
    rollout = _rollout(policy, reference, TEMPERATURE)
    policy_logp = _sampler_log_probs(gpt, rollout.prompts, rollout.completions, TEMPERATURE)
    reference_logp = _sampler_log_probs(reference, rollout.prompts, rollout.completions,
                                        TEMPERATURE)
    tokens = rollout.completions.unsqueeze(-1)
    expected_kl = (policy_logp.gather(-1, tokens) - reference_logp.gather(-1, tokens))
    expected_kl = expected_kl.squeeze(-1).masked_fill(~rollout.mask, 0.0)  # (B, N) k1
    torch.testing.assert_close(rollout.kl, expected_kl, atol=1e-5, rtol=0)
    entropy = -(policy_logp.exp() * policy_logp).sum(-1)[rollout.mask].mean()
    assert rollout.entropy == pytest.approx(float(entropy), abs=1e-5)


def test_evaluation_kl_is_the_exact_kl_between_the_tempered_distributions():
    gpt, reference = tiny_gpt(), _reference()
    prompts = toy_prompts(6, 4)
    config = SamplingConfig(temperature=0.5, max_new_tokens=8)
    result = evaluate_policy(gpt, reference, prompts, config, 3, toy_scorer, toy_gold, 6)
    # The same draws again, by hand: every completion, its mask, both distributions.
    completions, mask = sample_batch(gpt, prompts, config, torch.Generator().manual_seed(3))
    policy_logp = _sampler_log_probs(gpt, prompts, completions, 0.5)  # (B, N, V)
    reference_logp = _sampler_log_probs(reference, prompts, completions, 0.5)
    per_token = (policy_logp.exp() * (policy_logp - reference_logp)).sum(-1)  # (B, N)
    expected = per_token.masked_fill(~mask, 0.0).sum(dim=1).mean()
    assert result.kl == pytest.approx(float(expected), abs=1e-5)
    entropy = -(policy_logp.exp() * policy_logp).sum(-1)[mask].mean()
    assert result.entropy == pytest.approx(float(entropy), abs=1e-5)


@pytest.mark.parametrize("config", [SamplingConfig(top_k=5, max_new_tokens=8),
                                    SamplingConfig(top_p=0.9, max_new_tokens=8),
                                    SamplingConfig(temperature=0.0, max_new_tokens=8)],
                         ids=["top_k", "top_p", "greedy"])
def test_a_sampler_rl_cannot_score_is_refused_in_one_line(config):
    gpt = tiny_gpt()
    with pytest.raises(GptpipeError, match="allowed for RL: a temperature > 0 with neither "
                                           "top_k nor top_p") as caught:
        collect_rollout(PolicyWithValue(gpt).eval(), frozen_copy(gpt), toy_prompts(4, 1),
                        config, torch.Generator().manual_seed(0), toy_scorer, kl_coef=0.05)
    assert "\n" not in str(caught.value)
    with pytest.raises(GptpipeError, match="allowed for RL"):
        evaluate_policy(gpt, frozen_copy(gpt), toy_prompts(4, 1), config, 0, toy_scorer,
                        toy_gold, 4)
