"""What several bench scripts share: a scratch copy of this project as its own git + DVC
repository, tiny params for it, and real documents from the builtin corpora.

Bench scripts measure the project as a user runs it, so they build on what a clone holds
(the files git tracks) and on real text, never on the test suite's fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Overrides (dotted key -> value) that make the whole pipeline run in seconds on a corpus
# of a few hundred short documents.
TINY_PARAMS: dict[str, Any] = {
    "data.corpus": "corpus",
    "clean.min_bytes": 20,
    "clean.workers": 1,
    "vocab.vocab_size": 400,
    "tokenize.shard_tokens": 2000,
    "model.context": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "train.steps": 6,
    "train.batch_size": 4,
    "train.warmup_steps": 2,
    "train.eval_every": 3,
    "train.eval_windows": 4,
    "train.checkpoint_every": 3,
    "evaluate.num_prompts": 2,
    "evaluate.temperatures": [0.0, 1.0],
    "evaluate.max_new_tokens": 8,
    "preferences.num_prompts": 48,
    "preferences.max_new_tokens": 12,
    "preferences.min_pairs": 4,
    "reward.epochs": 1,
    "rlhf.steps": 2,
    "rlhf.batch_size": 4,
    "rlhf.minibatch_size": 2,
    "rlhf.max_new_tokens": 8,
    "rlhf.eval_every": 1,
    "rlhf.eval_prompts": 4,
}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with this environment's tools first on the PATH; fail loudly."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                           f"{result.stderr}")
    return result


def scratch_repo(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """``root`` as a new git + DVC repository holding the files a clone of this project
    holds (as they are in the working tree), with ``overrides`` applied to params.yaml."""
    tracked = run(["git", "ls-files", "-z"], REPO_ROOT).stdout.split("\0")
    root.mkdir(parents=True, exist_ok=True)
    for name in filter(None, tracked):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith((".dvc/", "dvc.lock")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@invalid"],
                    ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                    ["dvc", "config", "core.analytics", "false"]):
        run(command, root)
    return root


def builtin_articles(language: str = "en") -> dict[str, dict]:
    """The builtin Wikipedia corpus of ``language`` (en, fr, es): title -> article."""
    from pipeline.data.corpus import builtin_records

    return builtin_records(REPO_ROOT / "data" / "builtin" / f"wikipedia-{language}.corpus")


def write_wiki_folder(folder: Path, count: int, language: str = "en") -> Path:
    """The first ``count`` builtin articles (in title order) as .txt files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    articles = builtin_articles(language)
    for index, title in enumerate(sorted(articles)[:count]):
        (folder / f"doc{index:05d}.txt").write_text(articles[title]["extract"] + "\n",
                                                    encoding="utf-8")
    return folder
