"""Judging a policy: fresh samples on held-out prompts, scored by the reward model and
the gold judge, with the exact KL to the reference; and head-to-head win rates.

The KL and the entropy are those of the distributions the samples come from: the policy's
and the reference's next-token distributions both at the sampling temperature
(:func:`pipeline.alignment.rollout.sampling_temperature`), as in training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.alignment.policy import completion_logits
from pipeline.alignment.rl_losses import entropy_from_logits, masked_mean, tempered_logits
from pipeline.alignment.rollout import (
    GoldScorer,
    Scorer,
    sampling_temperature,
    score_with_components,
    split_ids,
)
from pipeline.data.shards import TokenStream, windows
from pipeline.data.tokenizer import EOS_ID
from pipeline.lm.model import GPT
from pipeline.lm.sampling import SamplingConfig, sample_batch
from pipeline.lm.unit_scores import document_starts


class Judge(Protocol):
    """What :func:`win_rate` needs of ``pipeline.alignment.gold.GoldJudge``."""

    def score(self, prompt: str, completion: str) -> float: ...

    def prefer(self, prompt: str, a: str, b: str, rng: np.random.Generator) -> int: ...



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

    reward: float  # mean of what RL maximizes (rlhf.reward)
    rm_score: float  # mean reward-model score
    gold_score: float  # mean gold score
    kl: float  # mean KL to the reference, nats per sequence (exact per position)
    entropy: float  # mean per-token entropy
    completions: list[list[int]] = field(repr=False)  # ids, cut before <eos>
    # name -> each completion's score by that reward of a weighted list (else empty)
    components: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def stats(self) -> dict[str, float]:
        """The means, each component's as ``rewards/<name>`` (not ``reward/<name>``: the
        tuner logs these under ``eval/``, where ``eval/reward`` is the sum's own plot)."""
        return {"reward": self.reward, "rm_score": self.rm_score,
                "gold_score": self.gold_score, "kl": self.kl, "entropy": self.entropy,
                **{f"rewards/{name}": float(np.mean(values))
                   for name, values in self.components.items()}}

    def to_json(self) -> dict[str, Any]:
        """A snapshot's copy (JSON keeps a float's every bit: it writes repr); a single
        reward's has no components key, as before weighted lists existed."""
        raw = asdict(self)
        if not self.components:
            del raw["components"]
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PolicyEval:
        components = {str(name): [float(v) for v in values]
                      for name, values in raw.get("components", {}).items()}
        return cls(float(raw["reward"]), float(raw["rm_score"]), float(raw["gold_score"]),
                   float(raw["kl"]), float(raw["entropy"]),
                   [[int(t) for t in ids] for ids in raw["completions"]], components)


def component_metrics(start: PolicyEval, best: PolicyEval) -> dict[str, float | None]:
    """Each reward of a weighted list, for metrics/rlhf.json: its mean over the
    evaluation prompts for the starting policy (``reward_<name>_before``) and the best
    one (``reward_<name>_after``), each with its standard error (``..._se``; None for
    fewer than two prompts). Empty for a single reward."""
    metrics: dict[str, float | None] = {}
    for name in best.components:
        for when, evaluation in (("before", start), ("after", best)):
            mean, error = mean_and_se(evaluation.components[name])
            metrics[f"reward_{name}_{when}"] = round(mean, 6)
            metrics[f"reward_{name}_{when}_se"] = None if error is None else round(error, 6)
    return metrics


