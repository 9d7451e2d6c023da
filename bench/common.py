"""What the bench scripts share; no bench script imports another, so what two need is here.

- a scratch copy of this project as its own git + DVC repository, and the tiny params
  that make its whole pipeline run in seconds (``tests/tiny_params.yaml``, the tests' own);
- real documents: the builtin corpora, and a generated corpus of any size built from
  their sentences;
- a subprocess measured: wall time, CPU time and peak memory;
- the report: Markdown tables, the machine's name, the commit, printing and ``--out``.

Bench scripts measure the project as a user runs it, so they build on what a clone holds
(the files git tracks) and on real text, never on the test suite's fixtures. Every script
has a smallest run, exercised by ``tests/test_bench.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MB = 2**20

# Overrides (dotted key -> value) that make the whole pipeline run in seconds on a corpus
# of a few hundred short documents in the folder ``corpus``.
TINY_PARAMS: dict[str, Any] = yaml.safe_load(
    (REPO_ROOT / "tests" / "tiny_params.yaml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------- scratch projects


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with this environment's tools first on the PATH; fail loudly."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                           f"{result.stderr}")
    return result


def work_folder(prefix: str, parent: Path | None = None) -> Path:
    """A new folder of this run's own (inside ``parent``, made if missing, else in the
    system temp folder): the only one a bench script may delete."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()


def set_params(path: Path, overrides: dict[str, Any]) -> None:
    """Apply ``overrides`` (dotted key -> value) to the params file ``path``; an unknown
    section or key is one line naming it."""
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key not in params.get(section, {}):
            raise click.ClickException(f"{path}: no param {dotted}; allowed: the keys of "
                                       "params.yaml as section.key")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


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
    set_params(root / "params.yaml", overrides or {})
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@invalid"],
                    ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                    ["dvc", "config", "core.analytics", "false"]):
        run(command, root)
    return root


# ----------------------------------------------------------------------------- corpora


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


@dataclass
class Corpus:
    """A corpus to run the stages on."""

    name: str
    data_params: dict[str, Any]  # the params.yaml ``data`` section that reads it
    text_bytes: int  # UTF-8 bytes of text (before cleaning)
    size_mb: float | None = None  # generated corpora: the requested size
    generate_seconds: float = 0.0
    documents: int = 0


GENERATOR_VERSION = 1  # bump when the generator's output changes
SHARD_BYTES = 64 * MB  # generated corpus: text per JSONL shard
MIN_SENTENCES = 3  # per generated document: enough that two documents never coincide
PARAGRAPH_BREAK = 0.01  # chance of "\n" instead of " " between two sentences
# Sentence ends: ., ! or ? then space, then something that starts a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
BUILTIN_CORPUS = REPO_ROOT / "data" / "builtin" / "wikipedia-en.corpus"


def builtin_texts() -> list[str]:
    """The builtin English corpus's documents, as ingest reads them."""
    from pipeline.data.corpus import read_builtin

    return [doc.text for doc in read_builtin(BUILTIN_CORPUS)]


