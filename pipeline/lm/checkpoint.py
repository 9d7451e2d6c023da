"""Model checkpoints as safetensors + JSON: writing them, and choosing the base model
that pretraining continues. Nothing here ever unpickles a file.

A model checkpoint directory (``models/pretrain/best``) holds ``model.safetensors``,
``gptpipe.json`` (the GPTConfig plus provenance) and ``tokenizer.json``; it loads with
nothing else. It is written under a temporary name and renamed into place when complete.
Reading one (of any kind: gptpipe's, an older gptpipe's, a Transformers folder) is
:class:`pipeline.lm.folder.ModelFolder`'s; the functions below that read are the older
names for it, each opening the folder afresh (hold a ``ModelFolder`` to open it once).
The resumable training state of a run is :mod:`pipeline.core.runs`'s.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.weights import save_tensors, unique_state
from pipeline.data.tokenizer import TextTokenizer
from pipeline.lm.folder import (  # noqa: F401 - the names callers import from here
    CONFIG,
    MODEL_FILES,
    TOKENIZER,
    WEIGHTS,
    ModelFolder,
    config_file,
)
from pipeline.lm.hf import HF_WEIGHTS_INDEX
from pipeline.lm.model import GPT, GPTConfig


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
    with atomic_dir(directory, writes=MODEL_FILES) as tmp:
        write_model_files(tmp, model, config, meta, tokenizer_path)


# ------------------------------------------------- reading: ModelFolder under older names


def read_config(directory: str | Path) -> tuple[GPTConfig, dict[str, Any]]:
    """A model folder's GPTConfig and its config file's contents (a Transformers folder:
    what gptpipe records of it, the architecture)."""
    folder = ModelFolder.open(directory)
    return folder.config, folder.meta


def open_model_folder(directory: str | Path, tokenizer_path: str | Path | None = None
                      ) -> tuple[GPTConfig, dict[str, Any], TextTokenizer]:
    """A model folder's config, its config file's contents and its tokenizer
    (``tokenizer.json`` inside it, or ``tokenizer_path``), checked to belong together
    before any weight is loaded."""
    folder = ModelFolder.open(directory)
    return folder.config, folder.meta, folder.tokenizer(tokenizer_path)


def load_weights(model: nn.Module, directory: str | Path | ModelFolder) -> None:
    """Load a model folder's weights into ``model`` (built from its config)."""
    folder = directory if isinstance(directory, ModelFolder) else ModelFolder.open(directory)
    folder.load_weights(model)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the GPT from the folder's config and load its weights into it."""
    folder = ModelFolder.open(directory)
    return folder.load_model(device), folder.meta


# ------------------------------------------------------------------- continued training

RANDOM_INIT = "random"
_POINTER_BYTES = 4096
_PICKLES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl")


def base_model(init_from: str | Path) -> Path | None:
    """The model folder ``train.init_from`` names, or None for random weights (a pointer
    file holding ``kind: random``, such as data/builtin/random.init). A model folder is
    gptpipe's or a Transformers one (a Llama or a GPT-2 with its tokenizer.json, read in
    memory). Anything else is a one-line error naming the path and what is allowed;
    nothing is unpickled."""
    path = Path(init_from)
    allowed = ("allowed: a gptpipe model folder (models/pretrain/best of a run, copied out "
               "of the way), a local Transformers folder (LlamaForCausalLM or "
               "GPT2LMHeadModel, safetensors and tokenizer.json) or data/builtin/random.init")
    if path.is_file():
        raw = _pointer(path)
        if isinstance(raw, dict) and raw.get("kind") == RANDOM_INIT:
            return None
        raise GptpipeError(f"train.init_from = {init_from}: a file, not a model folder; "
                           f"{allowed}")
    if not path.is_dir():
        raise GptpipeError(f"train.init_from = {init_from}: not found; {allowed}")
    if not (path / WEIGHTS).is_file() and not (path / HF_WEIGHTS_INDEX).is_file():
        pickles = [name for name in _PICKLES if (path / name).is_file()]
        if pickles:
            raise GptpipeError(f"train.init_from = {init_from}: {pickles[0]} is a pickle, "
                               "and gptpipe never loads pickles (loading one runs code); "
                               f"{allowed}, weights in {WEIGHTS}")
        raise GptpipeError(f"train.init_from = {init_from}: no {WEIGHTS} in it; {allowed}")
    return path


def _pointer(path: Path) -> Any:
    """The YAML of a pointer file (a line or two), or None for anything else: a big file
    (a model file named by mistake) is not read, and deep YAML is no pointer either."""
    try:
        if path.stat().st_size > _POINTER_BYTES:
            return None
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None


def check_same_shape(init_from: str | Path, base: GPTConfig, wanted: GPTConfig) -> None:
    """Refuse to continue ``base`` (the model folder's config) as the network the params
    describe when any part of the shape differs (dropout, a training setting, may)."""
    for item in fields(GPTConfig):
        if item.name == "dropout":
            continue
        ours, theirs = getattr(wanted, item.name), getattr(base, item.name)
        if ours != theirs:
            key = "the data's vocabulary size" if item.name == "vocab_size" else (
                f"model.{item.name}")
            raise GptpipeError(
                f"train.init_from = {init_from}: the model has {item.name} = {theirs!r} but "
                f"{key} is {ours!r}; set the model section to the base model's shape "
                "(a continued model keeps its shape and, with vocab.kind: from_model, its "
                "vocabulary)"
            )
