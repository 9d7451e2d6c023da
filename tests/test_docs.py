"""The documents a person reads: their figures come from the runs, their commands work.

- Every generated block of README.md and docs/*.md is what ``pipeline/docs.py`` writes now
  from ``metrics/*.json``, ``params.yaml``, the CLI and the size limits in the code.
- Every command of every ``bash`` block, and every command quoted in the prose, parses
  against the real command line: ``gptpipe`` through click (unknown options, missing
  required ones), ``dvc`` through DVC's parser (and its stages and ``-S`` params are
  dvc.yaml's and params.yaml's), ``torchrun`` through PyTorch's, ``pip`` through pip's,
  ``lm_eval`` through lm-eval's, ``make`` against the Makefile.
- Run as written, in a tiny project: the model commands (``gptpipe generate``, ``gptpipe
  export``) and the Transformers example. Checked, not run here: ``make`` (the whole
  pipeline or suite), ``dvc`` (a full run each; tests/test_compare_runs.py and
  tests/test_remote.py run the comparing and sharing walk-throughs), ``torchrun`` on
  several machines or GPUs, ``pip install``, ``lm_eval`` (tests/test_lm_eval.py runs it)
  and ``python -c`` (compiled only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO_ROOT, save_tiny_checkpoint, synthetic_documents

from pipeline import docs

PAGES = docs.documents(REPO_ROOT)
FENCE = re.compile(r"^```(?P<lang>\S*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
SEPARATORS = {"&&", "||", "|", ";"}

# Programs a page may show that are not parsed: shell basics whose use is plain to read.
SHELL_BASICS = {"git", "cp", "rm", "echo", "cd"}
# Commands that the tiny project runs as written, beyond parsing them.
RUN = ("gptpipe generate", "gptpipe export")


def shell_blocks(text: str) -> list[str]:
    return [m["body"] for m in FENCE.finditer(text) if m["lang"] in ("bash", "sh")]


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``|`` and ``;``, leading ``NAME=value`` assignments left out,
    ``$VAR`` read as 0 (the pages use it for a node's rank)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(re.sub(r"\$[A-Z_]+", "0", line), comments=True)
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                while current and re.fullmatch(r"[A-Z_]+=\S*", current[0]):
                    current.pop(0)
                if current:
                    found.append(current)
                current = []
            else:
                current.append(word)
    return found


def all_commands() -> list[tuple[str, list[str]]]:
    return [(page.name, argv) for page in PAGES
            for block in shell_blocks(page.read_text(encoding="utf-8"))
            for argv in commands(block)]


def inline_commands() -> list[tuple[str, list[str]]]:
    """Commands quoted in the prose (`gptpipe export --params ...`). A span with an option
    is a command and is parsed whole; one without (`gptpipe vocab`, `dvc exp`) names a
    command, and only that name is checked."""
    found = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text(encoding="utf-8")).replace("\n", " ")
        for span in re.findall(r"`([^`]+)`", prose):
            words = span.split()
            if words[0] in CHECKS and len(words) > 1 and words[0] != "python":
                found.append((page.name, commands(span)[0]))
    return found


def _argparse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """``parser.parse_args(args)``, its usage message in the error instead of an exit."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return argparse.Namespace(module=False)
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


def check_gptpipe(args: list[str]) -> None:
    import click

    from pipeline.cli import COMMANDS, cli

    if args in (["--help"], ["-h"], ["--version"]):
        return
    assert args and args[0] in COMMANDS, f"no gptpipe subcommand {args[:1]}"
    command = cli.get_command(click.Context(cli), args[0])
    ctx = click.Context(command, info_name=args[0])
    opts, positional, _ = command.make_parser(ctx).parse_args(list(args[1:]))
    if {"-h", "--help"} & set(args[1:]):  # help needs nothing else
        return
    missing = [p.opts[0] for p in command.params
               if p.required and isinstance(p, click.Option) and opts.get(p.name) is None]
    assert not missing, f"gptpipe {args[0]}: missing required {missing}"
    arguments = [p.nargs for p in command.params if isinstance(p, click.Argument)]
    takes = len(positional) if -1 in arguments else sum(arguments)  # -1: any number
    assert len(positional) <= takes, f"gptpipe {args[0]}: extra arguments {positional}"


