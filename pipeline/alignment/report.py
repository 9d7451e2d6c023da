"""What the rlhf stage reports of a finished run: metrics/rlhf.json and its closing line.

Every score is the mean over fresh samples of the first ``rlhf.eval_prompts`` held-out
prompts, drawn with the same seed for every model compared (``policy_eval``):

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.alignment.policy_eval import Judge, PolicyEval, win_rate
from pipeline.alignment.preference_data import visible_text
from pipeline.alignment.tuner import TuneResult
from pipeline.core.params import RlhfParams
from pipeline.data.tokenizer import TextTokenizer


@dataclass(frozen=True)
class BitsPerByte:
    """Val bits per byte of the three models compared."""

    pretrained: float
    before: float  # the starting policy
    after: float  # the best policy


@dataclass(frozen=True)
class WinRates:
    """How often the gold judge prefers the best policy's completion."""

    over_pretrained: float
    over_start: float


def win_rates(judge: Judge, tokenizer: TextTokenizer, eval_prompts: torch.Tensor,
              result: TuneResult, pretrained: PolicyEval, seed: int) -> WinRates:
    """The best policy's win rates on the (E, 1 + K) evaluation prompts (<bos> first)
    over the pretrained model's and the starting policy's completions, each judged with
    a generator seeded with ``seed`` afresh (a noisy judge draws the same noise)."""
    prompts = [visible_text(tokenizer, row[1:]) for row in eval_prompts.tolist()]
    texts = {name: [visible_text(tokenizer, ids) for ids in e.completions]
             for name, e in (("best", result.best), ("start", result.start),
                             ("pretrained", pretrained))}
    return WinRates(
        win_rate(judge, prompts, texts["best"], texts["pretrained"], np.random.default_rng(seed)),
        win_rate(judge, prompts, texts["best"], texts["start"], np.random.default_rng(seed)),
    )


def rlhf_metrics(rlhf: RlhfParams, result: TuneResult, pretrained: PolicyEval,
                 wins: WinRates, bpb: BitsPerByte) -> dict[str, Any]:
    """metrics/rlhf.json (see the module docstring), floats rounded to 6 decimals."""
    return {
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
            f"{metrics['rm_after']:.3f}; win rate {metrics['win_rate']:.3f} over the "
            f"pretrained model; val {metrics['val_bpb_pretrained']:.4f} -> "
            f"{metrics['val_bpb_after']:.4f} bits/byte")
