"""The stage contract: how each module of ``pipeline/stages/`` becomes a command.

Every stage module defines

    def run(params: Params, *, <one keyword per path>) -> dict:   # returns its metrics
    main = stage_command("name", run, <path option> = "help", ...)

The module's docstring is the command's help, its one source: its first sentence (after
``name:``) is the line ``gptpipe --help`` lists, the whole docstring is what
``gptpipe <name> --help`` prints (:func:`command_help`).

``run`` gets the whole validated params file (a stage reads its own sections) and its
paths as keyword arguments named after the command-line options (``--prompts-from`` is
``prompts_from``), so a test calls ``run`` exactly as the command does. The command adds
``--params``, loads and validates the params once, sweeps the temporaries that killed
writers left beside the declared outputs, and calls ``run``. Stages report with
:func:`say` ("stage: message" on stdout); progress bars go to stderr; errors are one
:class:`~pipeline.core.errors.GptpipeError` line on stderr, exit 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.core.io import declared_outputs, sweep_dead_temporaries
from pipeline.core.params import load_params

# The path options several stages share, with their help, declared once.
COMMON_HELP = {
    "input": "The document tables this stage reads (see the stage's description).",
    "out": "The output this stage writes (a folder or a file, see the description).",
    "metrics": "The JSON metrics file to write (metrics/<stage>.json).",
    "tokens": "The token shards written by gptpipe tokenize (data/tokens).",
    "tokenizer": "The tokenizer JSON written by gptpipe vocab (data/vocab/tokenizer.json).",
    "model": "A model checkpoint folder (models/pretrain/best): weights, config, tokenizer.",
    "checkpoint": "The run folder of resumable snapshots, kept between runs "
                  "(checkpoints/<stage>).",
    "live": "The dvclive folder for the per-step plots (dvclive/<stage>).",
    "pairs": "The preference pairs written by gptpipe preferences (data/preferences).",
}


def say(stage: str, message: str) -> None:
    """A stage's report line, ``stage: message``, on stdout at once."""
    print(f"{stage}: {message}", flush=True)


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _plain(text: str) -> str:
    """Docstring markup as terminal text: ``x`` -> x, :func:`~a.b.c` -> c."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~")
                     else m.group(1), text)
    return text.replace("``", "")


def command_help(name: str, doc: str | None) -> tuple[str, str]:
    """(short help, full help) of a command from its module docstring, the one source of
    both. The short help is the first sentence without its ``name:`` lead (or ``The
    ``name`` stage:``), capitalized; the full help is the docstring with its line breaks
    kept (click's ``\\b`` marks each paragraph) and its markup made plain."""
    doc = (doc or "").strip()
    if not doc:
        raise ValueError(f"command {name!r} has no module docstring to take its help from")
    first = doc.split("\n\n", 1)[0].replace("\n", " ")
    for lead in (f"{name}:", f"The ``{name}`` stage:", f"The ``{name}`` command:"):
        if first.startswith(lead):
            first = first[len(lead):].strip()
            break
    sentence = re.split(r"(?<=\.)\s", first, maxsplit=1)[0].rstrip(".")
    short = _plain(sentence[:1].upper() + sentence[1:]) + "."
    paragraphs = [para for para in doc.split("\n\n") if para.strip()]
    full = "\n\n".join("\b\n" + _plain(para) for para in paragraphs)
    return short, full


def stage_command(name: str, run: Callable[..., Any], **paths: str) -> click.Command:
    """The click command of a stage: ``--params`` and one required path option per
    entry of ``paths`` (keyword -> help; an empty help takes :data:`COMMON_HELP`'s). Its
    help is the docstring of ``run``'s module (:func:`command_help`)."""
    short_help, full_help = command_help(name, sys.modules[run.__module__].__doc__)

    def command(params: Path, **kwargs: Path) -> None:
        # One process per machine sweeps (torchrun starts several with the same outputs).
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            sweep_dead_temporaries(output_folders(Path("dvc.yaml")))
        run(load_params(params), **kwargs)

    options = [click.Option(["--params"], required=True, type=click.Path(path_type=Path),
                            help="The params.yaml to read (validated before anything runs).")]
    for keyword, text in paths.items():
        flag = "--" + keyword.replace("_", "-")
        options.append(click.Option([flag, keyword], required=True,
                                    type=click.Path(path_type=Path),
                                    help=text or COMMON_HELP[keyword]))
    return click.Command(name, callback=command, params=options, help=full_help,
                         short_help=short_help)


def output_folders(dvc_yaml: Path) -> list[Path]:
    """The folders a killed stage may have left a temporary in: each declared output's
    parent, and the output itself when it is a folder (a training snapshot lives inside
    its run folder). Empty without a dvc.yaml (a stage run by hand elsewhere)."""
    folders: dict[Path, None] = {}
    for out in declared_outputs(dvc_yaml):
        folders[out.parent] = None
        folders[out] = None
    return list(folders)

