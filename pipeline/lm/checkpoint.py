"""Model checkpoints as safetensors + JSON: nothing here ever unpickles a file.

A model checkpoint directory (``models/pretrain/best``) holds ``model.safetensors``,
``gptpipe.json`` (the GPTConfig plus provenance) and ``tokenizer.json``; it loads with
nothing else. It is written under a temporary name and renamed into place when complete.
The resumable training state of a run is :mod:`pipeline.core.runs`'s.

Every reader here also takes the two other kinds of model folder: one written before the
config was renamed (its ``config.json`` holds a "model" object), and a Hugging Face
Transformers folder (``config.json`` of a Llama or a GPT-2, as ``gptpipe export`` writes;
:mod:`pipeline.lm.hf` converts it in memory). The config is not named ``config.json``
because that name is Transformers': a gptpipe folder is then never mistaken for one.
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
from pipeline.core.io import atomic_dir, load_tensors, read_json, save_tensors, unique_state
from pipeline.data.tokenizer import MadeWith, TextTokenizer, load_tokenizer, require_tokenizer
from pipeline.lm.hf import (
    HF_CONFIG,
    HF_WEIGHTS_INDEX,
    is_transformers_config,
    load_transformers_weights,
    read_transformers_config,
    read_transformers_tokenizer,
)
from pipeline.lm.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "gptpipe.json"
# gptpipe's config before it was renamed, and a Transformers folder's config.
LEGACY_CONFIG = HF_CONFIG
TOKENIZER = "tokenizer.json"


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path)


def config_file(directory: str | Path) -> Path:
    """The file a model folder's config is read from: gptpipe.json, else config.json (a
    folder written before the rename, or a Transformers folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GptpipeError(f"{directory}: checkpoint directory not found")
    for name in (CONFIG, LEGACY_CONFIG):
        if (directory / name).is_file():
            return directory / name
    raise GptpipeError(f"{directory / CONFIG}: missing; a model folder holds {CONFIG} (a "
                       f"gptpipe model) or {LEGACY_CONFIG} (a Transformers model)")


def is_transformers_folder(directory: str | Path) -> bool:
    """Whether ``directory`` is a Transformers folder rather than a gptpipe model folder."""
    path = config_file(directory)
    return path.name == LEGACY_CONFIG and is_transformers_config(_read_json(path))


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
    """A model folder's GPTConfig and its config file's contents (a Transformers folder:
    what gptpipe records of it, the architecture)."""
    directory = Path(directory)
    path = config_file(directory)
    raw = _read_json(path)
    if path.name == LEGACY_CONFIG and is_transformers_config(raw):
        return read_transformers_config(directory, raw)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise GptpipeError(f"{path}: not a gptpipe model config (no 'model' object)")
    return GPTConfig.from_dict(raw["model"], str(path)), raw


def made_with(directory: str | Path, config: GPTConfig, meta: dict[str, Any]) -> MadeWith:
    """What a model's config records of its tokenizer (for ``require_tokenizer``)."""
    return MadeWith("the model was", config_file(directory), meta.get("tokenizer_sha256"),
                    config.vocab_size)


def open_model_folder(directory: str | Path, tokenizer_path: str | Path | None = None
                      ) -> tuple[GPTConfig, dict[str, Any], TextTokenizer]:
    """A model folder's config, its config.json and its tokenizer (``tokenizer.json``
    inside it, or ``tokenizer_path``), checked to belong together before any weight is
    loaded."""
    directory = Path(directory)
    config, meta = read_config(directory)
    if tokenizer_path is None and is_transformers_folder(directory):
        tokenizer = read_transformers_tokenizer(directory)
    else:
        path = Path(tokenizer_path) if tokenizer_path is not None else directory / TOKENIZER
        if not path.is_file():
            raise GptpipeError(f"{path}: missing; a model folder holds the tokenizer it was "
                               "trained with (tokenizer.json)")
        tokenizer = load_tokenizer(path)
    require_tokenizer(tokenizer, made_with(directory, config, meta))
    return config, meta, tokenizer


def load_weights(model: GPT, directory: str | Path) -> None:
    """Load a model folder's weights into ``model`` (built from its config)."""
    directory = Path(directory)
    if is_transformers_folder(directory):
        load_transformers_weights(model, directory)
        return
    path = directory / WEIGHTS
    state = load_tensors(path)
    tied = set(model.state_dict()) - set(unique_state(model))
    where = config_file(directory).name
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        problem = str(err).strip().splitlines()[-1].strip()
        raise GptpipeError(f"{path}: weights do not match {where} ({problem})") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptpipeError(f"{path}: weights do not match {where} ({problem})")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the GPT from the folder's config and load its weights into it."""
    config, meta = read_config(directory)
    model = GPT(config)
    load_weights(model, directory)
    return model.to(device), meta


# ------------------------------------------------------------------- continued training

RANDOM_INIT = "random"
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
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raw = None
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
