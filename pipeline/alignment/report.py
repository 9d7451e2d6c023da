"""What the rlhf stage reports of a finished run: metrics/rlhf.json, the per-prompt
table and its closing line.

Every score is the mean over fresh samples of the final evaluation's prompts, drawn with
the same seed for every model compared (``policy_eval``): the openings of the first
``rlhf.final_prompts`` test documents, prompts that never picked the best policy (the
periodic evaluations on ``rlhf.eval_prompts`` held-out prompts did, so the best one's
score there is biased upward); with ``rlhf.final_prompts: 0``, those held-out prompts.
Each figure carries its uncertainty over prompts: ``*_se`` is the standard error of the
mean of the per-prompt scores (of the per-prompt outcomes 1, 0.5, 0 for a win rate, so
ties count as what they are; 1.96 of them make the 95% half-width).

- ``gold_*``: the gold judge's score, the stand-in for human judgment; ``rm_*``: the
  reward model's; ``reward_*``: what RL maximizes (``rlhf.reward``; the reward model's
  score when that is the reward). ``*_pretrained`` is the pretrained model's,
  ``*_before`` the starting policy's (the SFT model), ``*_after`` the best policy's (by
  ``rlhf.select_by``, at ``best_step``; 0 when nothing beat the start). The gold score is
  the one to read: the policy is optimized against the reward, so the reward is the
  score that overstates progress.
- ``win_rate``: how often the gold judge prefers the best policy's completion over the
  pretrained model's on the same prompt and draw (ties count half);
  ``win_rate_vs_start``: the same against the starting policy's.
- ``kl_best``, ``kl_final``: the best and the last policy's KL to the reference (the
  starting policy), nats per sequence, exact per position at the sampling temperature.
- ``val_bpb_*``: bits per byte on the val split (every token, or ``evaluate.max_tokens``)
  of the pretrained, the starting and the best policy; ``val_bpb_change_pct`` is the
  best policy's change against the pretrained model's, in percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.alignment.policy_eval import Judge, PolicyEval, PromptScores, win_outcomes
from pipeline.alignment.preference_data import visible_text
from pipeline.alignment.tuner import TuneResult
from pipeline.core.item_scores import text_hash
from pipeline.core.params import RlhfParams
from pipeline.core.stats import Z95, mean_se
from pipeline.data.tokenizer import TextTokenizer


@dataclass(frozen=True)
class BitsPerByte:
    """Val bits per byte of the three models compared (and, when measured, their
    bootstrap standard errors over documents)."""

    pretrained: float
    before: float  # the starting policy
    after: float  # the best policy
    errors: tuple[float, float, float] | None = None  # the same order


@dataclass(frozen=True)
class WinRates:
    """How often the gold judge prefers the best policy's completion (and, per prompt,
    the outcomes 1, 0.5 or 0 these are the means of)."""

    over_pretrained: float
    over_start: float
    outcomes: tuple[list[float], list[float]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FinalEvaluation:
    """The pretrained, starting and best policies' per-prompt scores on the final
    evaluation's prompts, and the best policy's win rates over the other two."""

    prompts: list[str]
    pretrained: PromptScores
    start: PromptScores
    best: PromptScores
    wins: WinRates


def win_rates(judge: Judge, tokenizer: TextTokenizer, eval_prompts: torch.Tensor,
              result: TuneResult, pretrained: PolicyEval, seed: int) -> WinRates:
    """The best policy's win rates on the (E, 1 + K) evaluation prompts (<bos> first)
    over the pretrained model's and the starting policy's completions, each judged with
    a generator seeded with ``seed`` afresh (a noisy judge draws the same noise)."""
    prompts = prompt_texts(tokenizer, eval_prompts)
    texts = {name: [visible_text(tokenizer, ids) for ids in e.completions]
             for name, e in (("best", result.best), ("start", result.start),
                             ("pretrained", pretrained))}
    over_pretrained = win_outcomes(judge, prompts, texts["best"], texts["pretrained"],
                                   np.random.default_rng(seed))
    over_start = win_outcomes(judge, prompts, texts["best"], texts["start"],
                              np.random.default_rng(seed))
    if not prompts:
        return WinRates(0.5, 0.5, (over_pretrained, over_start))
    return WinRates(sum(over_pretrained) / len(prompts), sum(over_start) / len(prompts),
                    (over_pretrained, over_start))


def prompt_texts(tokenizer: TextTokenizer, prompts: torch.Tensor) -> list[str]:
    """The (E, 1 + K) prompts (<bos> first) as the judge reads them."""
    return [visible_text(tokenizer, row[1:]) for row in prompts.tolist()]


def with_final_scores(result: TuneResult, final: FinalEvaluation) -> TuneResult:
    """The run's result with the final evaluation's means as its start and best scores
    (the best step, the last policy and the history stay the run's own)."""
    return replace(result, start=final.start.summary(), best=final.best.summary())


def final_errors(final: FinalEvaluation, bpb: BitsPerByte) -> dict[str, float | None]:
    """The standard error of every mean metrics/rlhf.json reports (``*_se``)."""
    errors = {}
    for name, scores in (("pretrained", final.pretrained), ("before", final.start),
                         ("after", final.best)):
        errors[f"gold_{name}_se"] = mean_se(scores.gold_score)
        errors[f"rm_{name}_se"] = mean_se(scores.rm_score)
        if name != "pretrained":
            errors[f"reward_{name}_se"] = mean_se(scores.reward)
    over_pretrained, over_start = final.wins.outcomes
    errors["win_rate_se"] = mean_se(over_pretrained)
    errors["win_rate_vs_start_se"] = mean_se(over_start)
    errors["kl_best_se"] = mean_se(final.best.kl)
    if bpb.errors is not None:
        for name, error in zip(("pretrained", "before", "after"), bpb.errors, strict=True):
            errors[f"val_bpb_{name}_se"] = error
    return {key: None if value is None else round(value, 6) for key, value in errors.items()}


def prompt_table(final: FinalEvaluation) -> dict[str, list]:
    """The final evaluation, one row per prompt: its position and text hash, each
    model's gold, reward-model and reward scores and KL, and the best policy's
    outcomes (1, 0.5, 0) against the pretrained model and the starting policy."""
    columns: dict[str, list] = {"prompt": list(range(len(final.prompts))),
                                "prompt_sha256": [text_hash(p) for p in final.prompts]}
    for name, scores in (("pretrained", final.pretrained), ("start", final.start),
                         ("best", final.best)):
        columns[f"{name}_gold"] = scores.gold_score.tolist()
        columns[f"{name}_rm"] = scores.rm_score.tolist()
        columns[f"{name}_reward"] = scores.reward.tolist()
        columns[f"{name}_kl"] = scores.kl.tolist()
    columns["win"], columns["win_vs_start"] = (list(o) for o in final.wins.outcomes)
    return columns


def rlhf_metrics(rlhf: RlhfParams, result: TuneResult, pretrained: PolicyEval,
                 wins: WinRates, bpb: BitsPerByte,
                 errors: dict[str, float | None] | None = None) -> dict[str, Any]:
    """metrics/rlhf.json (see the module docstring), floats rounded to 6 decimals, with
    the standard errors ``errors`` (:func:`final_errors`) beside them when given."""
    return {**(errors or {}),
        "algo": rlhf.algo,
        "reward": rlhf.reward,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "gold_pretrained": round(pretrained.gold_score, 6),
        "gold_before": round(result.start.gold_score, 6),
        "gold_after": round(result.best.gold_score, 6),
        "rm_pretrained": round(pretrained.rm_score, 6),
        "rm_before": round(result.start.rm_score, 6),
        "rm_after": round(result.best.rm_score, 6),
        "reward_before": round(result.start.reward, 6),
        "reward_after": round(result.best.reward, 6),
        "win_rate": round(wins.over_pretrained, 6),
        "win_rate_vs_start": round(wins.over_start, 6),
        "kl_best": round(result.best.kl, 6),
        "kl_final": round(result.last.kl, 6),
        "val_bpb_pretrained": round(bpb.pretrained, 6),
        "val_bpb_before": round(bpb.before, 6),
        "val_bpb_after": round(bpb.after, 6),
        "val_bpb_change_pct": round(100 * (bpb.after - bpb.pretrained) / bpb.pretrained, 4),
    }


def summary_line(metrics: dict[str, Any]) -> str:
    """The stage's closing line from its metrics."""
    stopped = " (stopped early)" if metrics["stopped_early"] else ""
    return (f"best step {metrics['best_step']}{stopped}: gold {metrics['gold_pretrained']:.3f} "
            f"pretrained, {metrics['gold_before']:.3f} at the start -> "
            f"{metrics['gold_after']:.3f}; reward model {metrics['rm_before']:.3f} -> "
            f"{metrics['rm_after']:.3f}; win rate {metrics['win_rate']:.3f}"
            f"{_half_width(metrics.get('win_rate_se'))} over the "
            f"pretrained model; val {metrics['val_bpb_pretrained']:.4f} -> "
            f"{metrics['val_bpb_after']:.4f} bits/byte")


def _half_width(se: float | None) -> str:
    """`` +- h`` for a 95% half-width h, or nothing without a standard error."""
    return "" if se is None else f" +- {Z95 * se:.3f}"
