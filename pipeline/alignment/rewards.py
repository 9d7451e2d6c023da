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
- ``python:<file.py>:<function>``: your function of the decoded texts, loaded from the
  file (:func:`load_function`), in either of two forms, told apart by its parameters'
  names (:func:`is_batched`):

  - one sample, ``(prompt: str, completion: str) -> float``;
  - a batch, TRL's reward function, ``(prompts: list[str], completions: list[str],
    **kwargs) -> list[float]``: any function with a parameter named ``prompts``,
    ``completions`` or ``completion_ids`` (the names TRL passes, by name; TRL's own
    rewards, such as ``trl.rewards.get_repetition_penalty_reward(...)``, take only some
    of them). It is called with each of the three that it takes, or all three when it
    takes ``**kwargs``: the prompts' and completions' texts and the completions' token
    ids, so a function written for TRL's ``reward_funcs`` runs unchanged (on text: TRL's
    conversational message lists are not passed).

  It must return a finite number per completion (a batched one: a list of exactly one
  per completion); anything else, or an exception, stops the run with one line.

Every text reward is a :data:`BatchReward` inside (a one-sample function is wrapped by
:func:`per_sample`), and :func:`checked_values` checks what one returns.

``rlhf.reward`` may also be a weighted list of these (``[{reward: model, weight: 1},
{reward: gold, weight: 0}]``): a :class:`WeightedReward`, whose score is the weighted sum
(:func:`weighted_sum`; a weight of 0 adds nothing) and which gives each component's
score too, for the logs (``pipeline.alignment.rollout.score_with_components``).

Whatever RL maximizes, evaluation reports the gold score and the reward model's score
beside it (``pipeline.alignment.policy_eval``), so over-optimization stays visible.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.preference_data import visible_text
from pipeline.alignment.rl_losses import sequence_logprobs
from pipeline.core.errors import GptpipeError
from pipeline.core.params import RewardTerm
from pipeline.data.tokenizer import BOS_ID, PAD_ID, TextTokenizer
from pipeline.lm.model import GPT

Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
# (prompt, completion) -> float: one sample.
SampleReward = Callable[[str, str], float]
# TRL's reward function: (prompts=[...], completions=[...], **kwargs) -> one float each.
BatchReward = Callable[..., Sequence[float]]
# What a python: reward's file holds: either form (is_batched tells them apart).
TextReward = SampleReward | BatchReward
# The parameter names TRL passes a reward function, by name: one of them makes a function
# a batched reward.
BATCH_PARAMETERS = ("prompts", "completions", "completion_ids")

# Rows scored per forward pass of the likelihood model.
_LIKELIHOOD_BATCH = 64


