"""Resumable runs: the one component every training stage (pretrain, rlhf, ...) uses.

A run folder (``--checkpoint``: checkpoints/pretrain, checkpoints/rlhf) has a fixed inner
layout, and gptpipe only ever deletes the entries of that layout:

    <run folder>/snapshot/   state.safetensors (weights, optimizer moments, generator
                             states) + state.json (step, data position, fingerprints, ...)
    <run folder>/best/       the best weights so far, for stages that keep them apart

What a stage gets from :class:`RunFolder`:

- **fingerprint** (:func:`run_fingerprint`): the sha256 of the params the run depends
  on, of the bytes of every file of every input, and of gptpipe's own source. A snapshot
  is resumed only by a run with the same fingerprint, so changed data, params or code
  never continue an old run (DVC re-runs a stage when any of them changes);
- **resume, reuse or afresh** (:meth:`RunFolder.start`): an unfinished snapshot of this
  run is resumed; a finished one is only written out when its ``finished`` fingerprint
  (every param, cadence included) matches too; anything else starts afresh, and the
  reason is printed;
- **atomic snapshots** (:meth:`RunFolder.save`): written under a temporary name and
  swapped into place, so a kill leaves the previous snapshot or the new one;
- **interrupts** (:class:`StopSignals`): Ctrl-C (SIGINT) and SIGTERM, which batch
  schedulers and ``timeout`` send first, both ask the loop to stop at the next step
  boundary; the stage then snapshots and exits with one line. A second signal aborts.

Tensors are safetensors and the rest JSON: no snapshot file is ever unpickled (a
distributed run passes a snapshot's file bytes between its own processes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import (
    atomic_dir,
    load_tensors,
    save_tensors,
    sha256_file,
    source_digest,
    unique_state,
)

SNAPSHOT = "snapshot"
BEST = "best"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


# ------------------------------------------------------------------------ fingerprint


def input_hashes(inputs: Mapping[str, str | Path]) -> dict[str, str]:
    """sha256 of every file of every input (a file, or a folder's files), keyed
    ``<input name>/<path relative to it>``: where the checkout lives does not matter."""
    hashes = {}
    for name, where in sorted(inputs.items()):
        where = Path(where)
        if where.is_file():
            hashes[name] = sha256_file(where)
            continue
        if not where.is_dir():
            raise GptpipeError(f"{where}: not found; the run's input '{name}' must exist")
        for path in sorted(p for p in where.rglob("*") if p.is_file()):
            hashes[f"{name}/{path.relative_to(where).as_posix()}"] = sha256_file(path)
    return hashes


def run_fingerprint(params: Mapping[str, Any], inputs: Mapping[str, str | Path]) -> str:
    """What a snapshot must share with this run to be resumed: ``params`` (any JSON), the
    bytes of every input file, and gptpipe's source (:func:`pipeline.core.io.source_digest`).
    Bytes, not sizes or dates: an edit that keeps a file's length is another run."""
    body = {"params": params, "inputs": input_hashes(inputs), "code": source_digest()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------- snapshot files


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in info["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_training_state(directory: str | Path, module: nn.Module,
                        optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                        info: dict[str, Any]) -> None:
    """Write a snapshot atomically. ``rng``: name -> state tensor (uint8)."""
    tensors = {f"model.{k}": v.cpu() for k, v in unique_state(module).items()}
    optim_tensors, optim_info = _flatten_optimizer(optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()})
    with atomic_dir(directory) as tmp:
        save_tensors(tensors, tmp / STATE_TENSORS)
        body = {**info, "optimizer": optim_info}
        (tmp / STATE_JSON).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_training_info(directory: str | Path) -> dict[str, Any] | None:
    """The JSON half of a snapshot; None when there is no complete one."""
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    try:
        info = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptpipeError(f"{directory / STATE_JSON}: unreadable snapshot ({err})") from None
    if not isinstance(info, dict):
        raise GptpipeError(f"{directory / STATE_JSON}: unreadable snapshot (not an object)")
    return info


def load_training_state(directory: str | Path, module: nn.Module,
                        optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``module`` and ``optimizer`` in place; return (generator states, info)."""
    directory = Path(directory)
    info = read_training_info(directory)
    if info is None:
        raise GptpipeError(f"{directory}: no complete snapshot to resume")
    return apply_training_state(load_tensors(directory / STATE_TENSORS), info, module,
                                optimizer, directory)


def apply_training_state(tensors: dict[str, torch.Tensor] | bytes, info: dict[str, Any],
                         module: nn.Module, optimizer: torch.optim.Optimizer,
                         where: str | Path = "the snapshot"
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``module`` and ``optimizer`` from a snapshot's tensors (or the bytes of
    its tensor file) and info; return (generator states, info without the optimizer)."""
    if isinstance(tensors, bytes):
        from safetensors.torch import load as load_bytes

        tensors = load_bytes(tensors)
    info = dict(info)
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    tied = set(module.state_dict()) - set(unique_state(module))
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if set(missing) - tied or unexpected:
        raise GptpipeError(f"{where}: the snapshot's weights do not match the model")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info.pop("optimizer")))
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, info


# --------------------------------------------------------------------------- run folder