def check_dvc(args: list[str]) -> None:
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    try:
        parsed = _argparse(get_main_parser(), args)
    except DvcParserError:  # DVC's parser raises this where argparse would exit
        raise AssertionError(f"dvc {' '.join(args)}: not a valid dvc command") from None
    # The stages a command names are dvc.yaml's; the params it sets are params.yaml's.
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for target in getattr(parsed, "targets", None) or []:
        assert target in stages, f"dvc {' '.join(args)}: no stage {target!r} in dvc.yaml"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for setting in getattr(parsed, "set_param", None) or []:
        dotted = setting.split("=", 1)[0]
        section, _, key = dotted.lstrip("+").partition(".")
        mapping, _, entry = key.partition(".")
        if dotted.startswith("+") and entry:  # adds an entry to a mapping param
            assert isinstance(params.get(section, {}).get(mapping), dict), (
                f"-S {setting}: {section}.{mapping} is not a mapping in params.yaml")
            continue
        assert key in params.get(section, {}), f"-S {setting}: no such param in params.yaml"


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    parsed = _argparse(get_args_parser(), args)
    if parsed.module and parsed.training_script == "pipeline.cli":
        check_gptpipe(parsed.training_script_args)


def check_pip(args: list[str]) -> None:
    from pip._internal.commands import create_command

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            create_command(args[0]).parse_args(args[1:])
    except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


def check_lm_eval(args: list[str]) -> None:
    from lm_eval._cli import HarnessCLI

    _argparse(HarnessCLI()._parser, ["run", *args])


def check_make(args: list[str]) -> None:
    targets = re.findall(r"^([a-z-]+):", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert set(args) <= set(targets), f"make: no target {set(args) - set(targets)}"


def check_python(args: list[str]) -> None:
    import importlib.util

    if args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]), f"python -m {args[1]}: no such module"
    else:
        assert args[:1] == ["-c"], f"python {args}: allowed: -m MODULE or -c CODE"
        compile(args[1], "<page>", "exec")


CHECKS = {"gptpipe": check_gptpipe, "dvc": check_dvc, "torchrun": check_torchrun,
          "pip": check_pip, "lm_eval": check_lm_eval, "make": check_make,
          "python": check_python}


def check(argv: list[str]) -> None:
    program = Path(argv[0]).name  # .venv/bin/dvc is dvc
    if program in SHELL_BASICS:
        return
    assert program in CHECKS, f"{argv[0]}: a program the documents may not show unchecked"
    CHECKS[program](argv[1:])


def test_every_generated_block_is_current():
    assert docs.stale_blocks(REPO_ROOT) == [], "run `make docs` and commit the pages"


