"""A model folder, opened once: its kind, config, tokenizer and weights.

Three kinds of folder hold a model that gptpipe can use, told apart once when it is opened
(:meth:`ModelFolder.open`), by the config file and what it holds:

- ``gptpipe``: ``gptpipe.json`` (the GPTConfig under "model", plus provenance),
  ``model.safetensors`` and ``tokenizer.json``, as every training stage writes them;
- ``older gptpipe``: the same with the config in ``config.json``, as written before the
  config was renamed (the name is Transformers': a gptpipe folder is no longer mistaken
  for one);
- ``transformers``: a Llama or a GPT-2 (Transformers' ``config.json``, safetensors, and
  the tokenizer as tokenizer.json), as ``gptpipe export`` writes it; :mod:`pipeline.lm.hf`
  converts its config and weights in memory.

Opening reads the config (the only parse of it); the tokenizer and the weights are read
when asked for, the tokenizer checked to be the model's before any weight is loaded.
Nothing here unpickles a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json
from pipeline.core.weights import load_state, load_tensors
from pipeline.data.tokenizer import MadeWith, TextTokenizer, load_tokenizer, require_tokenizer
from pipeline.lm.hf import (
    HF_CONFIG,
    is_transformers_config,
    load_transformers_weights,
    read_transformers_config,
    read_transformers_tokenizer,
    weight_files,
)
from pipeline.lm.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "gptpipe.json"
# gptpipe's config before it was renamed, and a Transformers folder's config.
LEGACY_CONFIG = HF_CONFIG
TOKENIZER = "tokenizer.json"
# The entries of a gptpipe model folder: what a new one may replace.
MODEL_FILES = (WEIGHTS, CONFIG, TOKENIZER)

GPTPIPE, OLDER_GPTPIPE, TRANSFORMERS = "gptpipe", "older gptpipe", "transformers"


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


@dataclass(frozen=True)
class ModelFolder:
    """A model folder whose kind and config are known. ``meta`` is the config file's
    contents (provenance: step, tokenizer_sha256, kind...) for a gptpipe folder, and what
    gptpipe records of a Transformers one (its architecture). ``weights``: the safetensors
    files that hold the weights (a Transformers folder may shard them)."""

    path: Path
    kind: str
    config_path: Path
    config: GPTConfig
    meta: dict[str, Any] = field(repr=False)
    weights: tuple[Path, ...]

    @classmethod
    def open(cls, directory: str | Path) -> ModelFolder:
        """Open ``directory``: its kind and config, or a one-line error naming the file."""
        directory = Path(directory)
        path = config_file(directory)
        raw = read_json(path)
        if path.name == LEGACY_CONFIG and is_transformers_config(raw):
            config, meta = read_transformers_config(directory, raw)
            return cls(directory, TRANSFORMERS, path, config, meta, weight_files(directory))
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise GptpipeError(f"{path}: not a gptpipe model config (no 'model' object)")
        kind = GPTPIPE if path.name == CONFIG else OLDER_GPTPIPE
        config = GPTConfig.from_dict(raw["model"], str(path))
        return cls(directory, kind, path, config, raw, (directory / WEIGHTS,))

    def made_with(self) -> MadeWith:
        """What the config records of the model's tokenizer (for ``require_tokenizer``)."""
        return MadeWith("the model was", self.config_path, self.meta.get("tokenizer_sha256"),
                        self.config.vocab_size)

    def tokenizer(self, path: str | Path | None = None) -> TextTokenizer:
        """The model's tokenizer (``tokenizer.json`` inside the folder, or ``path``),
        checked to be the one the model was trained with (size, and sha256 where the
        config records it) before any weight is loaded."""
        if path is None and self.kind == TRANSFORMERS:
            tokenizer = read_transformers_tokenizer(self.path)
        else:
            path = Path(path) if path is not None else self.path / TOKENIZER
            if not path.is_file():
                raise GptpipeError(f"{path}: missing; a model folder holds the tokenizer it "
                                   "was trained with (tokenizer.json)")
            tokenizer = load_tokenizer(path)
        require_tokenizer(tokenizer, self.made_with())
        return tokenizer

    def load_weights(self, model: nn.Module) -> None:
        """Load the folder's weights into ``model`` (built from :attr:`config`, or a module
        of the same tensors); a one-line error when they do not match the config."""
        if self.kind == TRANSFORMERS:
            load_transformers_weights(model, self.weights, self.path)
            return
        path = self.weights[0]
        load_state(model, load_tensors(path),
                   f"{path}: weights do not match {self.config_path.name}")

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        """The GPT built from the config, with the folder's weights, on ``device``."""
        model = GPT(self.config)
        self.load_weights(model)
        return model.to(device)
