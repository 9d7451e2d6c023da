"""The files of a training snapshot: tensors in safetensors, everything else in JSON.

A snapshot folder holds ``state.safetensors`` (the weights as ``model.<name>``, the
optimizer's per-parameter tensors as ``optim.<index>.<slot>``, generator states as
``rng.<name>``) and ``state.json`` (the step, the data position, the optimizer's scalars
and param groups, and whatever else the loop needs). No snapshot file is ever unpickled:
a distributed run passes a snapshot's file bytes between its own processes.

The best-weights folder of a run (:class:`pipeline.core.runs.BestWeights`) uses the same
two names: ``state.safetensors`` (a state dict) and ``state.json`` (its step and run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import MAX_JSON_BYTES, atomic_dir, check_size, parse_json, sha256_file
from pipeline.core.weights import load_state, load_tensors, save_tensors, unique_state

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


# --------------------------------------------------------------------------- optimizer


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


# --------------------------------------------------------------------------- the files


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def snapshot_tensors(module: nn.Module, optimizer: torch.optim.Optimizer,
                     rng: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of a snapshot by its file name, the optimizer's JSON half)."""
    tensors = {f"model.{k}": v.cpu() for k, v in unique_state(module).items()}
    optim_tensors, optim_info = _flatten_optimizer(optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()})
    return tensors, optim_info


def save_training_state(directory: str | Path, module: nn.Module,
                        optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                        info: dict[str, Any]) -> None:
    """Write a snapshot atomically. ``rng``: name -> state tensor (uint8)."""
    tensors, optim_info = snapshot_tensors(module, optimizer, rng)
    write_state(directory, tensors, {**info, "optimizer": optim_info})


def write_state(directory: str | Path, tensors: dict[str, torch.Tensor],
                info: dict[str, Any]) -> None:
    """``state.safetensors`` and ``state.json`` in ``directory``, atomically; the JSON
    records the tensor file's sha256 (``tensors_sha256``), so that damage done to it
    later is found before anything is loaded from it."""
    with atomic_dir(directory) as tmp:
        save_tensors(tensors, tmp / STATE_TENSORS)
        body = {**info, "tensors_sha256": sha256_file(tmp / STATE_TENSORS)}
        (tmp / STATE_JSON).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def parse_info(data: bytes, where: str | Path) -> dict[str, Any]:
    """A ``state.json``'s object; one line naming ``where`` when it is not one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GptpipeError(f"{where}: unreadable snapshot (not UTF-8)") from None
    info = parse_json(text, str(where))
    if not isinstance(info, dict):
        raise GptpipeError(f"{where}: unreadable snapshot (not a JSON object)")
    return info


def parse_tensors(data: bytes, where: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``state.safetensors`` file's bytes; one line when damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise GptpipeError(f"{where}: damaged ({err})") from None


def read_training_info(directory: str | Path) -> dict[str, Any] | None:
    """The JSON half of a snapshot; None when there is no complete one."""
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    check_size(directory / STATE_JSON, MAX_JSON_BYTES, "snapshot")
    return parse_info((directory / STATE_JSON).read_bytes(), directory / STATE_JSON)


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
        tensors = parse_tensors(tensors, where)
    info = dict(info)
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    load_state(module, weights, f"{where}: the weights do not match the model")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info.pop("optimizer")))
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, info


# ----------------------------------------------------------------------- folder bytes


def folder_files(directory: Path) -> dict[str, bytes] | None:
    """Every file of a flat folder, name -> bytes; None when there is no such folder."""
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def write_folder_files(directory: Path, files: dict[str, bytes]) -> None:
    """Make ``directory`` hold exactly ``files``, atomically."""
    with atomic_dir(directory) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