@pytest.fixture
def pages_copy(tmp_path) -> Path:
    """The pages and what their blocks are generated from, in a folder of their own."""
    for name in ("README.md", "params.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    for folder in ("docs", "metrics"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder)
    assert docs.stale_blocks(tmp_path) == []
    return tmp_path


def test_a_metric_that_moves_makes_the_pages_stale(pages_copy):
    path = pages_copy / "metrics" / "evaluate.json"
    metrics = json.loads(path.read_text())
    metrics["test.bpb"] = 1.234567
    metrics["test.bpb_se"] = 0.0012  # a standard error, once a run records one, is shown
    path.write_text(json.dumps(metrics))
    stale = ["README.md", "docs/comparing.md", "docs/evaluation.md"]
    assert docs.stale_blocks(pages_copy) == stale
    assert docs.write_blocks(pages_copy) == stale
    assert docs.stale_blocks(pages_copy) == []
    assert "test.bpb 1.234567" in (pages_copy / "README.md").read_text()
    assert "| 1.235 ± 0.0012 |" in (pages_copy / "docs" / "evaluation.md").read_text()
    assert "1.23457 ± 0.0012" in (pages_copy / "docs" / "comparing.md").read_text()


def test_a_param_or_a_limit_that_moves_makes_the_readme_stale(pages_copy, monkeypatch):
    from pipeline.core import jsonfile

    params = pages_copy / "params.yaml"
    params.write_text(params.read_text().replace("  steps: 900 ", "  steps: 901 "))
    assert docs.stale_blocks(pages_copy) == ["README.md"]
    docs.write_blocks(pages_copy)
    assert "| `train.steps` | `901` |" in (pages_copy / "README.md").read_text()

    monkeypatch.setattr(jsonfile, "MAX_JSON_DEPTH", 100)
    assert docs.stale_blocks(pages_copy) == ["README.md"]


def test_every_fence_says_its_language():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        bare = [m.start() for m in FENCE.finditer(text) if not m["lang"]]
        assert not bare, f"{page.name}: a ``` block without a language (bash, text, python...)"


def test_the_pages_show_commands():
    shown = {argv[0] for _, argv in all_commands()}
    assert {"gptpipe", "dvc", "torchrun", "make"} <= shown


@pytest.mark.parametrize("page, argv", all_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_command_parses(page, argv):
    check(argv)


@pytest.mark.parametrize("page, argv", inline_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_command_in_the_prose_parses(page, argv):
    if any(word.startswith("-") for word in argv):
        check(argv)
    elif argv[0] in ("gptpipe", "make"):
        check(argv[:2] + ["--help"] * (argv[0] == "gptpipe"))
    else:  # dvc exp, dvc plots show: a dvc command and its subcommands
        check([*argv, "--help"])


@pytest.mark.parametrize("wrong", [
    "gptpipe export --model models/pretrain/best --out models/hf/pretrain",  # no --params
    "gptpipe generate --model m --temprature 0.7 hi",
    "gptpipe pretrian --params params.yaml",
    "dvc exp run -S train.lr=0.001 --no-such-flag",
    "dvc metrics diff HEAD~1 HEAD --all-the-things",
    "dvc exp run -S train.learning_rate=0.001",
    "dvc repro pretraining",
    "torchrun --nnodes=2 --node-rank-typo=0 -m pipeline.cli pretrain --params params.yaml",
    "make no-such-target",
    "curl https://example.com",
    "pip install --no-such-option gptpipe",
    "lm_eval --model hf --no-such-option 1",
])
def test_a_wrong_command_fails(wrong):
    (argv,) = commands(wrong)
    with pytest.raises(Exception):  # noqa: B017 - click, argparse and assertions differ
        check(argv)


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    """A project folder holding params.yaml and one tiny model at every model path the
    pages' model commands name."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    save_tiny_checkpoint(root / "tiny", synthetic_documents(40), "char", n_layer=1)
    for name in ("models/pretrain/best", "models/rlhf/best", "models/sft"):
        shutil.copytree(root / "tiny" / "model", root / name)
    return root


@pytest.mark.parametrize("page, argv", [(page, argv) for page, argv in all_commands()
                                        if " ".join(argv).startswith(RUN)],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_model_commands_run_as_written(tiny_project, page, argv):
    argv = [*argv]
    if argv[1] == "generate":  # tiny: a few tokens, on the CPU, whatever the page asks
        argv += ["--max-new-tokens", "3", "--device", "cpu"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # A prompt on stdin, for the page's `echo ... | gptpipe generate`.
    result = subprocess.run(argv, cwd=tiny_project, env=env, input="In 1905, Einstein\n",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if argv[1] == "export":
        out = tiny_project / argv[argv.index("--out") + 1]
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    else:
        assert result.stdout.strip()


def test_the_pages_are_shorter_than_the_readme_they_replace():
    # The README and bench/README.md were 1,108 and 886 lines before the pages were cut
    # out: the documents must stay shorter than that, not merely moved.
    lines = sum(len(page.read_text(encoding="utf-8").splitlines()) for page in PAGES)
    assert lines < 1108 + 23 + 56 + 104, lines
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) < 200


def test_the_readme_summary_is_what_make_pipeline_prints(capsys):
    from pipeline import report

    report.main(REPO_ROOT)
    printed = capsys.readouterr().out.strip()
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```text\n{printed}\n```" in readme


def test_the_readme_links_every_page():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO_ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_the_transformers_example_runs(tiny_project):
    """The Python block of docs/elsewhere.md, on the tiny model exported where it looks."""
    pytest.importorskip("transformers")
    text = (REPO_ROOT / "docs" / "elsewhere.md").read_text(encoding="utf-8")
    (code,) = [m["body"] for m in FENCE.finditer(text) if m["lang"] == "python"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(["gptpipe", "export", "--params", "params.yaml", "--model",
                    "models/pretrain/best", "--out", "models/hf/pretrain"],
                   cwd=tiny_project, env=env, check=True, capture_output=True)
    result = subprocess.run([str(BIN / "python"), "-c", code], cwd=tiny_project, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The river"), result.stdout
