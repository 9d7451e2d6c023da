"""Shared fixtures: tiny corpora and throwaway DVC repositories."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Never let DVC phone home from a test run.
os.environ["DVC_NO_ANALYTICS"] = "1"

_WORDS = (  # noqa: SIM905 - one readable block of words
    "the a river city music history king war science ocean language people north south "
    "ancient modern empire small large island mountain known first early later famous "
    "was is are has had built founded written played called located between during after "
    "of in on for with by from as and or but which that its their his her"
).split()


def synthetic_documents(count: int, seed: int = 0, sentences: int = 4) -> list[str]:
    """Deterministic English-like documents, distinct from each other."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        parts = []
        for _ in range(sentences):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
            parts.append(" ".join(words).capitalize() + ".")
        documents.append(f"Document {index}. " + " ".join(parts))
    return documents


def run_cmd(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_dvc_repo(root: Path, params_overrides: dict | None = None) -> Path:
    """A git + DVC repository holding this project's dvc.yaml, params.yaml and code.

    The stage commands run the installed ``gptpipe``; the copied ``pipeline/`` sources are
    there because dvc.yaml lists them as dependencies.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO_ROOT / ".gitignore", root / ".gitignore")  # what a clone ignores
    shutil.copytree(
        REPO_ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO_ROOT / "data" / "builtin", root / "data" / "builtin")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in (params_overrides or {}).items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cmd(["git", "init", "-q"], root)
    run_cmd(["git", "config", "user.email", "test@example.invalid"], root)
    run_cmd(["git", "config", "user.name", "test"], root)
    run_cmd(["dvc", "init", "-q"], root)
    run_cmd(["dvc", "config", "core.analytics", "false"], root)
    return root


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory of 240 small .txt documents."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, text in enumerate(synthetic_documents(240)):
        (corpus / f"doc{index:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return corpus


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine torch's spinning
    threads make them 10x slower; one thread keeps each test to seconds. Modules of tiny
    models use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_checkpoint(root: Path, texts: list[str], kind: str, n_layer: int) -> Path:
    """``root/tokenizer.json`` (a ``kind`` vocabulary of ``texts``) and ``root/model``, a
    randomly initialised GPT (seed 0, 32 wide, context 64) saved as a checkpoint."""
    import torch

    from pipeline.core.params import VocabParams
    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.lm.checkpoint import save_model
    from pipeline.lm.model import GPT, GPTConfig

    tokenizer = train_tokenizer(VocabParams(kind=kind, min_freq=1), texts)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=n_layer,
                       n_head=2, n_embd=32)
    save_model(root / "model", GPT(config), config, {"tokenizer_sha256": tokenizer.sha256},
               root / "tokenizer.json")
    return root


# The test files that take longest on 2 cores, longest first (measured with `make test`).
# `make test` hands whole files to its two processes in collection order: starting these
# first leaves the short files to even out the end, instead of one process running a long
# file alone while the other waits.
LONGEST_FILES = ("test_bench.py", "test_compare_runs.py", "test_pretrain.py",
                 "test_pipeline_dvc.py", "test_determinism.py", "test_remote.py",
                 "test_faults.py", "test_rlhf_resume.py", "test_lm_eval.py",
                 "test_trl_formats.py", "test_sources.py", "test_docs.py",
                 "test_model_card.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
