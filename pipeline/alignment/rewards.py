"""What RL maximizes, chosen by ``rlhf.reward``: every reward is a :data:`Scorer`.

A scorer takes a batch of (prompt ids without ``<bos>``, completion ids cut before
``<eos>``) and returns a (B,) float tensor. The choices:

- ``model``: the learned reward model's score (``RewardModel.score_ids``);
- ``gold``: the gold judge's score of the decoded texts (no reward model in between:
  what the reward model only approximates);
- ``likelihood``: the frozen pretrained model's log-probability of the completion after
  its prompt, per token (``rlhf.likelihood_per_token``) or summed: the reward of the
  tutorial this project descends from. A completion with no token gets the
  log-probability of a uniform guess, log(1 / vocabulary size), so that saying nothing
  is never the best answer;
- ``python:<file.py>:<function>``: your function ``(prompt: str, completion: str) ->
  float`` of the decoded texts, loaded from the file (:func:`load_function`). It must
  return a finite number; anything else, or an exception, stops the run with one line.

Whatever RL maximizes, evaluation reports the gold score and the reward model's score
beside it (``pipeline.alignment.policy_eval``), so over-optimization stays visible.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.preference_data import visible_text
from pipeline.alignment.rl_losses import sequence_logprobs
from pipeline.core.errors import GptpipeError
from pipeline.data.tokenizer import BOS_ID, PAD_ID, TextTokenizer
from pipeline.lm.model import GPT

Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
TextReward = Callable[[str, str], float]

# Rows scored per forward pass of the likelihood model.
_LIKELIHOOD_BATCH = 64


def text_scorer(function: TextReward, tokenizer: TextTokenizer, name: str) -> Scorer:
    """A scorer that decodes each row and asks ``function(prompt, completion)``; ``name``
    (as the params spell it) names it in errors."""

    def score(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        values = []
        for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids,
                                                       strict=True)):
            prompt_text = visible_text(tokenizer, prompt)
            completion_text = visible_text(tokenizer, completion)
            try:
                value = function(prompt_text, completion_text)
            except Exception as err:  # the user's code: any exception is one line
                raise GptpipeError(
                    f"rlhf.reward = {name} raised {type(err).__name__} ({err}) on the "
                    f"completion {completion_text[:40]!r} (row {row}); no model was written"
                ) from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise GptpipeError(
                    f"rlhf.reward = {name} returned {value!r} for the completion "
                    f"{completion_text[:40]!r} (row {row}); allowed: a finite number"
                )
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float32)

    return score


def load_function(module_file: str, function: str, name: str) -> TextReward:
    """The function ``function`` of the Python file ``module_file`` (run once, as an
    import); every failure is one line naming the reward ``name``."""
    path = Path(module_file)
    if not path.is_file():
        raise GptpipeError(f"rlhf.reward = {name}: {module_file} not found")
    module_name = f"gptpipe_reward_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise GptpipeError(f"rlhf.reward = {name}: {module_file} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a syntax error, a failing import: the user's module
        sys.modules.pop(module_name, None)
        raise GptpipeError(f"rlhf.reward = {name}: importing {module_file} raised "
                           f"{type(err).__name__} ({err})") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise GptpipeError(f"rlhf.reward = {name}: {module_file} has no function "
                           f"{function!r}; allowed: a function (prompt, completion) -> float")
    return found


@torch.no_grad()
def completion_logprob(model: GPT, prompt_ids: Sequence[Sequence[int]],
                       completion_ids: Sequence[Sequence[int]],
                       per_token: bool) -> torch.Tensor:
    """(B,) each completion's log-probability after ``<bos>`` + its prompt under
    ``model``: the mean per token (``per_token``) or the sum. Rows longer than the
    context keep its last tokens. An empty completion scores log(1 / vocabulary)."""
    device = model.lm_head.weight.device
    context = model.config.context
    floor = -math.log(model.config.vocab_size)
    results: list[float] = []
    rows = list(zip(prompt_ids, completion_ids, strict=True))
    for first in range(0, len(rows), _LIKELIHOOD_BATCH):
        chunk = rows[first : first + _LIKELIHOOD_BATCH]
        sequences, starts = [], []
        for prompt, completion in chunk:
            sequence = [BOS_ID, *prompt, *completion][-context:]
            sequences.append(sequence)
            starts.append(len(sequence) - len(completion))
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
        scored = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
        for index, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
            ids[index, : len(sequence)] = torch.tensor(sequence)
            scored[index, max(start, 1) - 1 : len(sequence) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        logits, _ = model(ids[:, :-1])  # (b, L - 1, V); right padding never leaks back
        logprobs = sequence_logprobs(logits, ids[:, 1:])  # (b, L - 1)
        totals = torch.where(scored, logprobs, torch.zeros_like(logprobs)).sum(dim=1)
        counts = scored.sum(dim=1)
        for total, count in zip(totals.tolist(), counts.tolist(), strict=True):
            if count == 0:
                results.append(floor)
            else:
                results.append(total / count if per_token else total)
    return torch.tensor(results, dtype=torch.float32)


def make_scorer(reward: str, python_function: TextReward | None, *,
                reward_model_scorer: Scorer, judge: GoldJudge, tokenizer: TextTokenizer,
                pretrained: GPT, likelihood_per_token: bool) -> Scorer:
    """The scorer ``rlhf.reward`` names (see the module docstring); a ``python:`` reward's
    function comes loaded (:func:`load_function`, once: its module runs once)."""
    if reward == "model":
        return reward_model_scorer
    if reward == "gold":
        return text_scorer(judge.score, tokenizer, reward)
    if reward == "likelihood":
        def likelihood(prompt_ids: list[list[int]],
                       completion_ids: list[list[int]]) -> torch.Tensor:
            return completion_logprob(pretrained, prompt_ids, completion_ids,
                                      likelihood_per_token)
        return likelihood
    if python_function is None:
        raise ValueError(f"unknown reward {reward!r}")
    return text_scorer(python_function, tokenizer, reward)
