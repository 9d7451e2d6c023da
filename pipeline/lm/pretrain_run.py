"""What a pretraining run is: its budget, the params that identify it, and the one change
of params that leaves resuming it exact.

The ``train`` params fall in four groups:

- what is trained (the rest: seed, batch, optimizer, schedule, budget, base model): the
  run's :class:`~pipeline.core.runs.RunId`, with the model params, the process count
  (the global batch) and the bytes of the inputs;
- the cadence (:data:`CADENCE_PARAMS`): when things are measured and saved. A resumed
  run may change it; a finished run is reused only with the same;
- the execution (:data:`EXECUTION_PARAMS`): where and how it is computed. A resumed run
  may change it (and says the rounding changes); a finished run is reused only on the
  same machine, software and precision (its machine record, not these strings);
- the budget (``steps``/``tokens``), part of what is trained, but a changed budget still
  resumes when that is exact (:func:`budget_change`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.params import ModelParams, TrainParams
from pipeline.core.runs import Allow, RunId, run_fingerprint
from pipeline.lm.schedule import lr_at

CADENCE_PARAMS = ("eval_every", "eval_windows", "checkpoint_every", "log_every")
EXECUTION_PARAMS = ("device", "dtype", "threads", "compile", "nproc_per_node", "peer_timeout")
BUDGET_PARAMS = ("train.steps", "train.tokens")


def total_steps(train: TrainParams, context: int, world_size: int) -> int:
    """The step budget: train.steps, or enough steps to see train.tokens tokens."""
    if train.tokens > 0:
        per_step = train.batch_size * train.grad_accum * world_size * context
        return max(1, math.ceil(train.tokens / per_step))
    return train.steps


def pretrain_run_id(model: ModelParams, train: TrainParams, world_size: int,
                    inputs: dict[str, Path]) -> RunId:
    """The run's identity: model and train params (less cadence and execution), the
    process count, and the bytes of ``inputs`` (token shards, tokenizer, base model)."""
    steady = {key: value for key, value in asdict(train).items()
              if key not in CADENCE_PARAMS + EXECUTION_PARAMS}
    if not train.source_weights:  # unweighted: the identity runs had before weights
        del steady["source_weights"]
    return run_fingerprint({"model": asdict(model), "train": steady, "world_size": world_size},
                           inputs)


def schedule_of(train: TrainParams) -> dict[str, Any]:
    """``lr_at``'s arguments but the step and the budget, from the train params."""
    return dict(lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps,
                shape=train.schedule, decay_fraction=train.decay_fraction)


def settings_of(train: TrainParams) -> dict[str, Any]:
    """The cadence, as the run folder records it (``train.<key>``: value)."""
    return {f"train.{key}": getattr(train, key) for key in CADENCE_PARAMS}


def budget_change(train: TrainParams, context: int, world_size: int) -> Allow:
    """The rule for resuming a snapshot whose run differs from this one by its budget
    only: exact when every step done had the same learning rate under either budget (the
    cosine decay stretches with the budget, so in general it did not; with train.min_lr
    = train.lr it did, and wsd's steps before either decay did) and no step done was
    evaluated or logged only because it was the old run's last (or would have been,
    being this run's last)."""
    new_total = total_steps(train, context, world_size)

    def allow(changes: dict[str, tuple[Any, Any]], info: dict[str, Any]) -> tuple[bool, str]:
        if not set(changes) <= set(BUDGET_PARAMS):
            return False, ""
        done, old_total = int(info["step"]), int(info["total_steps"])
        old = info.get("settings", {})
        aligned = all(done % int(old.get(f"train.{key}", 1)) == 0
                      for key in ("eval_every", "log_every"))
        if done > new_total or (done in (old_total, new_total) and not aligned):
            return False, (f"step {done} of the snapshot was the end of a run of {old_total} "
                           f"steps, which a run of {new_total} steps would not evaluate there")
        schedule = schedule_of(train)
        same = all(lr_at(step, **schedule, total_steps=old_total)
                   == lr_at(step, **schedule, total_steps=new_total) for step in range(done))
        if not same:
            return False, (f"the learning rates of the {done} steps done differ between "
                           f"{old_total} and {new_total} steps (the {train.schedule} decay "
                           "moves with the budget), so resuming would not be the run these "
                           "params describe")
        return True, (f"a budget of {old_total} steps there, {new_total} here, and resuming is "
                      f"exact: each of the {done} steps done had the same learning rate "
                      "under either")

    return allow
