"""The RL loop: PPO with a KL penalty, REINFORCE, or DPO, with evaluations, the best
policy by gold score, and resumable snapshots.

The pieces it runs (each usable on its own): :mod:`~pipeline.alignment.policy` (the GPT
with a value head, the frozen reference, the optimizer), :mod:`~pipeline.alignment.rollout`
(sampled and scored completions), :mod:`~pipeline.alignment.updates` (one PPO, REINFORCE
or DPO step, with health checks) and :mod:`~pipeline.alignment.policy_eval` (fresh
samples on held-out prompts, win rates). :class:`Tuner`: updates, an evaluation every
``rlhf.eval_every`` steps, and the best policy by gold score; given a run folder, a
resumable snapshot at every evaluation (and on a stop signal), through the run component
(:class:`pipeline.core.runs.Run`) like pretraining's.

Prompts are fixed-length token prefixes, ``<bos>`` + K prompt tokens, all the same
length, so a batch samples at once (``sampling.sample_batch``): the model has no padding
mask, and left padding would shift rotary positions.

Dropout is off for the whole run (the policy stays in eval mode; gradients still flow):
dropout would make the log-probabilities of the rollout and of the update differ even
before any step, so PPO's importance ratio would start away from 1. For the same reason
everything runs in float32, with no autocast: bfloat16 matmuls over differently shaped
batches (the rollout's whole batch, an update's minibatch) round differently by more
than the ratio check allows.

Resuming: a snapshot holds everything the rest of the run depends on, so a resumed run
is bit-for-bit the uninterrupted one on the same device: the policy and value head, the
optimizer moments, the KL coefficient, the states of the generators that sample
rollouts and shuffle batches and minibatches, the indices drawn but not yet served, and
the evaluations so far (the final metrics need the starting policy's samples), and the
best policy's weights when they are not the snapshot's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.alignment.inputs import EncodedPair
from pipeline.alignment.policy import PolicyWithValue, frozen_copy, kl_controller, make_optimizer
from pipeline.alignment.policy_eval import PolicyEval, PromptScores, evaluate_policy, score_prompts
from pipeline.alignment.rollout import GoldScorer, Scorer, collect_rollout
from pipeline.alignment.updates import (
    check_kl,
    dpo_update,
    grpo_update,
    ppo_update,
    reinforce_update,
)
from pipeline.core.errors import GptpipeError
from pipeline.core.machine import describe_machine
from pipeline.core.params import RlhfParams
from pipeline.core.runs import Run, RunId
from pipeline.lm.model import GPT
from pipeline.lm.sampling import SamplingConfig

# Offsets from rlhf.seed for each independent stream of randomness.
_SAMPLE_SEED, _SHUFFLE_SEED, _EVAL_SEED = 0, 1, 2


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
    """What :meth:`Tuner.run` leaves: the best and last policies and their evaluations."""

    best_state: dict[str, torch.Tensor]  # the GPT's state dict at best_step (on CPU)
    best_step: int  # 0: no update beat the starting policy (by rlhf.select_by)
    start: PolicyEval  # the starting policy, step 0
    best: PolicyEval
    last: PolicyEval
    steps: int  # updates done: rlhf.steps, or fewer when stopped early
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list, repr=False)
    stopped_early: bool = False  # rlhf.patience evaluations in a row brought no better one


def _snapshot_module(policy: PolicyWithValue) -> nn.Module:
    """The policy's parameters (not copies) under the names that
    ``checkpoint.save_training_state`` handles: the GPT as ``body``, whose tied
    ``body.lm_head.weight`` it leaves out (safetensors refuses shared storage) and loading
    re-ties, beside the value head."""
    return nn.ModuleDict({"body": policy.gpt, "value_head": policy.value_head})


class Tuner:
    """One RL run (:meth:`run`), resumable when given a run folder ``state_dir``.

    The constructor builds the run and, with a ``state_dir``, resumes it through its
    :class:`pipeline.core.runs.Run` (``fingerprint``: the run's
    :class:`~pipeline.core.runs.RunId`, made by the caller from the params and inputs the
    run depends on). ``resumed_from`` is the step resumed from, or None; ``step`` the
    number of updates done.

    The frozen reference is copied from ``gpt`` before any snapshot is loaded into it:
    the KL is always to the starting policy, whatever step the run resumes from.
    """

    def __init__(
        self, gpt: GPT, rlhf: RlhfParams, scorer: Scorer, gold: GoldScorer,
        train_prompts: torch.Tensor, eval_prompts: torch.Tensor,
        pairs: Sequence[EncodedPair] = (), state_dir: str | Path | None = None,
        fingerprint: RunId | str = "", rm_scorer: Scorer | None = None,
    ) -> None:
        if rlhf.algo == "dpo" and not pairs:
            raise GptpipeError("rlhf: rlhf.algo = 'dpo' needs preference pairs; none were given")
        self.gpt, self.rlhf, self.scorer, self.gold = gpt, rlhf, scorer, gold
        self.rm_scorer = rm_scorer  # the reward model beside another reward; None: the same
        self.train_prompts, self.eval_prompts, self.pairs = train_prompts, eval_prompts, pairs
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
        # Group algorithms sample samples_per_prompt completions of each prompt: fewer
        # prompts per batch, the same number of completions.
        self.group = rlhf.samples_per_prompt if rlhf.algo in rlhf.GROUP_ALGOS else 1
        self.batches = BatchCycle(source, rlhf.batch_size // self.group,
                                  self.shuffle_generator)
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.start: PolicyEval | None = None  # None until the step-0 evaluation
        self.best: PolicyEval | None = None
        self.last: PolicyEval | None = None
        self.since_best = 0  # evaluations since the best one (early stopping)
        self.stopped_early = False
        self._log: Callable[[int, dict[str, float]], None] | None = None
        identity = fingerprint if isinstance(fingerprint, RunId) else RunId(
            {"fingerprint": fingerprint}, {}, "")
        self.protocol = Run("rlhf", state_dir, identity, rlhf.steps, gpt,
                        machine=describe_machine(device))
        resumed = self.protocol.start(_snapshot_module(self.policy), self.optimizer)
        self.resumed_from = None if resumed is None else self._restore(*resumed)

    @property
    def state_dir(self) -> Path | None:
        return self.protocol.path

    @property
    def best_step(self) -> int:
        return self.protocol.best.step or 0

    def _restore(self, rng: dict[str, torch.Tensor], info: dict[str, Any]) -> int:
        """The loop's own state from a snapshot; returns the step resumed from."""
        self.sample_generator.set_state(rng["sample"])
        self.shuffle_generator.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])
        self.batches.pending = [int(index) for index in info["pending"]]
        self.controller.value = float(info["kl_coef"])
        self.step = int(info["step"])
        self.start, self.last = (PolicyEval.from_json(info[key]) for key in ("start", "last"))
        self.best = PolicyEval.from_json(self.protocol.best.record["evaluation"])
        self.history = [(int(step), {name: float(value) for name, value in metrics.items()})
                        for step, metrics in info["history"]]
        self.since_best = int(info["since_best"])
        self.stopped_early = bool(info["stopped_early"])
        return self.step

    def save_state(self) -> None:
        """Snapshot the run at this step boundary (the best policy rides along)."""
        rng = {"sample": self.sample_generator.get_state(),
               "shuffle": self.shuffle_generator.get_state(), "torch": torch.get_rng_state()}
        info = {
            "steps": self.rlhf.steps,
            "kl_coef": self.controller.value,
            "pending": self.batches.pending,
            "since_best": self.since_best,
            "stopped_early": self.stopped_early,
            "start": self.start.to_json(),
            "last": self.last.to_json(),
            "history": [[step, metrics] for step, metrics in self.history],
        }
        self.protocol.save(self.step, _snapshot_module(self.policy), self.optimizer, rng, info)

    # -------------------------------------------------------------------------- loop

    def run(self, log: Callable[[int, dict[str, float]], None] | None = None,
            progress: Callable[[int], None] | None = None) -> TuneResult:
        """Tune the GPT in place with ``rlhf.algo`` to ``rlhf.steps`` updates, from where
        the run stands.

        - ppo / reinforce: each step samples a rollout on ``rlhf.batch_size`` of the
          (P, T0) ``train_prompts`` (shuffled passes), then updates.
        - dpo: each step is one update on ``rlhf.batch_size`` of ``pairs``.

        Evaluates (:func:`evaluate_policy` on ``eval_prompts``) before the first update,
        every ``rlhf.eval_every`` updates and after the last, and keeps the weights with
        the best gold score: the gold judge stands in for the humans whose preferences the
        reward model only approximates, so selecting by reward-model score would reward
        exploiting its errors. The starting policy competes too (best_step 0: nothing
        beat it).

        ``log(step, metrics)`` receives each update's statistics (rollout: rm_score, kl,
        entropy, kl_coef; PPO: policy_loss, value_loss, clip_fraction, approx_kl; DPO:
        dpo_loss, reward_accuracy, ...) and, at evaluations, ``eval/rm_score``,
        ``eval/gold_score``, ``eval/kl`` and ``eval/entropy``. With a weighted list of
        rewards, each one's mean too: ``reward/<name>`` per rollout, ``eval/rewards/<name>``
        per evaluation (``eval/reward`` is their weighted sum).

        With a run folder, a stop signal (Ctrl-C or SIGTERM) does not interrupt an update
        half-way: the step in hand finishes, a snapshot is saved and a one-line
        GptpipeError says where (as in pretraining). A second signal aborts at once.
        """
        self._log = log
        if self.protocol.folder is None:
            return self._loop(progress)
        with self.protocol.signals:
            return self._loop(progress)

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, metrics))
        if self._log is not None:
            self._log(step, metrics)

    def evaluate_model(self, gpt: GPT) -> PolicyEval:
        """Another model (the pretrained one, say) evaluated as the policy is: the same
        prompts, random draws and scorers, its KL to this run's reference."""
        rlhf = self.rlhf
        return evaluate_policy(gpt, self.reference, self.eval_prompts, self.config,
                               rlhf.seed + _EVAL_SEED, self.scorer, self.gold,
                               rlhf.batch_size, self.rm_scorer)

    def score_model(self, gpt: GPT, prompts: torch.Tensor) -> PromptScores:
        """``gpt`` sampled once on each of ``prompts`` and scored prompt by prompt, as the
        evaluations are (their seed, scorers and reference): on the evaluation prompts,
        their very samples."""
        rlhf = self.rlhf
        return score_prompts(gpt, self.reference, prompts, self.config,
                             rlhf.seed + _EVAL_SEED, self.scorer, self.gold,
                             rlhf.batch_size, self.rm_scorer)

    def _evaluate(self, step: int) -> PolicyEval:
        rlhf = self.rlhf
        result = self.evaluate_model(self.gpt)
        self._record(step, {f"eval/{k}": v for k, v in result.stats().items()})
        check_kl(result.kl, rlhf.kl_ceiling, f"on the evaluation samples at step {step}")
        return result

    def _update(self, step: int) -> dict[str, float]:
        rlhf = self.rlhf
        rows = next(self.batches)
        if rlhf.algo == "dpo":
            return dpo_update(self.policy, self.reference, self.optimizer,
                              [self.pairs[i] for i in rows], rlhf, step)
        # (B, T0): a group algorithm's samples of one prompt sit in consecutive rows.
        prompts = self.train_prompts[rows].repeat_interleave(self.group, dim=0)
        rollout = collect_rollout(self.policy, self.reference, prompts, self.config,
                                  self.sample_generator, self.scorer, self.controller.coef)
        if rlhf.algo == "ppo":
            update = ppo_update(self.policy, self.optimizer, rollout, rlhf,
                                self.shuffle_generator, step)
        elif rlhf.algo == "grpo":
            update = grpo_update(self.policy, self.optimizer, rollout, rlhf,
                                 self.shuffle_generator, step)
        else:
            update = reinforce_update(self.policy, self.optimizer, rollout, rlhf, step)
        # The rollout's entropy (of the policy that sampled) over the update's mean.
        metrics = {**update, **rollout.stats()}
        self.controller.update(metrics["kl"], 1)
        return metrics

    def _selection_score(self, evaluation: PolicyEval) -> float:
        """What picks the best policy: the gold score or the reward (rlhf.select_by; a
        weighted list's reward is the weighted sum)."""
        return evaluation.gold_score if self.rlhf.select_by == "gold" else evaluation.reward

    def _keep_if_best(self, step: int) -> None:
        """After an evaluation: keep a better policy, or count one more evaluation without
        one; ``rlhf.patience`` of those in a row stop the run (0: never)."""
        if self._selection_score(self.last) > self._selection_score(self.best):
            self.best, self.since_best = self.last, 0
            self.protocol.best.keep(step, evaluation=self.best.to_json())
            return
        self.since_best += 1
        if self.rlhf.patience and self.since_best >= self.rlhf.patience:
            self.stopped_early = True

    def _loop(self, progress: Callable[[int], None] | None) -> TuneResult:
        rlhf = self.rlhf
        if self.start is None:
            self.start = self.best = self.last = self._evaluate(0)
            self.protocol.best.keep(0, evaluation=self.best.to_json())
        while self.step < rlhf.steps and not self.stopped_early:
            step = self.step + 1
            metrics = self._update(step)
            self.step = step
            self._record(step, metrics)
            evaluated = step % rlhf.eval_every == 0 or step == rlhf.steps
            if evaluated:
                self.last = self._evaluate(step)
                self._keep_if_best(step)
            if progress is not None:
                progress(step)
            # Every evaluation is snapshotted (a stop signal too, after the step in hand).
            self.protocol.end_step(step, due=evaluated, save=self.save_state,
                                   over=step >= rlhf.steps or self.stopped_early)
        return TuneResult(self.protocol.best.state_dict(), self.best_step, self.start,
                          self.best, self.last, self.step, self.history, self.stopped_early)