def folder_files(directory: Path) -> dict[str, bytes] | None:
    """Every file of a flat folder, name -> bytes; None when there is no such folder."""
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def write_folder_files(directory: Path, files: dict[str, bytes] | None) -> None:
    """Make ``directory`` hold exactly ``files`` (atomically), or remove it for None."""
    if files is None:
        remove_own_entries(directory.parent, (directory.name,))
        return
    with atomic_dir(directory) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def remove_own_entries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete ``folder/<name>`` for each of ``names``, and nothing else in ``folder``."""
    for name in names:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


class RunFolder:
    """The run folder of one training run: its snapshot, its best weights, and the
    decision to resume, reuse or start afresh (see the module docstring).

    ``fingerprint`` identifies the run for resuming; ``finished`` (default: the same) for
    reusing a finished snapshot, which stands for the whole run's outputs, so it may
    include params that a resumed run may change (evaluation or snapshot cadence).
    ``writer``: whether this process writes the folder (in a distributed run, one
    process per machine does: see :meth:`share`). ``stage`` prefixes the printed reasons.
    """

    def __init__(self, stage: str, path: str | Path, fingerprint: str, total_steps: int,
                 finished: str | None = None, writer: bool = True) -> None:
        self.stage = stage
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.finished = finished or fingerprint
        self.total_steps = total_steps
        self.writer = writer
        self.snapshot = self.path / SNAPSHOT
        self.best = self.path / BEST

    def _say(self, message: str) -> None:
        if self.writer:
            print(f"{self.stage}: {message}", flush=True)

    def _problem(self, info: dict[str, Any],
                 check: Callable[[dict[str, Any]], str | None] | None) -> str | None:
        if info.get("fingerprint") != self.fingerprint:
            return ("the checkpoint folder holds a snapshot of a different run (other params, "
                    "inputs or gptpipe code)")
        step = info.get("step")
        if not isinstance(step, int) or step < 0:
            return "the checkpoint folder holds an unreadable snapshot"
        if self.is_finished(info) and info.get("finished_fingerprint") != self.finished:
            return ("the checkpoint folder holds a run finished with another eval, log or "
                    "snapshot cadence")
        return check(info) if check is not None else None

    def start(self, check: Callable[[dict[str, Any]], str | None] | None = None
              ) -> dict[str, Any] | None:
        """The snapshot's info when this run resumes from it (or, finished, only writes
        its outputs); None to start afresh, after clearing the folder's own entries so
        that no other run's best weights mix with this one's. ``check(info)`` may name a
        stage-specific reason not to resume."""
        try:
            info = read_training_info(self.snapshot)
            reason = None if info is None else self._problem(info, check)
        except GptpipeError:
            info, reason = None, "the checkpoint folder holds an unreadable snapshot"
        if info is None or reason:
            if reason:
                self._say(f"{reason}: starting afresh")
            if self.writer:
                self.clear()
            return None
        if self.is_finished(info):
            self._say(f"the checkpoint folder holds this run, finished at step {info['step']}: "
                      "writing its outputs")
        else:
            self._say(f"resuming from step {info['step']} of {self.total_steps}")
        return info

    def is_finished(self, info: dict[str, Any]) -> bool:
        """Whether a snapshot is of a run that is over: at its last step, or stopped early
        (``info["stopped_early"]``, as an RL run without progress is)."""
        return info["step"] >= self.total_steps or bool(info.get("stopped_early"))

    def clear(self) -> None:
        """Delete the snapshot and the best weights, and nothing else in the folder."""
        remove_own_entries(self.path, (SNAPSHOT, BEST))

    def save(self, module: nn.Module, optimizer: torch.optim.Optimizer,
             rng: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Snapshot at a step boundary (``info["step"]``), with both fingerprints."""
        if self.writer:
            body = {**info, "fingerprint": self.fingerprint,
                    "finished_fingerprint": self.finished}
            save_training_state(self.snapshot, module, optimizer, rng, body)

    def load(self, module: nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_training_state(self.snapshot, module, optimizer)

    def held_run(self) -> tuple[str | None, int | None] | None:
        """(fingerprint, step) of the snapshot in the folder, read without deciding
        anything; None when there is none (an unreadable one counts as none)."""
        try:
            info = read_training_info(self.snapshot)
        except GptpipeError:
            return None
        if info is None:
            return None
        return info.get("fingerprint"), info.get("step")

    # A distributed run keeps one run folder per machine (each machine's first process
    # writes it, on its own disk), and after a kill the machines may hold snapshots of
    # different steps, or one machine none at all (a replaced one). The trainer lets the
    # process holding the newest snapshot share() it and every other machine adopt() it,
    # so all resume from one state and every machine keeps the whole run.
    def share(self) -> dict[str, dict[str, bytes] | None]:
        """The snapshot's and best weights' files, to send to the other machines."""
        return {SNAPSHOT: folder_files(self.snapshot), BEST: folder_files(self.best)}

    def adopt(self, shared: dict[str, dict[str, bytes] | None]) -> None:
        """Make this folder hold another machine's shared snapshot and best weights."""
        if self.writer:
            write_folder_files(self.snapshot, shared[SNAPSHOT])
            write_folder_files(self.best, shared[BEST])


# ------------------------------------------------------------------------------ signals


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM set :attr:`requested` instead of ending
    the process, so a training loop can finish the step in hand and snapshot. A second
    signal of either kind ends the process at once (SIGINT: KeyboardInterrupt; SIGTERM:
    the default action). Outside the main thread (where Python allows no handlers) it
    does nothing and ``requested`` stays False.
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


def interrupted_error(stage: str, signame: str, step: int, folder: Path) -> GptpipeError:
    """The one line a stage stops with after a stop signal and a snapshot."""
    how = "Ctrl-C" if signame == "SIGINT" else signame
    return GptpipeError(f"{stage}: interrupted by {how} at step {step}; a snapshot was saved in "
                        f"{folder}; run dvc repro again to resume")
