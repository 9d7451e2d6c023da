"""The stage contract: how each module of ``pipeline/stages/`` becomes a command.

Every stage module defines

    def run(params: Params, *, <one keyword per path>) -> dict:   # returns its metrics
    main = stage_command("name", run, "help", <path option> = "help", ...)

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.core.io import sweep_dead_temporaries
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


def stage_command(name: str, run: Callable[..., Any], help: str, **paths: str) -> click.Command:
    """The click command of a stage: ``--params`` and one required path option per
    entry of ``paths`` (keyword -> help; an empty help takes :data:`COMMON_HELP`'s)."""

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
    return click.Command(name, callback=command, params=options, help=help,
                         short_help=help.split(". ")[0].rstrip("."))


def output_folders(dvc_yaml: Path) -> list[Path]:
    """The folders a killed stage may have left a temporary in: each declared output's
    parent, and the output itself when it is a folder (a training snapshot lives inside
    its run folder). Empty without a dvc.yaml (a stage run by hand elsewhere)."""
    import yaml

    try:
        document = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    stages = document.get("stages") if isinstance(document, dict) else None
    if not isinstance(stages, dict):
        return []
    folders: dict[Path, None] = {}
    for stage in stages.values():
        if not isinstance(stage, dict) or "foreach" in stage or "matrix" in stage:
            continue  # generated stages: their outputs are DVC's to resolve
        wdir = dvc_yaml.parent / str(stage.get("wdir", "."))
        for key in ("outs", "metrics", "plots"):
            entries = stage.get(key)
            for entry in entries if isinstance(entries, list) else []:
                name = next(iter(entry), None) if isinstance(entry, dict) else entry
                if not isinstance(name, str) or "${" in name:
                    continue  # templated: resolved by DVC only
                out = wdir / name
                folders[out.parent] = None
                folders[out] = None
    return list(folders)

