"""Model checkpoints as safetensors + JSON: nothing here ever unpickles a file.

A model checkpoint directory (``models/pretrain/best``) holds ``model.safetensors``,
``config.json`` (the GPTConfig plus provenance) and ``tokenizer.json``; it loads with
nothing else. It is written under a temporary name and renamed into place when complete.
The resumable training state of a run is :mod:`pipeline.core.runs`'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, load_tensors, save_tensors, unique_state
from pipeline.data.tokenizer import MadeWith, TextTokenizer, load_tokenizer, require_tokenizer
from pipeline.lm.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptpipeError(f"{path}: missing; a checkpoint directory needs {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptpipeError(f"{path}: not valid JSON ({err})") from None


def write_model_files(
    directory: Path, model: nn.Module, config: GPTConfig, meta: dict[str, Any],
    tokenizer_path: Path | None,
) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_tensors(unique_state(model), directory / WEIGHTS, {"format": "pt"})
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
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise GptpipeError(f"{directory / CONFIG}: not a gptpipe model config (no 'model' "
                           "object)")
    return GPTConfig.from_dict(raw["model"], str(directory / CONFIG)), raw


def made_with(directory: str | Path, config: GPTConfig, meta: dict[str, Any]) -> MadeWith:
    """What a model's config.json records of its tokenizer (for ``require_tokenizer``)."""
    return MadeWith("the model was", Path(directory) / CONFIG, meta.get("tokenizer_sha256"),
                    config.vocab_size)


def open_model_folder(directory: str | Path, tokenizer_path: str | Path | None = None
                      ) -> tuple[GPTConfig, dict[str, Any], TextTokenizer]:
    """A model folder's config, its config.json and its tokenizer (``tokenizer.json``
    inside it, or ``tokenizer_path``), checked to belong together before any weight is
    loaded."""
    directory = Path(directory)
    config, meta = read_config(directory)
    path = Path(tokenizer_path) if tokenizer_path is not None else directory / TOKENIZER
    if not path.is_file():
        raise GptpipeError(f"{path}: missing; a model folder holds the tokenizer it was "
                           "trained with (tokenizer.json)")
    tokenizer = load_tokenizer(path)
    require_tokenizer(tokenizer, made_with(directory, config, meta))
    return config, meta, tokenizer


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the GPT from ``config.json`` and load ``model.safetensors`` into it."""
    directory = Path(directory)
    config, meta = read_config(directory)
    model = GPT(config)
    state = load_tensors(directory / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptpipeError(f"{directory / WEIGHTS}: weights do not match config.json ({problem})")
    return model.to(device), meta