def mean_and_se(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean of independent ``values`` and its standard error (sample standard
    deviation over sqrt(n); None for fewer than two values, which show no spread)."""
    array = np.asarray(values, dtype=np.float64)
    error = float(np.std(array, ddof=1) / math.sqrt(len(array))) if len(array) > 1 else None
    return float(np.mean(array)), error


@dataclass
class PromptScores:
    """One model's fresh sample of each evaluation prompt, scored, prompt by prompt."""

    reward: np.ndarray  # (E,) float64: what RL maximizes (rlhf.reward)
    rm_score: np.ndarray  # (E,) the reward model's score
    gold_score: np.ndarray  # (E,) the gold judge's
    kl: np.ndarray  # (E,) KL to the reference, nats per sequence (exact per position)
    entropy: float  # mean per-token entropy over every sampled token
    completions: list[list[int]] = field(repr=False)  # ids, cut before <eos>
    # name -> each completion's score by that reward of a weighted list (else empty)
    components: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def summary(self) -> PolicyEval:
        """The means :class:`PolicyEval` keeps."""
        return PolicyEval(
            reward=float(np.mean(self.reward)), rm_score=float(np.mean(self.rm_score)),
            gold_score=float(np.mean(self.gold_score)), kl=float(np.mean(self.kl)),
            entropy=self.entropy, completions=self.completions, components=self.components,
        )


@torch.no_grad()
def evaluate_policy(
    gpt: GPT, reference: GPT, prompts: torch.Tensor, config: SamplingConfig, seed: int,
    scorer: Scorer, gold: GoldScorer, batch_size: int, rm_scorer: Scorer | None = None,
) -> PolicyEval:
    """The means of :func:`score_prompts` (the same arguments)."""
    return score_prompts(gpt, reference, prompts, config, seed, scorer, gold, batch_size,
                         rm_scorer).summary()


@torch.no_grad()
def score_prompts(
    gpt: GPT, reference: GPT, prompts: torch.Tensor, config: SamplingConfig, seed: int,
    scorer: Scorer, gold: GoldScorer, batch_size: int, rm_scorer: Scorer | None = None,
) -> PromptScores:
    """Sample one completion per (P, T0) prompt and score each.

    Sampling uses ``config`` (the rollout temperature, not greedy: what the policy is
    trained to produce; the KL and entropy are at that temperature too) from a generator
    seeded with ``seed`` afresh on every call, so two evaluations of one policy give the
    same samples and evaluations of different policies are compared on the same random
    draws. ``batch_size`` prompts at a time
    (part of what fixes the draws: the generator serves a batch's rows together).
    Returns, per prompt, the score of ``scorer`` (what RL maximizes), of ``rm_scorer``
    (the reward model; None: the scorer is the reward model), the gold score and the KL
    to ``reference`` (:func:`sequence_kl`); the mean entropy, the completions and, for a
    weighted list of rewards, each component's per-completion scores.
    """
    temperature = sampling_temperature(config)
    device = gpt.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    rewards, rm_scores, gold_scores, kls, entropies, counts = [], [], [], [], [], []
    completions: list[list[int]] = []
    components: dict[str, list[float]] = {}
    for first in range(0, prompts.shape[0], batch_size):
        chunk = prompts[first : first + batch_size].to(device)  # (b, T0)
        new_tokens, mask = sample_batch(gpt, chunk, config, generator)  # (b, N)
        logits = tempered_logits(completion_logits(gpt, chunk, new_tokens),
                                 temperature)  # (b, N, V)
        entropies.append(float(masked_mean(entropy_from_logits(logits), mask)) *
                         float(mask.sum()))
        counts.append(float(mask.sum()))
        ref_logits = tempered_logits(completion_logits(reference, chunk, new_tokens),
                                     temperature)
        kls += sequence_kl(logits, ref_logits, mask).tolist()
        del logits, ref_logits
        prompt_ids, completion_ids = split_ids(chunk, new_tokens, mask)
        total, parts = score_with_components(scorer, prompt_ids, completion_ids)
        scores = total.float().tolist()
        rewards += scores
        for name, values in parts.items():
            components.setdefault(name, []).extend(values.float().tolist())
        rm_scores += scores if rm_scorer is None else torch.as_tensor(
            rm_scorer(prompt_ids, completion_ids)).float().tolist()
        gold_scores += [float(gold(p, c)) for p, c in zip(prompt_ids, completion_ids,
                                                          strict=True)]
        completions += completion_ids
    return PromptScores(
        reward=np.array(rewards, np.float64), rm_score=np.array(rm_scores, np.float64),
        gold_score=np.array(gold_scores, np.float64), kl=np.array(kls, np.float64),
        entropy=sum(entropies) / max(sum(counts), 1.0), completions=completions,
        components=components,
    )


def win_rate(judge: Judge, prompts: Sequence[str], completions_a: Sequence[str],
             completions_b: Sequence[str], rng: np.random.Generator) -> float:
    """The fraction of prompts where ``judge`` prefers completion a over completion b
    (the mean of :func:`win_outcomes`; 0.5 without a prompt)."""
    if not prompts:
        return 0.5
    outcomes = win_outcomes(judge, prompts, completions_a, completions_b, rng)
    return sum(outcomes) / len(prompts)


def win_outcomes(judge: Judge, prompts: Sequence[str], completions_a: Sequence[str],
                 completions_b: Sequence[str], rng: np.random.Generator) -> list[float]:
    """Per prompt, 1.0 when ``judge`` prefers completion a over completion b, else 0.0.

    A tie (the same text, or equal gold scores) is 0.5 and draws nothing; otherwise
    ``judge.prefer`` decides, with ``rng`` (so its Bradley-Terry noise, if any, applies).
    """
    outcomes = []
    for prompt, a, b in zip(prompts, completions_a, completions_b, strict=True):
        if a == b or judge.score(prompt, a) == judge.score(prompt, b):
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 - judge.prefer(prompt, a, b, rng))
    return outcomes


def opening_prompts(tokens: TokenStream, length: int, count: int) -> torch.Tensor:
    """(F, 1 + length) int64: ``<bos>`` and the first ``length`` ids of the first
    ``count`` documents of a token stream (``<bos> ids <eos>`` each) that have that many,
    each distinct opening once: prompts that need no preference pair, for a final
    evaluation larger than the held-out pairs allow."""
    starts = document_starts(tokens)
    starts = starts[starts + length + 1 <= len(tokens)]
    found: dict[tuple[int, ...], None] = {}
    for first in range(0, len(starts), 1024):
        rows = windows(tokens, starts[first : first + 1024], length + 1).astype(np.int64)
        for row in rows.tolist():
            if EOS_ID not in row[1:]:  # the document holds length tokens
                found.setdefault(tuple(row), None)
                if len(found) == count:
                    return torch.tensor(list(found), dtype=torch.long)
    return torch.tensor(list(found), dtype=torch.long).reshape(len(found), length + 1)
