"""The pipeline's own wiring: dvc.yaml, params.yaml, the CLI and the stage modules agree."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import COMMANDS, cli

REPO_ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
STAGES: dict = DVC_YAML["stages"]

# Modules that cannot change what a stage writes (error types, progress bars on stderr, the
# command wiring): a stage need not list them among its deps. Everything else can, params.py
# (defaults) and io.py (how files are written) included, so it is a dep of every stage it
# runs in: a change there re-runs the stage.
INFRASTRUCTURE = {"pipeline/core/errors.py", "pipeline/core/progress.py",
                  "pipeline/core/stage.py", "pipeline/cli.py"}


def _interpolate(text: str) -> str:
    def lookup(match: re.Match) -> str:
        value = PARAMS
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def _entries(stage: dict, key: str) -> list[str]:
    names = []
    for entry in stage.get(key, []) or []:
        names.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [_interpolate(n) for n in names]


def _stage_module(name: str) -> Path:
    return REPO_ROOT / "pipeline" / "stages" / f"{name}.py"


def _stage_name(stage_key: str, stage: dict) -> str:
    return stage["cmd"].split()[1] if stage["cmd"].startswith("gptpipe ") else stage_key


@pytest.mark.parametrize("stage_key", list(STAGES))
def test_every_param_named_in_dvc_yaml_exists_in_params_yaml(stage_key):
    for dotted in _entries(STAGES[stage_key], "params"):
        value = PARAMS
        for part in dotted.split("."):
            assert isinstance(value, dict) and part in value, (
                f"stage {stage_key}: param {dotted} is not in params.yaml"
            )
            value = value[part]


def _imported_modules(path: Path) -> set[str]:
    """The pipeline modules (as repository paths) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if not name.startswith("pipeline"):
                continue
            module = name.replace(".", "/") + ".py"
            if (REPO_ROOT / module).is_file():
                found.add(module)
            # Importing a module runs its packages' __init__.py too (the module's own when
            # it is a package): they count where they hold code.
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                package = "/".join(parts[:depth]) + "/__init__.py"
                if _holds_code(REPO_ROOT / package):
                    found.add(package)
    return found


def _holds_code(path: Path) -> bool:
    """Whether a file exists and has a statement beyond its docstring."""
    if not path.is_file():
        return False
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
               for node in body)


