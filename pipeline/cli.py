"""The ``gptpipe`` command: one subcommand per DVC stage, each defined in its own module.

Stage modules are imported only when their subcommand runs, so ``gptpipe --help`` and a
cheap stage start fast without loading torch or pyarrow.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path

import click

from pipeline.core.stage import command_help

# subcommand -> module that defines ``main`` (a click command), in pipeline order.
COMMANDS: dict[str, str] = {
    "ingest": "pipeline.stages.ingest",
    "clean": "pipeline.stages.clean",
    "split": "pipeline.stages.split",
    "contamination": "pipeline.stages.contamination",
    "vocab": "pipeline.stages.vocab",
    "tokenize": "pipeline.stages.tokenize",
    "pretrain": "pipeline.stages.pretrain",
    "evaluate": "pipeline.stages.evaluate",
    "preferences": "pipeline.stages.preferences",
    "reward": "pipeline.stages.reward",
    "sft": "pipeline.stages.sft",
    "rlhf": "pipeline.stages.rlhf",
    "export": "pipeline.stages.export",
    "compare": "pipeline.compare.command",
    "lm-eval-tasks": "pipeline.lm.lm_eval_tasks",
    "generate": "pipeline.lm.generate",
}

def short_help(name: str) -> str:
    """The one-line help of a subcommand, read from its module's docstring without
    importing the module (which would load torch): the same text its own --help shows."""
    spec = importlib.util.find_spec(COMMANDS[name])
    source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    return command_help(name, ast.get_docstring(ast.parse(source)))[0]


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
        rows = [(name, short_help(name)) for name in COMMANDS]
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
