"""export: write a gptpipe language model as a Hugging Face Transformers folder.

Reads:   --model (models/pretrain/best, models/rlhf/best: a gptpipe model folder with its
         tokenizer)
Params:  export (the dtype of the written weights)
Writes:  --out (models/hf/pretrain, models/hf/rlhf): config.json, generation_config.json,
         model.safetensors, tokenizer.json, tokenizer_config.json and
         special_tokens_map.json. AutoModelForCausalLM.from_pretrained(out) and
         AutoTokenizer.from_pretrained(out) load it; its logits are gptpipe's.

Rotary + RMSNorm + SwiGLU becomes a LlamaForCausalLM, learned positions + LayerNorm +
GELU a GPT2LMHeadModel; any other mix, a reward model or a folder that is not a model is
refused with one line before anything is written. The conversion is gptpipe's own
(pipeline/lm/hf.py): the stage needs no transformers package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.lm.folder import ModelFolder
from pipeline.lm.hf import TRANSFORMERS_FILES, architecture, write_transformers_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(params: Params, *, model: Path, out: Path) -> dict:
    """Convert the ``model`` folder into the Transformers folder ``out``."""
    folder = ModelFolder.open(model)
    tokenizer = folder.tokenizer()
    if folder.meta.get("kind") is not None:  # a reward model: a GPT body under a scalar head
        raise GptpipeError(f"{model}: a model of kind {folder.meta['kind']!r}; allowed: a "
                           "language model folder (models/pretrain/best, models/rlhf/best)")
    arch = architecture(folder.config)  # refuses a mix no Transformers class computes, first
    network = folder.load_model()
    dtype = DTYPES[params.export.dtype]
    # The names are known up front: a folder holding anything else is refused before the
    # conversion, not after it.
    with atomic_dir(out, writes=TRANSFORMERS_FILES) as tmp:
        write_transformers_folder(tmp, network, tokenizer, dtype)
    parameters = network.num_parameters()
    say("export", f"{model} -> {out}: {arch}, {parameters / 1e6:.2f}M parameters, "
                  f"{params.export.dtype}")
    return {"architecture": arch, "parameters": parameters, "dtype": params.export.dtype}


main = stage_command(
    "export", run,
    model="The gptpipe model folder to export (weights, gptpipe.json, tokenizer.json).",
    out="The Transformers folder to write (models/hf/pretrain).",
)