def generate_corpus(directory: Path, size_mb: float, seed: int) -> Corpus:
    """Write (or reuse) ``size_mb`` MB of text in ``directory``: JSONL shards of documents
    made of the builtin corpus's sentences, picked by a generator seeded with ``seed``
    (same seed and size, same bytes); each document has at least three sentences, so the
    clean stage's deduplication keeps them all."""
    name = f"generated-{size_mb:g}MB"
    manifest_path = directory / "bench-corpus.json"
    wanted = {"generator": GENERATOR_VERSION, "seed": seed, "size_mb": size_mb}
    data_params = {"corpus": str(directory), "include": "*.jsonl", "text_field": "text"}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            click.echo(f"[{name}] reusing {directory}", err=True)
            return Corpus(name, data_params, manifest["bytes"], size_mb, manifest["seconds"],
                          manifest["documents"])
    directory.mkdir(parents=True, exist_ok=True)
    stale = sorted(directory.glob("*.jsonl"))
    if stale and not manifest_path.is_file():
        raise click.ClickException(
            f"{directory}: holds .jsonl files this script did not write; "
            "allowed: an empty folder or one of its own generated corpora (--corpus-dir)")
    manifest_path.unlink(missing_ok=True)
    for path in stale:
        path.unlink()
    click.echo(f"[{name}] generating {size_mb:g} MB into {directory}", err=True)
    start = time.perf_counter()
    total, documents, shards = _write_shards(directory, int(size_mb * MB), seed)
    seconds = time.perf_counter() - start
    manifest = {**wanted, "bytes": total, "documents": documents, "shards": shards,
                "seconds": round(seconds, 3)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return Corpus(name, data_params, total, size_mb, seconds, documents)


def _write_shards(directory: Path, target: int, seed: int) -> tuple[int, int, int]:
    """At least ``target`` bytes of generated documents; (bytes, documents, shards)."""
    sentences: list[str] = []
    counts: list[int] = []
    for text in builtin_texts():
        parts = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
        sentences += parts
        counts.append(max(MIN_SENTENCES, len(parts)))
    rng = random.Random(seed)
    total = documents = shard = shard_bytes = 0
    out = (directory / f"part-{shard:05d}.jsonl").open("w", encoding="utf-8")
    try:
        while total < target:
            picked = rng.choices(sentences, k=rng.choice(counts))
            pieces = [picked[0]]
            for sentence in picked[1:]:
                pieces.append("\n" if rng.random() < PARAGRAPH_BREAK else " ")
                pieces.append(sentence)
            text = "".join(pieces)
            size = len(text.encode("utf-8"))
            if shard_bytes >= SHARD_BYTES:
                out.close()
                shard, shard_bytes = shard + 1, 0
                out = (directory / f"part-{shard:05d}.jsonl").open("w", encoding="utf-8")
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            total += size
            shard_bytes += size
            documents += 1
    finally:
        out.close()
    return total, documents, shard + 1


# ------------------------------------------------------------------ measured subprocess


@dataclass(frozen=True)
class Measured:
    """What one subprocess cost."""

    seconds: float  # wall time
    cpu_seconds: float  # user + system time of the process and its reaped workers
    max_rss: int  # bytes: the largest single process (ru_maxrss)
    tree_rss: int  # bytes: the sampled peak of the process tree, summed

    @property
    def peak(self) -> int:
        return max(self.max_rss, self.tree_rss)


# Runs one command and reports its cost. Why a launcher: a child's ru_maxrss starts at the
# RSS of the process it was forked from (Linux keeps the forked copy's high-water mark
# through exec), so a stage forked from a bench script, which may hold a corpus's texts
# and tokenizers, would report the script's RSS. Forked from this small process instead,
# the stage's ru_maxrss is its own (or about 10 MB, whichever is more).
_LAUNCHER = """
import json, os, signal, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"bench launcher: {argv[0]}: {err}", file=sys.stderr)
    os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stage gets Ctrl-C; we report it
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(report, "w") as out:
    json.dump({"seconds": seconds, "status": os.waitstatus_to_exitcode(status),
               "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}, out)
"""


def _sample_tree(pid: int, interval: float, stop: threading.Event, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the largest summed RSS of the descendants of ``pid`` seen."""
    try:
        launcher = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while True:
        try:
            processes = launcher.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += process.memory_info().rss
        peak[0] = max(peak[0], total)
        if stop.wait(interval):
            return


def _kill_tree(pid: int) -> None:
    """Kill the launcher ``pid`` and the command under it (after Ctrl-C or an error)."""
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.kill()
    with contextlib.suppress(OSError):
        os.kill(pid, 9)


def run_measured(args: Sequence[str], cwd: Path, log: Path, interval: float) -> Measured:
    """Run ``args`` (output to ``log``) and measure it; a failure is a ClickException.

    Wall time, CPU time and ``ru_maxrss`` (the largest RSS of the command or of any worker
    it waited for) come from ``os.wait4`` in the launcher; the summed RSS of the command's
    process tree is sampled here every ``interval`` seconds.
    """
    peak = [0]
    stop = threading.Event()
    report = log.with_suffix(".rusage.json")
    command = [sys.executable, "-I", "-c", _LAUNCHER, str(report), *args]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, interval, stop, peak),
                                   daemon=True)
        sampler.start()
        try:
            proc.wait()
        except BaseException:
            _kill_tree(proc.pid)
            proc.wait()
            raise
        finally:
            stop.set()
    sampler.join()
    cost = json.loads(report.read_text()) if report.is_file() else {"status": proc.returncode}
    if proc.returncode != 0 or cost["status"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise click.ClickException(f"{' '.join(args)} failed with exit status "
                                   f"{cost['status']} (log: {log}):\n" + "\n".join(tail))
    return Measured(cost["seconds"], cost["cpu"], cost["maxrss_kib"] * 1024, peak[0])


# ------------------------------------------------------------------------------ report


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (lscpu), else what the platform says."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(folder: Path = REPO_ROOT) -> str:
    """The short commit of the checkout at ``folder``, marked when it has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)"
                                                      if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def work_dir_and_out(command: Callable) -> Callable:
    """The ``--work-dir`` and ``--out`` options of a click bench script."""
    command = click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
                           help="Also write the Markdown report to this file.")(command)
    return click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Where to make the scratch folder (default: the system "
                             "temp folder).")(command)


def publish(text: str, out: Path | None) -> None:
    """Print the report and, with ``--out``, write it there too."""
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
