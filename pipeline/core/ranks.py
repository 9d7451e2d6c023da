"""The collectives of a run on several processes: one answer from each, or one from the
newest.

A distributed run keeps one run folder per machine (each machine's first process writes
it, on its own disk: no shared file system is needed, and a torchrun rendezvous may hand
global rank 0 to any machine after a restart). After a kill the machines may hold
snapshots of different steps, or one machine none at all (a replaced one): every machine
decides for its own folder, then the process holding the newest snapshot sends its files
to all, so every process continues from the same step and every machine keeps the whole
run. Everything here is a collective: every process calls it at the same point.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline.core.device import Runtime, together
from pipeline.core.errors import GptpipeError
from pipeline.core.run_folder import WRITER_MARK, check_run_folder
from pipeline.core.stage import say


def gather(runtime: Runtime, value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-like), by global rank."""
    if not runtime.distributed:
        return [value]
    found: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(found, value)
    return found


def check_same_run(runtime: Runtime, stage: str, identity: Any) -> None:
    """Stop every process with one line unless every one runs process 0's run: the same
    ``identity`` (JSON: the run's params, input bytes, code, precision, settings)."""
    mine = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    found = gather(runtime, mine)
    odd = [rank for rank, digest in enumerate(found) if digest != found[0]]
    if odd:
        raise GptpipeError(
            f"{stage}: process {odd[0]} of {runtime.world_size} runs another run than "
            "process 0: its machine's params, token data, gptpipe code or resolved "
            f"train.dtype differ (fingerprint {str(found[odd[0]])[:12]} against "
            f"{str(found[0])[:12]}); give every machine the same commit, params.yaml, "
            "data (dvc pull) and kind of device"
        )


def newest_snapshot(runtime: Runtime, stage: str, mine: dict[str, bytes] | None,
                    step: int | None, adopt: Any) -> dict[str, bytes] | None:
    """The files of the newest snapshot any machine holds (``mine``, of ``step``: what
    this process's own folder decided to resume; None on the others), sent to every
    process; ``adopt(files)`` makes this machine's folder hold them when it held another
    step or none. None when no machine holds one."""
    steps = gather(runtime, step)
    holders = [rank for rank, held in enumerate(steps) if held is not None]
    if not holders:
        return None
    source = max(holders, key=lambda rank: (steps[rank], -rank))
    if not runtime.distributed:
        return mine
    payload = [mine if runtime.rank == source else None]
    dist.broadcast_object_list(payload, src=source)
    files = payload[0]
    behind = runtime.rank != source and runtime.writes_files and step != steps[source]
    if behind:
        have = "none" if step is None else f"one of step {step}"
        say(stage, f"this machine's checkpoint folder holds {have}: continuing from step "
                   f"{steps[source]} with process {source}'s snapshot")
    together(runtime, lambda: adopt(files) if behind else None)
    return files


def one_writer_per_folder(runtime: Runtime, folder: Path) -> Runtime:
    """``runtime`` with ``writes_files`` kept by one process per distinct ``folder``,
    after each writer checked that its folder is a run folder (:func:`check_run_folder`).

    Each machine's first process writes its own run folder, unless machines share it (a
    checkout on a network file system): then only the lowest-ranked of them writes, as
    two writers of one folder would replace each other's files. Found out by every
    writer leaving a mark in the folder, looking at whose marks it sees, and removing
    its own.
    """
    together(runtime, lambda: check_run_folder(folder) if runtime.writes_files else None)
    if not runtime.distributed:
        return runtime
    mark = folder / f"{WRITER_MARK}{uuid.uuid4().hex}"

    def leave() -> None:
        if runtime.writes_files:
            folder.mkdir(parents=True, exist_ok=True)
            mark.touch()

    together(runtime, leave)
    seen = together(runtime, lambda: sorted(p.name for p in folder.glob(f"{WRITER_MARK}*"))
                    if runtime.writes_files else [])
    marks: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(marks, mark.name if runtime.writes_files else None)
    together(runtime, lambda: mark.unlink(missing_ok=True))
    sharing = [rank for rank, name in enumerate(marks) if name is not None and name in seen]
    return replace(runtime, writes_files=runtime.writes_files and min(sharing) == runtime.rank)
