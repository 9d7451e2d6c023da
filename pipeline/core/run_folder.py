"""The run folder of a training run, seen from one machine: what it holds, and the
decision to resume, reuse, set aside or start afresh (:mod:`pipeline.core.runs` says
what each decision means for a run).

Layout (gptpipe writes, moves and deletes nothing else in the folder)::

    <run folder>/snapshot/           state.safetensors + state.json: a run at one step
    <run folder>/aside/<id>/snapshot an interrupted run of other params, set aside
    <run folder>/aside/damaged-<n>/  a snapshot found damaged

A snapshot's ``state.json`` records what decides: the :class:`~pipeline.core.run_id.RunId`
of its run, its settings (cadence), the machine that wrote it, its step and budget, and
the sha256 of its tensor file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import GptpipeError
from pipeline.core.io import MAX_JSON_BYTES, check_size
from pipeline.core.machine import describe_machine, machine_differences
from pipeline.core.run_id import RunId, describe_changes
from pipeline.core.snapshot import (
    STATE_JSON,
    STATE_TENSORS,
    parse_info,
    parse_tensors,
    write_folder_files,
    write_state,
)

SNAPSHOT = "snapshot"
ASIDE = "aside"
# Interrupted runs of other params kept aside at most: each is a whole snapshot (about
# three times the model's weights), and DVC caches the folder with them.
ASIDE_LIMIT = 3
WRITER_MARK = ".gptpipe-writer-"
# Where gptpipe kept the best weights beside a snapshot before they moved into it: such a
# folder is still recognized, and goes with its snapshot.
LEGACY_BEST = "best"
_LEGACY_BEST_FILES = {"gptpipe.json", "model.safetensors"}


@dataclass
class Held:
    """A snapshot found in a folder: its files and parsed info, or why it is damaged."""

    where: Path
    files: dict[str, bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    damage: str | None = None

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    @property
    def finished(self) -> bool:
        """Over by its own budget (or stopped early, as an RL run without progress is);
        RL's snapshots written before ``total_steps`` was recorded name it ``steps``."""
        total = self.info.get("total_steps", self.info.get("steps"))
        return bool(self.info.get("stopped_early")) or (isinstance(total, int)
                                                        and self.step >= total)


def read_held(where: Path) -> Held:
    """The snapshot in ``where`` as far as deciding about it needs: its ``state.json``
    (``files`` None: there is none; ``damage``: why it cannot be one)."""
    held = Held(where)
    if not where.exists():
        return held
    held.files = {}
    try:
        names = {p.name for p in where.iterdir()} if where.is_dir() else set()
        if not {STATE_JSON, STATE_TENSORS} <= names:
            raise GptpipeError(f"{where}: incomplete ({STATE_JSON} and {STATE_TENSORS} needed)")
        check_size(where / STATE_JSON, MAX_JSON_BYTES, "snapshot")
        held.files[STATE_JSON] = (where / STATE_JSON).read_bytes()
        held.info = parse_info(held.files[STATE_JSON], where / STATE_JSON)
        if not isinstance(held.info.get("step"), int) or held.info["step"] < 0:
            raise GptpipeError(f"{where / STATE_JSON}: no step")
    except (GptpipeError, OSError) as err:
        held.damage = str(err)
    return held


def read_whole(held: Held) -> None:
    """Read the tensor file of a snapshot to resume, checked against the sha256 it was
    saved with (``held.damage`` says what is wrong)."""
    where = held.where
    try:
        data = (where / STATE_TENSORS).read_bytes()
        recorded = held.info.get("tensors_sha256")
        if recorded is None:  # written before the sha256 was recorded: parse it whole
            parse_tensors(data, where / STATE_TENSORS)
        elif hashlib.sha256(data).hexdigest() != recorded:
            raise GptpipeError(f"{where / STATE_TENSORS}: damaged (its sha256 is not the one "
                               "it was saved with)")
        held.files = {**(held.files or {}), STATE_TENSORS: data}
    except (GptpipeError, OSError) as err:
        held.damage = str(err)


@dataclass
class Verdict:
    """What to do with a held snapshot: ``resume``, ``reuse`` (finished: write the
    outputs), ``retrain`` (finished here with other settings or elsewhere), ``other`` (of
    another run), ``damaged`` or ``none``; ``why`` completes the printed line."""

    kind: str
    why: str = ""


# allow(changes, info) -> (allowed, why): whether a change of params (name -> (here,
# there)) leaves resuming exact, and why (said either way); None: no change is allowed.
Allow = Callable[[dict[str, tuple[Any, Any]], dict[str, Any]], tuple[bool, str]]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()


