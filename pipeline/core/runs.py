"""Resumable runs: the protocol every training loop (pretrain, rlhf) goes through.

A loop builds its model and optimizer, asks its :class:`Run` to ``start`` (resume,
reuse a finished run, or start afresh), then steps, evaluates, hands better weights to
``run.best`` and ends every step with :meth:`Run.end_step`. Everything about keeping a
run across kills, param changes and machines lives here, the same for every loop.

**The run folder** (``--checkpoint``: checkpoints/pretrain, checkpoints/rlhf) holds
``snapshot/`` (the whole run at one step: weights, optimizer, generators, data position,
the best weights so far, what produced it) and ``aside/`` (runs set aside), and nothing
else: a folder holding anything else (a model folder named by mistake, a user's files)
is refused before anything is written (:mod:`pipeline.core.run_folder`).

**At the start** (every decision is one printed line):

- a snapshot of this run (same :class:`RunId`: params, input bytes, gptpipe's code),
  unfinished: resumed. A machine, torch or precision other than the one that wrote it is
  named, since the remaining steps then round another way;
- this run, finished, with the same settings (cadence) on the same machine and software:
  its outputs are written without training, since training it again would compute the
  same bits (on a CPU). This is what ``dvc repro -f`` does: it reruns the stage, and the
  stage finds its result already computed. On another machine, torch or precision, or
  with another eval/log/snapshot cadence, the run is trained again. To train it again
  anyway, delete the snapshot (``rm -r checkpoints/pretrain/snapshot``) first;
- an unfinished run of other params (or inputs, or code): set aside in ``aside/<id>``,
  never deleted; the line names what differs, where it went and how to discard it.
  Setting the params back resumes it. At most :data:`ASIDE_LIMIT` runs are kept aside,
  then the stage stops with one line saying what to delete. A loop may allow a change
  that cannot alter the result (pretraining: a budget under which every step done had
  the same learning rate);
- a finished run of other params: replaced. Its outputs were written when it finished,
  and DVC caches them (and this folder) with the stage;
- a damaged snapshot (unreadable, or whose tensors no longer have the sha256 they were
  saved with): set aside as ``aside/damaged-<n>``, and the run starts afresh.

**Snapshots** (:meth:`Run.save`) are written atomically; weights or optimizer moments
that are not finite are refused (the last good snapshot stays), so a resume never meets
a NaN. **Best weights** (:class:`BestWeights`) ride in the snapshot. **Interrupts**
(:class:`StopSignals`): Ctrl-C and SIGTERM stop the loop at the next step boundary, after
a snapshot. **Several processes**: every machine decides for its own folder, then all
continue from the newest snapshot any of them holds (:mod:`pipeline.core.ranks`); a
process that dies or freezes is named by the others (:mod:`pipeline.core.peers`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.device import Runtime, together
from pipeline.core.errors import GptpipeError
from pipeline.core.ranks import check_same_run, newest_snapshot, one_writer_per_folder
from pipeline.core.run_folder import ASIDE, ASIDE_LIMIT, SNAPSHOT, Allow, RunFolder
from pipeline.core.run_id import RunId, run_fingerprint
from pipeline.core.snapshot import (
    STATE_JSON,
    STATE_TENSORS,
    apply_training_state,
    first_non_finite,
    load_training_state,
    parse_info,
    parse_tensors,
    read_training_info,
    save_training_state,
    snapshot_tensors,
)
from pipeline.core.weights import unique_state

__all__ = ["ASIDE", "ASIDE_LIMIT", "SNAPSHOT", "Allow", "BestWeights", "NonFiniteWeights",
           "Run", "RunFolder", "RunId", "StopSignals", "apply_training_state",
           "interrupted_error", "load_training_state", "one_writer_per_folder",
           "read_training_info", "run_fingerprint", "save_training_state"]


# --------------------------------------------------------------------------- best weights


def _tie_sources(module: nn.Module) -> dict[str, str]:
    """Each later name of a tied tensor -> the first name of the same tensor."""
    first: dict[tuple, str] = {}
    ties = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in first:
            ties[name] = first[key]
        first.setdefault(key, name)
    return ties


class BestWeights:
    """The best weights of a run so far (the lowest val loss, the highest gold score: the
    loop compares, this keeps), copied to the CPU when found.

    They are saved inside every snapshot taken after the best step (a snapshot taken at
    the best step holds them as its weights), so a snapshot is the whole run: no second
    folder that a kill could leave out of step with it."""

    PREFIX = "best."

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.step: int | None = None
        self.record: dict[str, Any] = {}
        self._state: dict[str, torch.Tensor] | None = None

    def keep(self, step: int, **record: Any) -> None:
        """The module's weights now are the best so far, found at ``step``; ``record``
        (JSON) is remembered beside them (the score, say)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in unique_state(self.module).items()}
        self.step, self.record, self._state = step, dict(record), state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The best weights under every name of the module's state dict, on the CPU."""
        if self._state is None:
            raise GptpipeError("no best weights were kept")
        ties = _tie_sources(self.module)
        return {name: self._state[ties.get(name, name)] for name in self.module.state_dict()}

    def to_info(self) -> dict[str, Any]:
        return {"best_step": self.step, "best": self.record}

    def tensors(self, step: int) -> dict[str, torch.Tensor]:
        """What a snapshot at ``step`` must carry of them: nothing at the best step."""
        if self._state is None or self.step == step:
            return {}
        return {self.PREFIX + name: tensor for name, tensor in self._state.items()}

    def restore(self, info: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
        """From a snapshot just loaded into the module (its info and tensors)."""
        self.step, self.record = info.get("best_step"), dict(info.get("best") or {})
        if self.step is None:
            self._state = None
        elif self.step == info["step"]:
            self.keep(self.step, **self.record)
        else:
            self._state = {k.removeprefix(self.PREFIX): v for k, v in tensors.items()
                           if k.startswith(self.PREFIX)}
            if self._state.keys() != unique_state(self.module).keys():
                raise GptpipeError(f"{where}: the snapshot lacks the best weights of step "
                                   f"{self.step}")


class NonFiniteWeights(GptpipeError):
    pass


class Run:
    """One training run's protocol, as a loop sees it: :meth:`start`, :attr:`best`,
    :meth:`end_step` (the snapshot-or-stop tail of every step) and :meth:`save`.

    ``folder`` None: a run kept in memory only (nothing is saved or resumed).
    ``runtime``: the processes (several: :mod:`pipeline.core.ranks`); ``shared``: what
    every process must also agree on (JSON). See :class:`RunFolder` for the rest."""

    def __init__(self, stage: str, folder: str | Path | None, run: RunId, total_steps: int,
                 model: nn.Module, runtime: Runtime | None = None,
                 settings: dict[str, Any] | None = None, machine: dict[str, Any] | None = None,
                 allow: Allow | None = None, shared: Any = None) -> None:
        self.stage, self.total_steps = stage, total_steps
        self.runtime = runtime or Runtime(torch.device("cpu"), torch.float32)
        self.folder = None if folder is None else RunFolder(
            stage, folder, run, total_steps, settings, machine, allow, self.runtime.writes_files)
        self.best = BestWeights(model)
        self.shared = shared
        self.saved_step: int | None = None  # the step of the last good snapshot on disk
        self.signals = StopSignals()

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder.path

    def start(self, module: nn.Module, optimizer: torch.optim.Optimizer
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Resume ``module`` and ``optimizer`` (and the best weights) from the snapshot
        this run continues; return (generator states, info) for the loop's own state, or
        None for a fresh run. With several processes, every process continues from the
        newest snapshot any machine holds (:mod:`pipeline.core.ranks`)."""
        if self.folder is None:
            return None
        folder, runtime = self.folder, self.runtime
        if runtime.distributed:
            check_same_run(runtime, self.stage, [folder.run.digest, folder.settings,
                                                 str(runtime.dtype), self.shared])
        held = together(runtime, lambda: folder.start() if folder.writer else None)
        mine = None if held is None else held.files
        files = newest_snapshot(runtime, self.stage, mine, None if held is None else held.step,
                                folder.adopt)
        if files is None:
            return None
        where = folder.snapshot
        tensors = parse_tensors(files[STATE_TENSORS], where / STATE_TENSORS)
        info = parse_info(files[STATE_JSON], where / STATE_JSON)
        rng, info = apply_training_state(tensors, info, module, optimizer, where)
        self.best.restore(info, tensors, where)
        self.saved_step = int(info["step"])
        return rng, info

    def save(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
             rng: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Snapshot at the boundary of ``step`` (every machine's writer), with the best
        weights; refuse non-finite weights or moments, keeping the last good snapshot."""
        if self.folder is None:
            return
        tensors, optim_info = snapshot_tensors(module, optimizer, rng)
        bad = first_non_finite(tensors)
        if bad is not None:
            kept = ("no snapshot was saved yet" if self.saved_step is None else
                    f"the last good snapshot (step {self.saved_step}) in {self.path} is kept")
            raise NonFiniteWeights(
                f"{self.stage}: {bad.split('.', 1)[1]} is not finite at step {step}: refusing "
                f"to save it; {kept}; try a lower learning rate or gradient clipping")
        tensors.update(self.best.tensors(step))
        body = {**info, "step": step, **self.best.to_info(), "optimizer": optim_info}
        together(self.runtime, lambda: self.folder.save(tensors, body))
        self.saved_step = step

    def stop_requested(self) -> str | None:
        """The stop signal any process received (every process stops at the same step)."""
        local = self.signals.requested
        if not self.runtime.distributed:
            return local
        flag = torch.tensor(float(local is not None), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (local or "a signal on another process") if flag.item() else None

    def end_step(self, step: int, due: bool, over: bool, save: Callable[[], None]) -> None:
        """The tail of every step: snapshot (``save``) when ``due`` or asked to stop; then,
        asked to stop and not ``over``, stop with one line saying where the snapshot is."""
        stop = self.stop_requested()
        if self.folder is not None and (due or stop):
            save()
        if stop and not over:
            raise interrupted_error(self.stage, stop, step, self.path)


# ------------------------------------------------------------------------------ signals


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM set :attr:`requested` instead of ending
    the process, so a training loop can finish the step in hand and snapshot. A second
    signal of either kind ends the process at once (SIGINT: KeyboardInterrupt; SIGTERM:
    the default action). Outside the main thread (where Python allows no handlers) it
    does nothing and ``requested`` stays None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the first signal received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second signal: abort now
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def interrupted_error(stage: str, signame: str, step: int, folder: Path | None) -> GptpipeError:
    """The one line a stage stops with after a stop signal and a snapshot."""
    how = "Ctrl-C" if signame == "SIGINT" else signame
    return GptpipeError(f"{stage}: interrupted by {how} at step {step}; a snapshot was saved in "
                        f"{folder}; run dvc repro again to resume")
