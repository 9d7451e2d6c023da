"""The ``generate`` command: continue a prompt with a trained model (not a stage), streaming
to stdout.

PROMPT '-' (or no PROMPT with piped stdin) reads the prompt from stdin; no PROMPT at a
terminal starts from <bos> alone.

Not a DVC stage: it writes nothing and reads a model checkpoint directory
(``models/pretrain/best``: ``model.safetensors``, ``gptpipe.json``, ``tokenizer.json``), or
a Transformers folder that ``gptpipe export`` wrote (``models/hf/pretrain``).

    gptpipe generate --model models/pretrain/best "The river"
    echo "The river" | gptpipe generate --model models/pretrain/best --seed 3
    gptpipe generate --model models/pretrain/best --temperature 0   # greedy, from <bos>

The prompt is printed, then the continuation token by token, then a newline. Before the
weights are loaded, the tokenizer is checked against the model: same vocabulary size,
and the same file (sha256) as the one the model was trained with when gptpipe.json
records it, since a different tokenizer with the right size would give fluent nonsense.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import click
import torch

from pipeline.core.device import pick_device
from pipeline.core.stage import command_help
from pipeline.lm.folder import ModelFolder
from pipeline.lm.sampling import SamplingConfig, StreamDecoder, encode_prompt, generate_ids


def read_prompt(argument: str | None, stdin: TextIO) -> str:
    """The prompt: the argument; stdin for ``-`` or when absent and stdin is piped;
    empty when absent at an interactive terminal (nothing to wait for).

    One trailing newline is dropped from stdin, since ``echo`` and editors add it and the
    user did not mean to prompt a new line.
    """
    if argument is not None and argument != "-":
        return argument
    if argument is None and stdin.isatty():
        return ""
    text = stdin.read()
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def unknown_message(kind: str, pieces: list[str]) -> str | None:
    """The one stderr line naming prompt pieces that became ``<unk>``, or None."""
    distinct = list(dict.fromkeys(pieces))  # first-seen order, each once
    if not distinct:
        return None
    unit = "characters" if kind == "char" else "words"
    if len(distinct) == 1:
        unit = unit[:-1]
        verb = "is"
    else:
        verb = "are"
    return (
        f"generate: {len(distinct)} prompt {unit} {verb} not in the vocabulary and became "
        f"<unk>: {', '.join(distinct)}"
    )


_SHORT_HELP, _HELP = command_help("generate", __doc__)


@click.command("generate", help=_HELP, short_help=_SHORT_HELP)
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint directory (model.safetensors, gptpipe.json, tokenizer.json), or a "
    "Transformers folder of a Llama or a GPT-2.",
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Tokenizer JSON  [default: MODEL/tokenizer.json]",
)
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="Softmax temperature; 0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True,
              help="Sample from the k most likely tokens; 0 is off.")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling mass; 1 is off.")
@click.option("--max-new-tokens", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
@click.option("--no-cache", is_flag=True,
              help="Recompute the whole window every token (slow; for checking the cache).")
@click.argument("prompt", required=False)
def main(
    model_dir: Path,
    tokenizer_path: Path | None,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    device: str,
    no_cache: bool,
    prompt: str | None,
) -> None:
    sampling = SamplingConfig(temperature, top_k, top_p, max_new_tokens)
    chosen = pick_device(device, key="--device")
    folder = ModelFolder.open(model_dir)
    tokenizer = folder.tokenizer(tokenizer_path)
    text = read_prompt(prompt, sys.stdin)
    prompt_ids, unknown = encode_prompt(tokenizer, text)
    message = unknown_message(tokenizer.kind, unknown)
    if message:
        click.echo(message, err=True)
    model = folder.load_model(chosen)
    generator = torch.Generator(chosen).manual_seed(seed)
    decoder = StreamDecoder(tokenizer, prompt_ids)
    click.echo(text, nl=False)  # click.echo flushes, so each piece shows as it comes
    for token in generate_ids(model, prompt_ids, sampling, generator, use_cache=not no_cache):
        piece = decoder.feed(token)
        if piece:
            click.echo(piece, nl=False)
    click.echo(decoder.flush())