def _own(entry: Path) -> bool:
    """Whether a run folder's entry is gptpipe's: its layout, a temporary of it, a writer's
    mark, or the best weights an earlier gptpipe kept beside its snapshot."""
    name = entry.name
    bare = name.removeprefix(".").split(".tmp-", 1)[0] if ".tmp-" in name else name
    if name == LEGACY_BEST:  # a model folder's best/ also holds tokenizer.json
        return entry.is_dir() and {p.name for p in entry.iterdir()} == _LEGACY_BEST_FILES
    return bare in (SNAPSHOT, ASIDE, LEGACY_BEST) or name.startswith(WRITER_MARK)


def check_run_folder(path: Path) -> None:
    """Refuse, before anything is written, a run folder holding anything but gptpipe's
    own layout (a model folder named as ``--checkpoint`` would be lost)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise GptpipeError(f"{path}: a file; the run folder (--checkpoint) must be a folder")
    foreign = sorted(entry.name for entry in path.iterdir() if not _own(entry))
    if foreign:
        raise GptpipeError(
            f"{path}: not a run folder: it holds {', '.join(foreign[:3])}, which gptpipe did "
            f"not write there (a run folder holds only {SNAPSHOT}/ and {ASIDE}/); name a new "
            "or empty folder as --checkpoint (checkpoints/<stage>)")


class RunFolder:
    """The run folder of one run, seen from one machine: what it holds, and the decision
    to resume, reuse, set aside or start afresh (see the module docstring).

    ``run`` identifies the run; ``settings`` (JSON) are what a resumed run may change but
    a reused finished one must share (when evaluations, logs and snapshots happen);
    ``machine`` is what computes it (:func:`pipeline.core.machine.describe_machine`);
    ``allow`` may accept a change of params that cannot alter the result. ``writer``:
    whether this process writes the folder."""

    def __init__(self, stage: str, path: str | Path, run: RunId, total_steps: int,
                 settings: dict[str, Any] | None = None, machine: dict[str, Any] | None = None,
                 allow: Allow | None = None, writer: bool = True) -> None:
        self.stage, self.path, self.run = stage, Path(path), run
        self.total_steps = total_steps
        self.settings = settings or {}
        self.machine = machine if machine is not None else describe_machine()
        self.allow, self.writer = allow, writer
        self.snapshot = self.path / SNAPSHOT
        self.aside = self.path / ASIDE

    def _say(self, message: str) -> None:
        if self.writer:
            print(f"{self.stage}: {message}", flush=True)

    def verdict(self, held: Held) -> Verdict:
        """What this run does with ``held`` (no file is touched)."""
        if held.files is None:
            return Verdict("none")
        if held.damage:
            return Verdict("damaged", held.damage)
        info = held.info
        theirs = RunId.from_json(info.get("run"))
        if theirs is None:
            return Verdict("other", "written by an earlier gptpipe")
        changes = self.run.differences(theirs)
        why = ""
        if changes:
            allowed, why = self.allow(changes, info) if self.allow else (False, "")
            if not allowed:
                return Verdict("other", describe_changes(changes) + (f": {why}" if why else ""))
        if not (held.step >= self.total_steps or info.get("stopped_early")):
            return Verdict("resume", "; ".join(filter(None, [why, self._elsewhere(info)])))
        settings = {k: (v, info.get("settings", {}).get(k)) for k, v in self.settings.items()
                    if info.get("settings", {}).get(k) != v}
        machine = machine_differences(info.get("machine") or {}, self.machine)
        if settings or machine:
            what = (f"with other settings ({describe_changes(settings)})" if settings else
                    f"on another machine or software ({'; '.join(machine[:2])})")
            return Verdict("retrain", what)
        return Verdict("reuse")

    def _elsewhere(self, info: dict[str, Any]) -> str:
        machine = machine_differences(info.get("machine") or {}, self.machine)
        if not machine:
            return ""
        return ("written with " + "; ".join(machine[:2]) + ": the remaining steps round as "
                "this machine does, so the result is not bit for bit an uninterrupted run's")

    def start(self) -> Held | None:
        """Decide, say why, move what must go aside, and return the snapshot this run
        resumes from (or, finished, only writes out); None to start afresh."""
        check_run_folder(self.path)
        held = read_held(self.snapshot)
        verdict = self.verdict(held)
        if verdict.kind in ("resume", "reuse"):
            read_whole(held)
            if held.damage is None:
                self._say_resuming(held, verdict)
                return held
            verdict = Verdict("damaged", held.damage)
        restored = self._find_aside()
        self._clear(held, verdict, keep_slot=restored is not None)
        if restored is None:
            return None
        name, held, verdict = restored
        os.replace(self.aside / name / SNAPSHOT, self.snapshot)
        _remove(self.aside / name)
        held.where = self.snapshot
        self._say_resuming(held, verdict, f" (the run set aside in {self.aside / name})")
        return held

    def _say_resuming(self, held: Held, verdict: Verdict, source: str = "") -> None:
        why = f"; {verdict.why}" if verdict.why else ""
        if verdict.kind == "reuse":
            self._say(f"the checkpoint folder holds this run, finished at step {held.step}: "
                      f"writing its outputs{source} (delete {self.snapshot} to train it again)")
        else:
            self._say(f"resuming from step {held.step} of {self.total_steps}{source}{why}")

    def _find_aside(self) -> tuple[str, Held, Verdict] | None:
        """A run set aside that this run resumes (its params are back), if any."""
        if not self.aside.is_dir():
            return None
        for entry in sorted(self.aside.iterdir()):
            if entry.name.startswith("."):
                continue
            held = read_held(entry / SNAPSHOT)
            verdict = self.verdict(held)
            if verdict.kind in ("resume", "reuse"):
                read_whole(held)
                if held.damage is None:
                    return entry.name, held, verdict
                self._say(f"the run set aside in {entry} would resume, but {held.damage}; "
                          "it stays there")
        return None

    def _clear(self, held: Held, verdict: Verdict, keep_slot: bool) -> None:
        """Make room for this run: set ``held`` aside or replace it, with one line."""
        if verdict.kind == "none":
            _remove(self.path / LEGACY_BEST)  # no snapshot needs it
            return
        if verdict.kind == "retrain":
            self._say(f"the checkpoint folder holds this run, finished at step {held.step} "
                      f"{verdict.why}: training it again")
            _remove(self.snapshot)
            _remove(self.path / LEGACY_BEST)
        elif verdict.kind == "other" and held.finished:
            self._say(f"the checkpoint folder holds another run, finished at step {held.step} "
                      f"({verdict.why}): replacing it (a finished run's outputs were written "
                      "when it finished); starting afresh")
            _remove(self.snapshot)
            _remove(self.path / LEGACY_BEST)
        else:
            self._set_aside(held, verdict, keep_slot)

    def _set_aside(self, held: Held, verdict: Verdict, keep_slot: bool) -> None:
        taken = sorted(p.name for p in self.aside.glob("[!.]*")) if self.aside.is_dir() else []
        if len(taken) - keep_slot >= ASIDE_LIMIT:
            raise GptpipeError(
                f"{self.stage}: {self.snapshot} holds an interrupted run of other params "
                f"({verdict.why}), and {self.aside} already keeps {len(taken)} runs set aside "
                f"({', '.join(taken)}), the most gptpipe keeps; delete those you no longer "
                f"need (rm -r {self.aside}/<id>) and run again")
        if verdict.kind == "damaged":
            number = 1 + max((int(n.rsplit("-", 1)[1]) for n in taken
                              if n.startswith("damaged-") and n.rsplit("-", 1)[1].isdigit()),
                             default=0)
            name, what = f"damaged-{number}", f"is damaged ({verdict.why})"
        else:
            theirs = RunId.from_json(held.info.get("run"))
            name = (theirs.digest if theirs else uuid.uuid4().hex)[:12]
            what = (f"(step {held.step} of {held.info.get('total_steps', '?')}) is of another "
                    f"run ({verdict.why})")
        (self.aside / name).mkdir(parents=True, exist_ok=True)
        for entry in (LEGACY_BEST, SNAPSHOT):  # the snapshot last: it marks the move done
            if (self.path / entry).exists():
                _remove(self.aside / name / entry)
                os.replace(self.path / entry, self.aside / name / entry)
        undo = "setting those params back resumes it, " if verdict.kind == "other" else ""
        self._say(f"the snapshot in {self.path} {what}: set aside in {self.aside / name}; "
                  f"{undo}rm -r {self.aside / name} discards it; starting afresh")

    def save(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write the snapshot (tensors by file name; info without the run's own keys)."""
        if not self.writer:
            return
        write_state(self.snapshot, tensors, {
            **info, "run": self.run.to_json(), "settings": self.settings,
            "machine": self.machine, "total_steps": self.total_steps})

    def adopt(self, files: dict[str, bytes]) -> None:
        """Make this folder hold another machine's snapshot (its files' bytes)."""
        if self.writer:
            write_folder_files(self.snapshot, files)