def is_batched(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is a batched reward: it has a parameter named ``prompts``,
    ``completions`` or ``completion_ids``, as TRL's reward functions do; else it is a
    one-sample ``(prompt, completion)`` one (so is a function whose signature cannot be
    read)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return any(name in parameters for name in BATCH_PARAMETERS)


def per_sample(function: SampleReward) -> BatchReward:
    """A one-sample reward as a batched one: ``function(prompt, completion)`` per row,
    the row named in an error."""

    def batch(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        values = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            try:
                values.append(function(prompt, completion))
            except _RowError:
                raise
            except Exception as err:  # the user's code: any exception is one line
                raise _RowError(row, err) from None
        return values

    return batch


class _RowError(Exception):
    """A one-sample reward that raised on one row of the batch."""

    def __init__(self, row: int, error: Exception) -> None:
        super().__init__(row, error)
        self.row, self.error = row, error


def _call(function: BatchReward, prompts: list[str], completions: list[str],
          completion_ids: list[list[int]]) -> Any:
    """``function`` called as TRL calls a reward function: by name, with each of
    :data:`BATCH_PARAMETERS` it takes (all of them when it takes ``**kwargs``)."""
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    given = {"prompts": prompts, "completions": completions,
             "completion_ids": completion_ids}
    return function(**{name: value for name, value in given.items()
                       if takes_any or name in parameters})


def checked_values(returned: Any, completions: list[str], name: str) -> list[float]:
    """What a reward returned for ``completions``, as floats: exactly one finite number
    per completion (a list, a tuple, or a 1-D array or tensor), else one line naming the
    reward ``name`` and the first row at fault."""
    values = returned.tolist() if hasattr(returned, "tolist") else returned
    if not isinstance(values, list | tuple) or len(values) != len(completions):
        shown = (_count(len(values), "value") if isinstance(values, list | tuple)
                 else f"a {type(returned).__name__}")
        raise GptpipeError(
            f"rlhf.reward = {name} returned {shown} for {_count(len(completions), 'completion')};"
            " allowed: a list of one finite number per completion (TRL's reward functions)")
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise GptpipeError(
                f"rlhf.reward = {name} returned {value!r} for the completion "
                f"{completions[row][:40]!r} (row {row}); allowed: a finite number")
    return [float(value) for value in values]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def text_scorer(function: BatchReward, tokenizer: TextTokenizer, name: str) -> Scorer:
    """A scorer that decodes the batch and asks ``function`` (a batched reward: wrap a
    one-sample one with :func:`per_sample`); ``name`` (as the params spell it) names it in
    errors."""

    def score(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        prompts = [visible_text(tokenizer, ids) for ids in prompt_ids]
        completions = [visible_text(tokenizer, ids) for ids in completion_ids]
        try:
            returned = _call(function, prompts, completions,
                             [list(ids) for ids in completion_ids])
        except _RowError as failed:
            raise GptpipeError(
                f"rlhf.reward = {name} raised {type(failed.error).__name__} ({failed.error}) "
                f"on the completion {completions[failed.row][:40]!r} (row {failed.row}); no "
                "model was written") from None
        except Exception as err:  # the user's code: any exception is one line
            raise GptpipeError(
                f"rlhf.reward = {name} raised {type(err).__name__} ({err}) on a batch of "
                f"{_count(len(completions), 'completion')}; no model was written") from None
        return torch.tensor(checked_values(returned, completions, name), dtype=torch.float32)

    return score


def load_function(module_file: str, function: str, name: str) -> TextReward:
    """The function ``function`` of the Python file ``module_file`` (run once, as an
    import), one-sample or batched (:func:`is_batched`); every failure is one line naming
    the reward ``name``."""
    return _find_function(_import_file(module_file, name), module_file, function, name)


def load_functions(rewards: Mapping[str, tuple[str, str]]) -> dict[str, TextReward]:
    """Each ``python:`` reward's function, by its reward string, from ``rewards`` (reward
    string -> (module file, function name)): each file imported once, however many of
    its functions a weighted list names."""
    modules: dict[str, Any] = {}
    functions = {}
    for name, (module_file, function) in rewards.items():
        if module_file not in modules:
            modules[module_file] = _import_file(module_file, name)
        functions[name] = _find_function(modules[module_file], module_file, function, name)
    return functions


def _import_file(module_file: str, name: str) -> Any:
    """The module the Python file ``module_file`` makes (run once, as an import)."""
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
    return module


def _find_function(module: Any, module_file: str, function: str, name: str) -> TextReward:
    """``module``'s reward function ``function``, checked to be callable as a reward."""
    found = getattr(module, function, None)
    forms = ("a function (prompt, completion) -> float or TRL's (prompts, completions, "
             "**kwargs) -> list[float]")
    if not callable(found):
        raise GptpipeError(f"rlhf.reward = {name}: {module_file} has no function "
                           f"{function!r}; allowed: {forms}")
    if not is_batched(found) and not _takes_two_texts(found):
        raise GptpipeError(f"rlhf.reward = {name}: {function} cannot be called with "
                           f"(prompt, completion); allowed: {forms}")
    return found


def _takes_two_texts(function: Callable[..., Any]) -> bool:
    """Whether ``function(prompt, completion)`` binds (a signature that cannot be read
    is given the benefit of the doubt)."""
    try:
        inspect.signature(function).bind("", "")
    except TypeError:
        return False
    except ValueError:
        return True
    return True


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
        return text_scorer(per_sample(judge.score), tokenizer, reward)
    if reward == "likelihood":
        def likelihood(prompt_ids: list[list[int]],
                       completion_ids: list[list[int]]) -> torch.Tensor:
            return completion_logprob(pretrained, prompt_ids, completion_ids,
                                      likelihood_per_token)
        return likelihood
    if python_function is None:
        raise ValueError(f"unknown reward {reward!r}")
    batch = python_function if is_batched(python_function) else per_sample(python_function)
    return text_scorer(batch, tokenizer, reward)


def weighted_sum(values: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float]) -> torch.Tensor:
    """(B,) float32: the sum over components of weight * (B,) values, added in float64 in
    the order of ``weights``. A component of weight 0 is left out, so it adds nothing
    (not even NaN, as 0 * infinity would)."""
    total: torch.Tensor | None = None
    for name, weight in weights.items():
        column = values[name].detach().to("cpu", torch.float64)  # (B,)
        if total is None:
            total = torch.zeros_like(column)
        if weight != 0:
            total = total + weight * column
    if total is None:
        raise ValueError("a weighted sum of no component")
    return total.float()


@dataclass(frozen=True)
class Component:
    """One reward of a weighted list: its name in the logs, its weight, its scorer."""

    name: str
    weight: float
    scorer: Scorer


class WeightedReward:
    """A weighted list of rewards as one :data:`Scorer`: called, the (B,) weighted sum
    RL maximizes; :meth:`score_components` also gives each component's (B,) scores, to
    be logged (a component of weight 0 is scored and logged, never optimized)."""

    def __init__(self, components: Sequence[Component]) -> None:
        self.components = list(components)

    def score_components(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The (B,) weighted sum and each component's (B,) float32 scores, by name."""
        values = {component.name: torch.as_tensor(
                      component.scorer(prompt_ids, completion_ids)).detach().to(
                      "cpu", torch.float32)
                  for component in self.components}
        weights = {component.name: component.weight for component in self.components}
        return weighted_sum(values, weights), values

    def __call__(self, prompt_ids: list[list[int]],
                 completion_ids: list[list[int]]) -> torch.Tensor:
        return self.score_components(prompt_ids, completion_ids)[0]


def make_reward(reward: str | Sequence[RewardTerm],
                python_functions: Mapping[str, TextReward], **sources: Any) -> Scorer:
    """What ``rlhf.reward`` asks RL to maximize: one reward's scorer
    (:func:`make_scorer`), or a :class:`WeightedReward` of a list's. ``python_functions``
    holds each ``python:`` reward's function by its reward string (:func:`load_functions`);
    ``sources`` are :func:`make_scorer`'s keyword arguments."""
    if isinstance(reward, str):
        return make_scorer(reward, python_functions.get(reward), **sources)
    return WeightedReward([
        Component(term.name, term.weight,
                  make_scorer(term.reward, python_functions.get(term.reward), **sources))
        for term in reward])
