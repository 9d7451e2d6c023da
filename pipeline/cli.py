"""The ``gptpipe`` command: one subcommand per DVC stage, each defined in its own module.

Stage modules are imported only when their subcommand runs, so ``gptpipe --help`` and a
cheap stage start fast without loading torch or pyarrow.
"""

from __future__ import annotations

import importlib
import os

import click

# subcommand -> module that defines ``main`` (a click command), in pipeline order.
COMMANDS: dict[str, str] = {
    "ingest": "pipeline.stages.ingest",
    "clean": "pipeline.stages.clean",
    "split": "pipeline.stages.split",
    "vocab": "pipeline.stages.vocab",
    "tokenize": "pipeline.stages.tokenize",
    "pretrain": "pipeline.stages.pretrain",
    "evaluate": "pipeline.stages.evaluate",
    "preferences": "pipeline.stages.preferences",
    "reward": "pipeline.stages.reward",
    "sft": "pipeline.stages.sft",
    "rlhf": "pipeline.stages.rlhf",
    "export": "pipeline.stages.export",
    "generate": "pipeline.lm.generate",
}

_SHORT_HELP = {
    "ingest": "Read the corpus named by data.corpus into a document table.",
    "clean": "Normalize, filter and deduplicate documents.",
    "split": "Assign each document to train/val/test by a hash of its text.",
    "vocab": "Learn a bpe, word or char tokenizer from the train split.",
    "tokenize": "Encode each split into Parquet token shards.",
    "pretrain": "Train the GPT on the token shards (CPU/GPU, torchrun, resumable).",
    "evaluate": "Score a model on every val/test token, with baselines; sample it.",
    "preferences": "Build (prompt, chosen, rejected) pairs: a JSONL file or the gold judge.",
    "reward": "Train the GPT reward model (Bradley-Terry) and a scikit-learn baseline.",
    "sft": "Fine-tune the pretrained model on prompt/response examples before RL.",
    "rlhf": "Tune the SFT policy (PPO, GRPO, RLOO, REINFORCE or DPO) on the chosen reward.",
    "export": "Write a model as a Hugging Face Transformers folder (Llama or GPT-2).",
    "generate": "Continue a prompt with a trained model (not a stage; streams to stdout).",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        return importlib.import_module(module).main

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SHORT_HELP.get(name, "")) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gptpipe")
def cli() -> None:
    """gptpipe: a reproducible pipeline from raw text to a pretrained GPT.

    Each subcommand is one stage of dvc.yaml; run the whole pipeline with `dvc repro`.
    """


def main() -> None:
    # DVC is driven from our tests and scripts; never send its usage analytics.
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    cli()


if __name__ == "__main__":
    main()
