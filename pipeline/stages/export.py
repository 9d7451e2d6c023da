"""export: write a model folder as a Hugging Face Transformers folder.

Reads:   --model (models/pretrain/best, models/rlhf/best: a gptpipe model folder with its
         tokenizer)
Params:  export (the dtype of the written weights)
Writes:  --out (models/hf/pretrain, models/hf/rlhf): config.json (LlamaForCausalLM for
         rotary + RMSNorm + SwiGLU, GPT2LMHeadModel for learned + LayerNorm + GELU),
         generation_config.json, model.safetensors, and the tokenizer as a
         PreTrainedTokenizerFast: tokenizer.json (which puts <bos> first, as gptpipe
         does), tokenizer_config.json and special_tokens_map.json (<bos> <eos> <pad>
         <unk>). ``AutoModelForCausalLM.from_pretrained(out)`` and
         ``AutoTokenizer.from_pretrained(out)`` load it; its logits are gptpipe's.

Any other mix of positions, norm and mlp, a reward model or a folder that is not a model
is refused with one line before anything is written. Conversion is gptpipe's own
(pipeline/lm/hf.py): the stage needs no transformers package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.lm.checkpoint import load_model, open_model_folder
from pipeline.lm.hf import architecture, write_transformers_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(params: Params, *, model: Path, out: Path) -> dict:
    """Convert the ``model`` folder into the Transformers folder ``out``."""
    config, meta, tokenizer = open_model_folder(model)
    if meta.get("kind") is not None:  # a reward model: a GPT body under a scalar head
        raise GptpipeError(f"{model}: a model of kind {meta['kind']!r}; allowed: a language "
                           "model folder (models/pretrain/best, models/rlhf/best)")
    arch = architecture(config)  # refuses a mix no Transformers class computes, first
    network, _ = load_model(model)
    dtype = DTYPES[params.export.dtype]
    with atomic_dir(out) as tmp:
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
