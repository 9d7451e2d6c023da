"""The RL loop: PPO with a KL penalty, REINFORCE, or DPO, with evaluations, the best
policy by gold score, and resumable snapshots.

The pieces it runs (each usable on its own): :mod:`~pipeline.alignment.policy` (the GPT
with a value head, the frozen reference, the optimizer), :mod:`~pipeline.alignment.rollout`
(sampled and scored completions), :mod:`~pipeline.alignment.updates` (one PPO, REINFORCE
or DPO step, with health checks) and :mod:`~pipeline.alignment.policy_eval` (fresh
samples on held-out prompts, win rates). :class:`Tuner`: updates, an evaluation every
``rlhf.eval_every`` steps, and the best policy by gold score; given a run folder, a
resumable snapshot at every evaluation (and on a stop signal), through
:class:`pipeline.core.runs.RunFolder` like pretraining's.

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
the evaluations so far (the final metrics need the starting policy's samples). The best
policy's weights live in the run folder's ``best/``, written only when a snapshot would
otherwise lose them (see :meth:`Tuner.save_state`).
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
from pipeline.alignment.policy_eval import PolicyEval, evaluate_policy
from pipeline.alignment.rollout import GoldScorer, Scorer, collect_rollout
from pipeline.alignment.updates import (
    check_kl,
    dpo_update,
    grpo_update,
    ppo_update,
    reinforce_update,
)
from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json
from pipeline.core.params import RlhfParams
from pipeline.core.runs import RunFolder, StopSignals, interrupted_error
from pipeline.lm.checkpoint import CONFIG, load_model, save_model
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


def _cpu_state(gpt: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in gpt.state_dict().items()}


def _snapshot_module(policy: PolicyWithValue) -> nn.Module:
    """The policy's parameters (not copies) under the names that
    ``checkpoint.save_training_state`` handles: the GPT as ``body``, whose tied
    ``body.lm_head.weight`` it leaves out (safetensors refuses shared storage) and loading
    re-ties, beside the value head."""
    return nn.ModuleDict({"body": policy.gpt, "value_head": policy.value_head})


class Tuner:
    """One RL run (:meth:`run`), resumable when given a run folder ``state_dir``.

    The constructor builds the run and, with a ``state_dir``, resumes from its snapshot
    when that is an unfinished snapshot of this very run (same ``fingerprint``: the caller
    hashes the params and inputs the run depends on; :class:`RunFolder` decides and says
    why not). ``resumed_from`` is the step resumed from, or None; ``step`` the number of
    updates done.

    The frozen reference is copied from ``gpt`` before any snapshot is loaded into it:
    the KL is always to the starting policy, whatever step the run resumes from.
    """

    def __init__(
        self, gpt: GPT, rlhf: RlhfParams, scorer: Scorer, gold: GoldScorer,
        train_prompts: torch.Tensor, eval_prompts: torch.Tensor,
        pairs: Sequence[EncodedPair] = (), state_dir: str | Path | None = None,
        fingerprint: str = "", rm_scorer: Scorer | None = None,
    ) -> None:
        if rlhf.algo == "dpo" and not pairs:
            raise GptpipeError("rlhf: rlhf.algo = 'dpo' needs preference pairs; none were given")
        self.gpt, self.rlhf, self.scorer, self.gold = gpt, rlhf, scorer, gold
        self.rm_scorer = rm_scorer  # the reward model beside another reward; None: the same
        self.train_prompts, self.eval_prompts, self.pairs = train_prompts, eval_prompts, pairs
        self.folder = None if state_dir is None else RunFolder("rlhf", state_dir, fingerprint,
                                                            rlhf.steps)
        self.fingerprint = fingerprint
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
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.since_best = 0  # evaluations since the best one (early stopping)
        self.stopped_early = False
        self.resumed_from: int | None = None
        self._best_on_disk: int | None = None  # the step whose weights run.best holds
        self._log: Callable[[int, dict[str, float]], None] | None = None
        self._signals = StopSignals()
        if self.folder is not None:
            self._resume()

    @property
    def state_dir(self) -> Path | None:
        return None if self.folder is None else self.folder.path

    # ------------------------------------------------------------------------ resume

    def _best_weights_missing(self, info: dict[str, Any]) -> str | None:
        """Why the snapshot cannot be resumed for want of its best weights, or None."""
        step, best_step = int(info.get("step", 0)), int(info.get("best_step", 0))
        if 0 < best_step < step and self._best_dir_step() != best_step:
            return (f"the best weights the snapshot needs (step {best_step}) are not in "
                    f"{self.folder.best}")
        return None

    def _best_dir_step(self) -> int | None:
        """The step whose weights the best folder holds, when they are from this run."""
        path = self.folder.best / CONFIG
        try:
            meta = read_json(path)
        except (OSError, GptpipeError):
            return None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            return None
        step = meta.get("rlhf_step")
        return step if isinstance(step, int) else None

    def _resume(self) -> None:
        info = self.folder.start(check=self._best_weights_missing)
        if info is None:
            return
        best_step = int(info["best_step"])
        best = None
        if 0 < best_step < int(info["step"]):
            # Loaded first: building a GPT draws from the global generator, restored below.
            best, _ = load_model(self.folder.best)
            self._best_on_disk = best_step
        rng, info = self.folder.load(_snapshot_module(self.policy), self.optimizer)
        self.sample_generator.set_state(rng["sample"])
        self.shuffle_generator.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])
        self.batches.pending = [int(index) for index in info["pending"]]
        self.controller.value = float(info["kl_coef"])
        self.step = int(info["step"])
        self.start, self.best, self.last = (PolicyEval.from_json(info[key])
                                            for key in ("start", "best", "last"))
        self.best_step = best_step
        source = self.reference if best_step == 0 else best if best is not None else self.gpt
        self.best_state = _cpu_state(source)
        self.history = [(int(step), {name: float(value) for name, value in metrics.items()})
                        for step, metrics in info["history"]]
        self.since_best = int(info["since_best"])
        self.stopped_early = bool(info["stopped_early"])
        self.resumed_from = self.step

    def save_state(self) -> None:
        """Snapshot the run at this step boundary, atomically (the run folder's snapshot).

        The best weights need a folder of their own only when the snapshot cannot stand for
        them: step 0's are the reference's (the starting policy), and a snapshot taken at
        the best step holds them as its policy. So the best folder is written just before
        the first snapshot after the best step, never after it (a kill in between would
        leave a snapshot naming weights that are nowhere), and it is replaced only while
        the snapshot on disk is the one taken at the new best step (every evaluation, and
        so every new best, is snapshotted), which does not need the folder.
        """
        if 0 < self.best_step < self.step and self._best_on_disk != self.best_step:
            with torch.random.fork_rng(devices=[]):  # GPT() draws its initial weights
                best = GPT(self.gpt.config)
            best.load_state_dict(self.best_state)
            save_model(self.folder.best, best, best.config,
                       {"rlhf_step": self.best_step, "fingerprint": self.fingerprint})
            self._best_on_disk = self.best_step
        rng = {"sample": self.sample_generator.get_state(),
               "shuffle": self.shuffle_generator.get_state(), "torch": torch.get_rng_state()}
        info = {
            "step": self.step,
            "steps": self.rlhf.steps,
            "kl_coef": self.controller.value,
            "pending": self.batches.pending,
            "best_step": self.best_step,
            "since_best": self.since_best,
            "stopped_early": self.stopped_early,
            "start": self.start.to_json(),
            "best": self.best.to_json(),
            "last": self.last.to_json(),
            "history": [[step, metrics] for step, metrics in self.history],
        }
        self.folder.save(_snapshot_module(self.policy), self.optimizer, rng, info)

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
        ``eval/gold_score``, ``eval/kl`` and ``eval/entropy``.

        With a run folder, a stop signal (Ctrl-C or SIGTERM) does not interrupt an update
        half-way: the step in hand finishes, a snapshot is saved and a one-line
        GptpipeError says where (as in pretraining). A second signal aborts at once.
        """
        self._log = log
        if self.folder is None:
            return self._loop(progress)
        with StopSignals() as self._signals:
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
        """What picks the best policy: the gold score or the reward (rlhf.select_by)."""
        return evaluation.gold_score if self.rlhf.select_by == "gold" else evaluation.reward

    def _keep_if_best(self, step: int) -> None:
        """After an evaluation: keep a better policy, or count one more evaluation without
        one; ``rlhf.patience`` of those in a row stop the run (0: never)."""
        if self._selection_score(self.last) > self._selection_score(self.best):
            self.best, self.best_step, self.since_best = self.last, step, 0
            self.best_state = _cpu_state(self.gpt)
            return
        self.since_best += 1
        if self.rlhf.patience and self.since_best >= self.rlhf.patience:
            self.stopped_early = True

    def _loop(self, progress: Callable[[int], None] | None) -> TuneResult:
        rlhf = self.rlhf
        if self.start is None:
            self.start = self.best = self.last = self._evaluate(0)
            self.best_step, self.best_state = 0, _cpu_state(self.gpt)
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
            stop = self._signals.requested
            if self.folder is not None and (evaluated or stop):
                self.save_state()
                if stop and step < rlhf.steps and not self.stopped_early:
                    # The step in hand finished and was snapshotted; stop here.
                    raise interrupted_error("rlhf", stop, step, self.folder.path)
        return TuneResult(self.best_state, self.best_step, self.start, self.best, self.last,
                          self.step, self.history, self.stopped_early)
