"""export: write a gptpipe language model as a Hugging Face Transformers folder with its
model card.

Reads:   --model (models/pretrain/best, models/rlhf/best: a gptpipe model folder with its
         tokenizer); for the card, each --results file (the run's metrics files:
         metrics/pretrain.json and metrics/evaluate.json, or metrics/rlhf.json and
         metrics/evaluate_rlhf.json), --data (metrics/tokenize.json: documents, tokens
         and bytes per split) and the data.corpus pointer; all optional
Params:  export (the dtype of the written weights); for the card, data (the corpus),
         model and train, and sft and rlhf for an RLHF-tuned model
Writes:  --out (models/hf/pretrain, models/hf/rlhf): config.json, generation_config.json,
         model.safetensors, tokenizer.json, tokenizer_config.json,
         special_tokens_map.json and README.md, the model card in the Hub's format
         (pipeline/lm/model_card.py). AutoModelForCausalLM.from_pretrained(out) and
         AutoTokenizer.from_pretrained(out) load it; its logits are gptpipe's.

Rotary + RMSNorm + SwiGLU becomes a LlamaForCausalLM, learned positions + LayerNorm +
GELU a GPT2LMHeadModel; any other mix, a reward model or a folder that is not a model is
refused with one line before anything is written. The conversion is gptpipe's own
(pipeline/lm/hf.py): the stage needs no transformers package. Run by hand (an --out that
no stage of ./dvc.yaml declares), the card says what the model folder records and the
files it is given, and names what is not known (the corpus, the params, the figures).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
import torch
import yaml

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_text
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.lm.folder import ModelFolder
from pipeline.lm.hf import TRANSFORMERS_FILES, architecture, write_transformers_folder
from pipeline.lm.model_card import CARD, CardInputs, corpus_of, model_card, read_figures

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(params: Params, *, model: Path, out: Path, results: tuple[Path, ...] = (),
        data: Path | None = None) -> dict:
    """Convert the ``model`` folder into the Transformers folder ``out``, with its card."""
    folder = ModelFolder.open(model)
    tokenizer = folder.tokenizer()
    if folder.meta.get("kind") is not None:  # a reward model: a GPT body under a scalar head
        raise GptpipeError(f"{model}: a model of kind {folder.meta['kind']!r}; allowed: a "
                           "language model folder (models/pretrain/best, models/rlhf/best)")
    arch = architecture(folder.config)  # refuses a mix no Transformers class computes, first
    network = folder.load_model()
    parameters = network.num_parameters()
    # The card's inputs are read (and refused) before anything is written.
    card = model_card(_card_inputs(params, folder, parameters, Path(out), arch, results,
                                   data))
    dtype = DTYPES[params.export.dtype]
    # The names are known up front: a folder holding anything else is refused before the
    # conversion, not after it.
    with atomic_dir(out, writes=(*TRANSFORMERS_FILES, CARD)) as tmp:
        write_transformers_folder(tmp, network, tokenizer, dtype)
        write_text(tmp / CARD, card)
    say("export", f"{model} -> {out}: {arch}, {parameters / 1e6:.2f}M parameters, "
                  f"{params.export.dtype}")
    return {"architecture": arch, "parameters": parameters, "dtype": params.export.dtype}


def _card_inputs(params: Params, folder: ModelFolder, parameters: int, out: Path, arch: str,
                 results: tuple[Path, ...], data: Path | None) -> CardInputs:
    """What the card of ``folder`` exported to ``out`` shows, read from the files given.
    The corpus and the params are the model's only when a stage of ./dvc.yaml writes
    ``out`` (DVC ran the whole chain with them); an export by hand reports what the model
    folder records, and the files it is given."""
    reproduce = _reproduce(out)
    sections = [] if reproduce is None else ["model", "train"]
    if sections and "rlhf_algo" in folder.meta:  # the policy was tuned from the SFT model
        sections += ["sft", "rlhf"]
    counts = read_figures([data]).popitem()[1] if data is not None else None
    return CardInputs(
        name=out.name, architecture=arch, parameters=parameters,
        dtype=params.export.dtype, config=folder.config.to_dict(),
        records={key: value for key, value in folder.meta.items() if key != "model"},
        params={name: asdict(getattr(params, name)) for name in sections},
        figures=read_figures(results), data=counts,
        corpus=None if reproduce is None else corpus_of(params.data.corpus),
        reproduce=reproduce)


def _reproduce(out: Path) -> str | None:
    """``dvc repro <stage>`` for the stage of ./dvc.yaml that declares ``out``; None for an
    export run by hand (no such stage)."""
    try:
        document = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    stages = document.get("stages") if isinstance(document, dict) else None
    for name, stage in stages.items() if isinstance(stages, dict) else ():
        outs = stage.get("outs") if isinstance(stage, dict) else None
        for entry in outs if isinstance(outs, list) else []:
            # An out is its path, or a mapping of its path to its options.
            path = next(iter(entry), None) if isinstance(entry, dict) else entry
            if path == out.as_posix():
                return f"dvc repro {name}"
    return None


main = stage_command(
    "export", run,
    model="The gptpipe model folder to export (weights, gptpipe.json, tokenizer.json).",
    out="The Transformers folder to write (models/hf/pretrain).",
)
# The card's inputs: optional, so an export by hand needs only --model and --out.
main.params += [
    click.Option(["--results", "results"], multiple=True, type=click.Path(path_type=Path),
                 help="A metrics file of the run whose figures the model card reports "
                      "(metrics/evaluate.json); repeat it for several."),
    click.Option(["--data", "data"], type=click.Path(path_type=Path), default=None,
                 help="The tokenize metrics (metrics/tokenize.json): documents, tokens and "
                      "bytes per split, for the model card."),
]