def _library_closure(module: str) -> set[str]:
    """Every pipeline module ``module`` runs, directly or through another module."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_imported_modules(REPO_ROOT / current))
    return seen - {module}


@pytest.mark.parametrize("stage_key", list(STAGES))
def test_every_stage_lists_its_module_and_every_library_module_it_runs_in_deps(stage_key):
    """DVC re-runs a stage exactly when code it runs changes: its deps hold its module and
    every library module it imports, directly or not (infrastructure aside), and no other."""
    stage = STAGES[stage_key]
    name = _stage_name(stage_key, stage)
    module = f"pipeline/stages/{name}.py"
    assert _stage_module(name).is_file(), f"stage {stage_key} runs gptpipe {name}: no {module}"
    deps = {d for d in _entries(stage, "deps") if d.startswith("pipeline/")}
    assert module in deps
    expected = _library_closure(module) - INFRASTRUCTURE
    assert not any(m.startswith("pipeline/stages/") for m in expected), (
        f"{module} imports another stage"
    )
    assert deps - {module} == expected, (
        f"stage {stage_key}: missing {sorted(expected - deps)}, not run {sorted(deps - expected)}"
    )


@pytest.mark.parametrize("stage_key", list(STAGES))
def test_every_stage_module_has_a_docstring_naming_inputs_params_and_outputs(stage_key):
    name = _stage_name(stage_key, STAGES[stage_key])
    doc = ast.get_docstring(ast.parse(_stage_module(name).read_text())) or ""
    assert len(doc) > 80, f"{name}.py needs a docstring naming its inputs, params and outputs"
    for section in _entries(STAGES[stage_key], "params"):
        assert section.split(".")[0] in doc, f"{name}.py docstring does not name params {section}"


@pytest.mark.parametrize("stage_key", list(STAGES))
def test_every_path_the_command_writes_is_a_declared_output(stage_key):
    stage = STAGES[stage_key]
    declared = set(_entries(stage, "outs")) | set(_entries(stage, "metrics"))
    declared |= set(_entries(stage, "plots"))
    writes = r"--(?:out|metrics|plots|checkpoint|live|speed|samples)\S*\s+(\S+)"
    written = re.findall(writes, stage["cmd"])
    assert written, f"stage {stage_key} names no output on its command line"
    for path in written:
        inside = [d for d in declared if d == path or d.startswith(path + "/")]
        assert inside, f"stage {stage_key} writes {path} but declares nothing there"
    read = re.findall(r"--(?:input|tokenizer|model)\S*\s+(\S+)", stage["cmd"])
    deps = set(_entries(stage, "deps"))
    for path in read:
        assert path in deps, f"stage {stage_key} reads {path} but does not list it in deps"


def test_every_stage_module_is_a_cli_command_and_a_dvc_stage():
    modules = {p.stem for p in (REPO_ROOT / "pipeline" / "stages").glob("*.py")} - {"__init__"}
    in_dvc = {_stage_name(k, s) for k, s in STAGES.items()}
    missing = modules - set(COMMANDS)
    assert not missing, f"stage modules without a CLI command: {missing}"
    assert modules <= in_dvc, f"stage modules missing from dvc.yaml: {modules - in_dvc}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 3


def test_top_level_help_lists_every_stage():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


# Each library group may import only itself and the groups listed (DESIGN.md's arrows).
LAYERS = {"core": set(), "data": {"core"}, "lm": {"core", "data"},
          "alignment": {"core", "data", "lm"}}


@pytest.mark.parametrize("group", list(LAYERS))
def test_library_groups_import_only_the_groups_below_them(group):
    for path in sorted((REPO_ROOT / "pipeline" / group).glob("*.py")):
        for module in _imported_modules(path):
            other = module.split("/")[1]
            assert other == group or other in LAYERS[group], (
                f"{path.relative_to(REPO_ROOT)} imports {module}"
            )


def test_each_command_has_one_help_text_its_module_docstring():
    """gptpipe --help lists, for every command, the first sentence of the docstring that
    its own --help prints in full: the two cannot drift apart."""
    runner = CliRunner()
    listing = runner.invoke(cli, ["--help"], terminal_width=1000).output
    for name, module in COMMANDS.items():
        doc = importlib.import_module(module).__doc__
        own = runner.invoke(cli, [name, "--help"], terminal_width=1000)
        assert own.exit_code == 0, own.output
        short = next(line.split(None, 1)[1] for line in listing.splitlines()
                     if line.strip().startswith(name + " "))
        assert short.rstrip(".").lower() in " ".join(doc.replace("``", "").split()).lower()
        # The full help is the docstring, line for line (markup aside).
        first_line = doc.strip().splitlines()[0].replace("``", "")
        assert first_line in own.output


def test_every_param_of_the_schema_is_written_in_params_yaml():
    """No hidden defaults: every field of every params section is in params.yaml, so a
    value that shapes an output is one DVC tracks (and one a user sees)."""
    import dataclasses

    from pipeline.core.params import Params

    hints = {f.name: f.type for f in dataclasses.fields(Params)}
    for section, annotation in hints.items():
        cls = eval(annotation, vars(importlib.import_module("pipeline.core.params"))) \
            if isinstance(annotation, str) else annotation
        if not dataclasses.is_dataclass(cls):
            assert section in PARAMS, f"params.yaml has no {section}"
            continue
        for field in dataclasses.fields(cls):
            assert field.name in (PARAMS.get(section) or {}), (
                f"params.yaml lacks {section}.{field.name} (the schema's default is used "
                "unseen; write it in params.yaml)")


# A teardown that aborts after the command is done, as Arrow's thread pools sometimes do
# at interpreter exit: registered before gptpipe starts, so it would run after its clean-up.
_ABORT_AT_TEARDOWN = """
import atexit, os, sys
atexit.register(os.abort)
from pipeline.cli import main
sys.argv = ["gptpipe", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("args", "status"), [(["--help"], 0), (["nosuch"], 2),
                                              (["compare", "--replicates", "HEAD"], 2)])
def test_a_finished_command_exits_with_its_status_before_native_teardown(tmp_path, args,
                                                                        status):
    result = subprocess.run([sys.executable, "-c", _ABORT_AT_TEARDOWN, *args], cwd=tmp_path,
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == status, result.stderr
    if status == 0:
        assert "Usage: gptpipe" in result.stdout  # printed and flushed before the exit
    else:
        assert result.stderr.strip()
