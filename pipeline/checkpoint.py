"""Checkpoints as safetensors + JSON: nothing here ever unpickles a file.

Two kinds:
- A **model checkpoint** directory (``models/pretrain/best``): ``model.safetensors``,
  ``config.json`` (the GPTConfig plus provenance) and ``tokenizer.json``; it loads with
  nothing else.
- A **training state** directory (the resumable checkpoint): ``state.safetensors``
  holds the model, the optimizer moments and every RNG state as tensors;
  ``state.json`` holds the step, the schedule position, the sampler position and a
  fingerprint of what the run depends on, so a stale checkpoint is never resumed.

Both are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import GptpipeError
from pipeline.io import atomic_dir
from pipeline.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the tied output matrix (safetensors refuses shared storage);
    loading re-ties it."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    state.pop("lm_head.weight", None)
    state.pop("body.lm_head.weight", None)
    return state


def safe_load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle: a planted one is refused)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise GptpipeError(
            f"{path}: not a readable safetensors file ({err}); gptpipe never loads pickles"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptpipeError(f"{path}: missing; a checkpoint directory needs {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptpipeError(f"{path}: not valid JSON ({err})") from None


def _save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """save_file, with its write errors as OSError so atomic_dir reports them in one line
    (safetensors raises its own SafetensorError, e.g. on a full disk)."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        full = "No space" in str(err) or "os error 28" in str(err)
        raise OSError(errno.ENOSPC if full else errno.EIO, str(err)) from None


def write_model_files(
    directory: Path, model: nn.Module, config: GPTConfig, meta: dict[str, Any],
    tokenizer_path: Path | None,
) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    _save_tensors(_unique_state(model), directory / WEIGHTS, {"format": "pt"})
    body = {"model": config.to_dict(), **meta}
    (directory / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER)


def save_model(
    directory: str | Path, model: nn.Module, config: GPTConfig, meta: dict[str, Any],
    tokenizer_path: Path | None = None,
) -> None:
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, config, meta, tokenizer_path)


def read_config(directory: str | Path) -> tuple[GPTConfig, dict[str, Any]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise GptpipeError(f"{directory}: checkpoint directory not found")
    raw = _read_json(directory / CONFIG)
    try:
        config = GPTConfig.from_dict(raw["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise GptpipeError(f"{directory / CONFIG}: not a gptpipe model config ({err})") from None
    return config, raw


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the GPT from ``config.json`` and load ``model.safetensors`` into it."""
    directory = Path(directory)
    config, meta = read_config(directory)
    model = GPT(config)
    state = safe_load(directory / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptpipeError(f"{directory / WEIGHTS}: weights do not match config.json ({problem})")
    return model.to(device), meta


# ----------------------------------------------------------------- training state


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


def save_training_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    info: dict[str, Any],
) -> None:
    """Write a resumable snapshot atomically. ``rng``: name -> uint8 state tensor."""
    tensors = {f"model.{k}": v.cpu() for k, v in _unique_state(model).items()}
    optim_tensors, optim_info = _flatten_optimizer(optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()})
    with atomic_dir(directory) as tmp:
        _save_tensors(tensors, tmp / STATE_TENSORS)
        body = {**info, "optimizer": optim_info}
        (tmp / STATE_JSON).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_training_info(directory: str | Path) -> dict[str, Any] | None:
    """The JSON half of a training state, or None when there is no complete snapshot."""
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    return _read_json(directory / STATE_JSON)


def load_training_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model and optimizer in place; return (rng states, info)."""
    directory = Path(directory)
    info = _read_json(directory / STATE_JSON)
    tensors = safe_load(directory / STATE_TENSORS)
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise GptpipeError(f"{directory}: training state does not match the model")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info.pop("optimizer")))
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, info
