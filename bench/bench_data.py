"""Benchmark the data stages: wall time, MB/s and peak RSS of each stage, per vocab kind.

Every stage runs as its own subprocess through the real CLI, with exactly the options
dvc.yaml gives it (``gptpipe <stage> --params ... --input ... --out ... --metrics ...``),
in a scratch work directory. For each stage the script records:

- seconds: wall time of the subprocess, start-up (imports) included;
- MB/s: the text it processed per second (see "Text measured" below);
- peak RSS: the largest resident set of any one process of the stage (``os.wait4``'s
  ``ru_maxrss``, exact) and the peak of the whole process tree summed (the stage and its
  workers, sampled with psutil every ``--sample-interval`` seconds).

Corpora: the builtin corpus (data/builtin/wikipedia-en.corpus, about 4.9 MB) and a
generated one of ``--size-mb`` MB (default 1024, i.e. 1 GB): JSONL shards of documents
made of sentences of the builtin corpus, re-sampled with a seeded RNG (same seed and size,
same bytes). Each document has at least three sentences drawn from about 36,000, so
documents are distinct and the clean stage's dedup keeps them (its drop count is shown).

ingest, clean and split run once per corpus; vocab and tokenize once per vocab kind.
"clean+tokenize MB/s" is the clean text's size over (clean seconds + tokenize seconds).

Then, in this process, the bpe tokenizer of each corpus encodes the same texts three ways,
in batches of ``tokenize.batch_documents``: gptpipe's tiktoken path
(``load_tokenizer(path, fast=True).encode_batch``), plain HF ``tokenizers``
``Tokenizer.from_file(path).encode_batch`` and HF ``encode_batch_fast``. Texts: the
train+val splits of the builtin corpus (best of 3), and the first ``--compare-mb`` MB of
the generated train split (once). Each encoder is warmed up on one batch first.

Text measured (MB = 2**20 bytes of UTF-8 text): ingest: the corpus text; clean, split,
tokenize: the clean text; vocab: the train split it learns from.

Usage (from the repository root)::

    # the full run: builtin corpus + a generated 1 GB corpus, all three kinds
    .venv/bin/python bench/bench_data.py --out bench/results-data.md

    # a quick check: one kind, a 5 MB generated corpus
    .venv/bin/python bench/bench_data.py --kinds bpe --size-mb 5

    # two small sizes give a linear fit, used to extrapolate the full run's duration
    .venv/bin/python bench/bench_data.py --size-mb 2 --size-mb 8 --skip-builtin

Options:

  --size-mb MB            generated corpus size; repeat for several (default 1024)
  --kinds LIST            comma-separated vocab kinds (default bpe,word,char)
  --skip-generated        only the builtin corpus
  --skip-builtin          only the generated corpus (not with --generated-vocab builtin)
  --generated-vocab MODE  train: run vocab on the generated corpus (default);
                          builtin: reuse the builtin corpus's tokenizer for it
  --compare-mb MB         generated train text the encoders are compared on (default 128)
  --params PATH           the params.yaml to start from (default: the repository's)
  --work-dir DIR          where to make the scratch folder (default: the system temp)
  --corpus-dir DIR        where to generate the corpus, and reuse it on the next run
  --keep                  keep the work directory (else it is deleted at the end)
  --seed N                generator seed (default 0)
  --extrapolate-mb MB     estimate the run's duration at this size (default 1024)
  --out PATH              also write the Markdown report to PATH

Benchmarks are scripts, never timed tests: run this on a quiet machine, one at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

REPO = Path(__file__).resolve().parents[1]
BUILTIN_CORPUS = REPO / "data" / "builtin" / "wikipedia-en.corpus"
KINDS = ("bpe", "word", "char")
MB = 1 << 20
RSS_LIMIT = 1536 * MB  # the bound: 1.5 GB per stage on the 1 GB corpus
SHARD_BYTES = 64 * MB  # generated corpus: text per JSONL shard
GENERATOR_VERSION = 1  # bump when the generator's output changes
MIN_SENTENCES = 3  # per generated document: enough that two documents never coincide
PARAGRAPH_BREAK = 0.01  # chance of "\n" instead of " " between two sentences
# Sentence ends: ., ! or ? then space, then something that starts a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


# --------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """A corpus to run the stages on."""

    name: str
    data_params: dict[str, Any]  # the params.yaml ``data`` section that reads it
    text_bytes: int  # UTF-8 bytes of text (before cleaning)
    size_mb: float | None = None  # generated corpora: the requested size
    generate_seconds: float = 0.0
    documents: int = 0
    path: Path | None = None  # generated corpora: the folder of shards


def builtin_texts() -> list[str]:
    from pipeline.data.corpus import read_builtin

    return [doc.text for doc in read_builtin(BUILTIN_CORPUS)]


def generate_corpus(directory: Path, size_mb: float, seed: int) -> Corpus:
    """Write (or reuse) a generated corpus of ``size_mb`` MB of text in ``directory``."""
    name = f"generated-{size_mb:g}MB"
    manifest_path = directory / "bench-corpus.json"
    wanted = {"generator": GENERATOR_VERSION, "seed": seed, "size_mb": size_mb}
    data_params = {"corpus": str(directory), "include": "*.jsonl", "text_field": "text"}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            click.echo(f"[{name}] reusing {directory}", err=True)
            return Corpus(
                name,
                data_params,
                manifest["bytes"],
                size_mb,
                manifest["seconds"],
                manifest["documents"],
                directory,
            )
    directory.mkdir(parents=True, exist_ok=True)
    stale = sorted(directory.glob("*.jsonl"))
    if stale and not manifest_path.is_file():
        raise click.ClickException(
            f"{directory}: holds .jsonl files this script did not write; "
            "allowed: an empty folder or one of its own generated corpora (--corpus-dir)"
        )
    manifest_path.unlink(missing_ok=True)
    for path in stale:
        path.unlink()
    click.echo(f"[{name}] generating {size_mb:g} MB into {directory}", err=True)
    start = time.perf_counter()
    sentences: list[str] = []
    counts: list[int] = []
    for text in builtin_texts():
        parts = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
        sentences += parts
        counts.append(max(MIN_SENTENCES, len(parts)))
    rng = random.Random(seed)
    target = int(size_mb * MB)
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
    seconds = time.perf_counter() - start
    manifest = {**wanted, "bytes": total, "documents": documents, "shards": shard + 1}
    manifest["seconds"] = round(seconds, 3)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return Corpus(name, data_params, total, size_mb, seconds, documents, directory)


# ---------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Measured:
    """What one subprocess cost."""

    seconds: float  # wall time
    cpu_seconds: float  # user + system time of the process and its reaped workers
    max_rss: int  # bytes: the largest single process (ru_maxrss)
    tree_rss: int | None  # bytes: the sampled peak of the process tree, summed


@dataclass
class StageRun:
    """One stage subprocess and what it cost."""

    corpus: str
    kind: str  # "" for ingest, clean and split (shared by every kind)
    stage: str
    text_bytes: int
    measured: Measured
    size_mb: float | None = None  # the generated corpus's size, for the extrapolation

    @property
    def seconds(self) -> float:
        return self.measured.seconds

    @property
    def peak(self) -> int:
        return max(self.measured.max_rss, self.measured.tree_rss or 0)


# Runs one stage and reports its cost. Why a launcher: a child's ru_maxrss starts at the
# RSS of the process it was forked from (Linux keeps the forked copy's high-water mark
# through exec), so a stage forked from this script, which holds a corpus's texts and
# tokenizers, would report this script's RSS. Forked from this small process instead, the
# stage's ru_maxrss is its own (or about 10 MB, whichever is more).
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
    import psutil

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
    """Kill the launcher ``pid`` and the stage under it (after Ctrl-C or an error here)."""
    with contextlib.suppress(ImportError, OSError):
        import psutil

        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.kill()
    with contextlib.suppress(OSError):
        os.kill(pid, 9)


def run_measured(args: Sequence[str], cwd: Path, log: Path, interval: float) -> Measured:
    """Run ``args`` (output to ``log``) and measure it; a failure is a ClickException.

    Wall time, CPU time and ``ru_maxrss`` (the largest RSS of the stage or of any worker
    it waited for) come from ``os.wait4`` in the launcher; the summed RSS of the stage's
    process tree is sampled here with psutil every ``interval`` seconds.
    """
    try:
        import psutil  # noqa: F401  (dvc depends on it; without it only ru_maxrss is kept)

        sampled = True
    except ImportError:
        sampled = False
    peak = [0]
    stop = threading.Event()
    report = log.with_suffix(".rusage.json")
    command = [sys.executable, "-I", "-c", _LAUNCHER, str(report), *args]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        sampler = None
        if sampled:
            sampler = threading.Thread(
                target=_sample_tree, args=(proc.pid, interval, stop, peak), daemon=True
            )
            sampler.start()
        try:
            proc.wait()
        except BaseException:
            _kill_tree(proc.pid)
            proc.wait()
            raise
        finally:
            stop.set()
    if sampler is not None:
        sampler.join()
    cost = json.loads(report.read_text()) if report.is_file() else {"status": proc.returncode}
    if proc.returncode != 0 or cost["status"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise click.ClickException(
            f"{' '.join(args)} failed with exit status {cost['status']} (log: {log}):\n"
            + "\n".join(tail)
        )
    return Measured(
        cost["seconds"], cost["cpu"], cost["maxrss_kib"] * 1024, peak[0] if sampled else None
    )


def gptpipe_command() -> list[str]:
    script = Path(sys.executable).parent / "gptpipe"
    if script.is_file():
        return [str(script)]
    found = shutil.which("gptpipe")
    return [found] if found else [sys.executable, "-m", "pipeline.cli"]


# -------------------------------------------------------------------------- pipeline


@dataclass
class Bench:
    """Runs the stages of each corpus and collects their costs."""

    base_params: dict[str, Any]
    work_dir: Path
    kinds: tuple[str, ...]
    interval: float
    keep: bool
    runs: list[StageRun] = field(default_factory=list)
    tokenizers: dict[tuple[str, str], Path] = field(default_factory=dict)  # (corpus, kind)
    split_dirs: dict[str, Path] = field(default_factory=dict)
    clean_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def write_params(self, where: Path, corpus: Corpus, kind: str) -> Path:
        params = json.loads(json.dumps(self.base_params))  # a deep copy
        params["data"] = {**params.get("data", {}), **corpus.data_params}
        params.setdefault("vocab", {})["kind"] = kind
        path = where / f"params-{kind}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def stage(
        self, corpus: Corpus, where: Path, kind: str, stage: str, options: list[str]
    ) -> Measured:
        params = where / f"params-{kind or self.kinds[0]}.yaml"
        args = [*gptpipe_command(), stage, "--params", params.name, *options]
        label = f"{stage}-{kind}" if kind else stage
        click.echo(f"[{corpus.name}] {label} ...", err=True, nl=False)
        try:
            result = run_measured(args, where, where / "logs" / f"{label}.log", self.interval)
        except click.ClickException as err:
            click.echo(" failed", err=True)
            if not self.keep:
                err.message += (
                    "\n(the work directory is deleted: rerun with --keep to read the log)"
                )
            raise
        peak = max(result.max_rss, result.tree_rss or 0)
        click.echo(f" {result.seconds:.1f} s, {peak / MB:.0f} MB peak", err=True)
        return result

    def record(
        self, corpus: Corpus, kind: str, stage: str, text_bytes: int, measured: Measured
    ) -> None:
        self.runs.append(StageRun(corpus.name, kind, stage, text_bytes, measured, corpus.size_mb))

    def run_corpus(self, corpus: Corpus, reuse_vocab_from: str | None = None) -> None:
        where = self.work_dir / corpus.name
        if where.exists():
            shutil.rmtree(where)
        (where / "logs").mkdir(parents=True)
        for kind in self.kinds:
            self.write_params(where, corpus, kind)

        def metrics(name: str) -> dict[str, Any]:
            return json.loads((where / "metrics" / f"{name}.json").read_text())

        measured = self.stage(
            corpus,
            where,
            "",
            "ingest",
            ["--out", "data/raw", "--metrics", "metrics/ingest.json"],
        )
        self.record(corpus, "", "ingest", metrics("ingest")["bytes"], measured)
        measured = self.stage(
            corpus,
            where,
            "",
            "clean",
            ["--input", "data/raw", "--out", "data/clean", "--metrics", "metrics/clean.json"],
        )
        clean = metrics("clean")
        self.clean_metrics[corpus.name] = clean
        clean_bytes = clean["bytes_out"]
        self.record(corpus, "", "clean", clean_bytes, measured)
        measured = self.stage(
            corpus,
            where,
            "",
            "split",
            ["--input", "data/clean", "--out", "data/split", "--metrics", "metrics/split.json"],
        )
        self.record(corpus, "", "split", clean_bytes, measured)
        train_bytes = metrics("split")["train"]["bytes"]
        self.split_dirs[corpus.name] = where / "data" / "split"
        if not self.keep:
            shutil.rmtree(where / "data" / "raw")
            shutil.rmtree(where / "data" / "clean")
        for kind in self.kinds:
            if reuse_vocab_from is None:
                tokenizer = where / "data" / "vocab" / kind / "tokenizer.json"
                options = ["--input", "data/split", "--out", str(tokenizer.relative_to(where))]
                options += ["--metrics", f"metrics/vocab-{kind}.json"]
                measured = self.stage(corpus, where, kind, "vocab", options)
                self.record(corpus, kind, "vocab", train_bytes, measured)
            else:
                tokenizer = self.tokenizers[(reuse_vocab_from, kind)]
            self.tokenizers[(corpus.name, kind)] = tokenizer
            options = ["--input", "data/split", "--tokenizer", str(tokenizer)]
            options += ["--out", "data/tokens", "--metrics", f"metrics/tokenize-{kind}.json"]
            measured = self.stage(corpus, where, kind, "tokenize", options)
            tokenized = metrics(f"tokenize-{kind}")
            text_bytes = sum(tokenized[split]["bytes"] for split in ("train", "val", "test"))
            self.record(corpus, kind, "tokenize", text_bytes, measured)
            if not self.keep:
                shutil.rmtree(where / "data" / "tokens")


# -------------------------------------------------------------------------- encoders


@dataclass
class EncoderRow:
    corpus: str
    text_bytes: int
    documents: int
    rates: dict[str, float]  # encoder -> MB/s
    tokens: dict[str, int]  # encoder -> tokens counted
    agree: bool  # ids identical on the warm-up batch and token totals equal
    seconds: float  # the whole comparison's wall time


def read_texts(split_dir: Path, splits: Sequence[str], limit: int | None) -> tuple[list[str], bool]:
    """Texts of ``splits`` in order, stopping once ``limit`` UTF-8 bytes are reached.

    Also says whether the limit cut the texts short.
    """
    from pipeline.data.doctable import iter_texts

    texts: list[str] = []
    size = 0
    for split in splits:
        for batch in iter_texts(split_dir / split):
            for text in batch:
                if limit is not None and size >= limit:
                    return texts, True
                texts.append(text)
                size += len(text.encode("utf-8"))
    return texts, False


def compare_encoders(
    corpus: str, tokenizer_path: Path, texts: list[str], batch_documents: int, repeats: int
) -> EncoderRow:
    """MB/s of gptpipe's tiktoken path, HF encode_batch and HF encode_batch_fast."""
    from tokenizers import Tokenizer

    from pipeline.data.tokenizer import load_tokenizer

    start = time.perf_counter()
    fast = load_tokenizer(tokenizer_path, fast=True)
    if not fast.uses_fast_encoder:
        raise click.ClickException(f"{tokenizer_path}: the tiktoken path is not in use")
    hf = Tokenizer.from_file(str(tokenizer_path))
    encoders: dict[str, Callable[[list[str]], list[list[int]]]] = {
        "gptpipe (tiktoken)": fast.encode_batch,
        "HF encode_batch": lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)],
    }
    if hasattr(hf, "encode_batch_fast"):
        encoders["HF encode_batch_fast"] = lambda b: [
            e.ids for e in hf.encode_batch_fast(b, add_special_tokens=False)
        ]
    batches = [texts[i : i + batch_documents] for i in range(0, len(texts), batch_documents)]
    size = sum(len(t.encode("utf-8")) for t in texts)
    warm = {name: encode(batches[0]) for name, encode in encoders.items()}
    agree = all(ids == warm["HF encode_batch"] for ids in warm.values())
    best = dict.fromkeys(encoders, float("inf"))
    tokens = dict.fromkeys(encoders, 0)
    for _ in range(repeats):
        for name, encode in encoders.items():
            count = 0
            begin = time.perf_counter()
            for batch in batches:
                count += sum(map(len, encode(batch)))
            best[name] = min(best[name], time.perf_counter() - begin)
            tokens[name] = count
    agree = agree and len(set(tokens.values())) == 1
    rates = {name: size / MB / seconds for name, seconds in best.items()}
    return EncoderRow(corpus, size, len(texts), rates, tokens, agree, time.perf_counter() - start)


# --------------------------------------------------------------------------- report


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:,.0f}"


def _rate(size: int, seconds: float) -> str:
    return f"{size / MB / seconds:,.1f}" if seconds > 0 else "n/a"


def environment() -> list[str]:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "tokenizers", "tiktoken", "pyarrow")
    )
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {model}, {usable} usable cores ({os.cpu_count()} online)",
        f"- Python {platform.python_version()}, {packages}",
        f"- gptpipe commit: {commit}",
    ]


def _fit(points: list[tuple[float, float]], target: float) -> tuple[float, float, str]:
    """``value`` at size ``target`` from (size, value) points: (estimate, slope, method).

    A least-squares line when there are two sizes or more and its slope is positive (the
    intercept is the start-up cost); else the largest point scaled in proportion, which
    also scales start-up and so overestimates.
    """
    largest_size, largest_value = max(points)
    proportional = largest_value * target / largest_size
    if len({size for size, _ in points}) < 2:
        return proportional, largest_value / largest_size, "proportional"
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    if slope <= 0:
        return proportional, largest_value / largest_size, "proportional (no positive slope)"
    return mean_y + slope * (target - mean_x), slope, "linear fit"


def extrapolation(
    bench: Bench,
    generated: list[Corpus],
    builtin_seconds: float,
    encoder_rows: list[EncoderRow],
    target_mb: float,
    compare_mb: float,
) -> list[str]:
    """Estimate each stage's and the whole run's duration at ``target_mb``."""
    sizes = sorted({c.size_mb for c in generated if c.size_mb})
    if not sizes:
        return []
    rows = []
    total = builtin_seconds
    upper_bound = False
    keys = dict.fromkeys((r.stage, r.kind) for r in bench.runs if r.size_mb is not None)
    for stage, kind in keys:
        runs = [r for r in bench.runs if (r.stage, r.kind) == (stage, kind) and r.size_mb]
        seconds, slope, method = _fit([(r.size_mb, r.seconds) for r in runs], target_mb)
        cpu, _, _ = _fit([(r.size_mb, r.measured.cpu_seconds) for r in runs], target_mb)
        total += seconds
        upper_bound = upper_bound or method.startswith("proportional")
        rate = f"{1 / slope:,.1f}" if slope > 0 else "n/a"
        rows.append([stage, kind or "all", f"{seconds:,.0f}", f"{cpu:,.0f}", rate, method])
    generate, _, method = _fit([(c.size_mb, c.generate_seconds) for c in generated], target_mb)
    total += generate
    rows.append(["(generate corpus)", "", f"{generate:,.0f}", "", "", method])
    rates = [r.rates for r in encoder_rows if r.corpus.startswith("generated")]
    if rates:
        compare_bytes = min(compare_mb, 0.8 * target_mb)
        compare = sum(compare_bytes / rate for rate in rates[-1].values())
        total += compare
        rows.append(["(encoder comparison)", "bpe", f"{compare:,.0f}", "", "", "measured MB/s"])
    measured = ", ".join(f"{s:g}" for s in sizes)
    headers = ["stage", "kind", "wall s", "CPU s", "MB/s (slope)", "method"]
    return [
        f"## Extrapolation to a {target_mb:g} MB generated corpus",
        "",
        f"Fitted per stage on the generated corpora measured here ({measured} MB); the "
        "builtin corpus's measured time is added as is. Fits from sizes of a few MB are "
        "dominated by start-up and by noise: use sizes of 16 MB or more for a useful one.",
        "",
        md_table(headers, rows),
        "",
        f"Estimated duration of the whole run: **{total / 60:,.0f} min**"
        + (
            " (an upper bound: some stages were scaled in proportion, start-up included)."
            if upper_bound
            else "."
        ),
        "",
    ]


def report(
    bench: Bench,
    encoder_rows: list[EncoderRow],
    corpora: list[Corpus],
    extra: list[str],
) -> str:
    lines = ["# Data stage benchmark", "", *environment(), ""]
    lines += ["## Stages", ""]
    rows = []
    for r in bench.runs:
        rows.append(
            [
                r.corpus,
                r.kind or "all",
                r.stage,
                f"{r.seconds:,.1f}",
                f"{r.measured.cpu_seconds:,.1f}",
                f"{r.text_bytes / MB:,.1f}",
                _rate(r.text_bytes, r.seconds),
                _mb(r.measured.max_rss),
                _mb(r.measured.tree_rss),
            ]
        )
    headers = ["corpus", "kind", "stage", "seconds", "CPU s", "text MB", "MB/s"]
    headers += ["peak RSS MB (largest process)", "peak RSS MB (process tree)"]
    lines += [md_table(headers, rows), ""]

    lines += ["## Clean + tokenize", ""]
    rows = []
    for corpus in corpora:
        shared = [r for r in bench.runs if r.corpus == corpus.name and not r.kind]
        clean = next((r for r in shared if r.stage == "clean"), None)
        if clean is None:
            continue
        for kind in bench.kinds:
            own = [r for r in bench.runs if r.corpus == corpus.name and r.kind == kind]
            tokenize = next((r for r in own if r.stage == "tokenize"), None)
            if tokenize is None:
                continue
            peak = max(r.peak for r in [*shared, *own])
            rows.append(
                [
                    corpus.name,
                    kind,
                    f"{clean.text_bytes / MB:,.1f}",
                    f"{clean.seconds:,.1f}",
                    f"{tokenize.seconds:,.1f}",
                    _rate(clean.text_bytes, clean.seconds + tokenize.seconds),
                    _mb(peak),
                    "yes" if peak < RSS_LIMIT else "**no**",
                ]
            )
    headers = ["corpus", "kind", "clean text MB", "clean s", "tokenize s"]
    headers += ["clean+tokenize MB/s", "max peak RSS MB (any stage)", "< 1.5 GB"]
    lines += [md_table(headers, rows), ""]

    if encoder_rows:
        lines += ["## BPE encoding: gptpipe (tiktoken) vs Hugging Face tokenizers", ""]
        names = list(encoder_rows[0].rates)
        rows = []
        for e in encoder_rows:
            ratio = e.rates["gptpipe (tiktoken)"] / e.rates["HF encode_batch"]
            rows.append(
                [
                    e.corpus,
                    f"{e.text_bytes / MB:,.1f}",
                    f"{e.documents:,}",
                    *(f"{e.rates[n]:,.1f}" for n in names),
                    f"**{ratio:.2f}x**",
                    "yes" if e.agree else "**no**",
                ]
            )
        headers = ["texts", "MB", "documents", *(f"{n} MB/s" for n in names)]
        headers += ["tiktoken / encode_batch", "same ids"]
        lines += [md_table(headers, rows), ""]
        lines += [
            "Same tokenizer.json, same texts, batches of tokenize.batch_documents, one "
            "warm-up batch each; builtin: best of 3, generated: one pass. Goal: >= 2x.",
            "",
        ]

    notes = []
    for corpus in corpora:
        clean = bench.clean_metrics.get(corpus.name)
        if clean is None:
            continue
        note = (
            f"{corpus.name}: {clean['documents_in']:,} documents, {clean['documents_out']:,} "
            f"kept ({clean['dropped_exact_duplicate']} exact duplicates, "
            f"{clean['dropped_too_short']} too short)"
        )
        if corpus.size_mb is not None:
            note += f"; generated in {corpus.generate_seconds:,.1f} s (not a stage)"
        notes.append(f"- {note}.")
    notes += [f"- {n}" for n in bench.notes]
    notes += [
        "- MB = 2^20 bytes of UTF-8 text. ingest: corpus text; clean, split, tokenize: clean "
        "text; vocab: train split. Seconds: wall time, the subprocess's start-up included. "
        "CPU s: user + system time of the stage and its workers (above seconds: parallel).",
        "- Largest process: os.wait4 ru_maxrss of the stage or any worker (exact). Process "
        "tree: stage + workers summed, sampled (shared pages counted once per process).",
    ]
    lines += ["## Notes", "", *notes, ""]
    lines += extra
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------ CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--size-mb",
    type=float,
    multiple=True,
    help="Generated corpus size in MB (2^20 bytes of text); repeatable.  [default: 1024]",
)
@click.option(
    "--kinds", default=",".join(KINDS), show_default=True, help="Comma-separated vocab kinds."
)
@click.option("--skip-generated", is_flag=True, help="Only the builtin corpus.")
@click.option("--skip-builtin", is_flag=True, help="Only the generated corpus.")
@click.option(
    "--generated-vocab",
    type=click.Choice(["train", "builtin"]),
    default="train",
    show_default=True,
    help="Run vocab on the generated corpus, or reuse the builtin corpus's tokenizer.",
)
@click.option(
    "--compare-mb",
    type=float,
    default=128,
    show_default=True,
    help="MB of generated train text the BPE encoders are compared on.",
)
@click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=REPO / "params.yaml",
    help="The params.yaml to start from.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to make the scratch folder (default: the system temp folder).",
)
@click.option(
    "--corpus-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Generate the corpus here and reuse it on later runs (kept).",
)
@click.option("--keep", is_flag=True, help="Keep the work directory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Corpus generator seed.")
@click.option(
    "--extrapolate-mb",
    type=float,
    default=1024,
    show_default=True,
    help="Estimate the run's duration for a generated corpus of this size.",
)
@click.option(
    "--sample-interval",
    type=float,
    default=0.05,
    show_default=True,
    help="Seconds between RSS samples of a stage's process tree.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the Markdown report to this file.",
)
def main(
    size_mb: tuple[float, ...],
    kinds: str,
    skip_generated: bool,
    skip_builtin: bool,
    generated_vocab: str,
    compare_mb: float,
    params_path: Path,
    work_dir: Path | None,
    corpus_dir: Path | None,
    keep: bool,
    seed: int,
    extrapolate_mb: float,
    sample_interval: float,
    out: Path | None,
) -> None:
    """Benchmark the data stages; see the module docstring (bench/bench_data.py)."""
    sys.path.insert(0, str(REPO))
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise click.BadParameter(f"{kinds!r}; allowed: a comma-separated subset of bpe,word,char")
    sizes = () if skip_generated else (size_mb or (1024.0,))
    if generated_vocab == "builtin" and skip_builtin and sizes:
        raise click.BadParameter("--generated-vocab builtin needs the builtin corpus")
    if any(s <= 0 for s in sizes):
        raise click.BadParameter("--size-mb must be > 0")
    if corpus_dir is not None and len(sizes) > 1:
        raise click.BadParameter("--corpus-dir holds one corpus: give one --size-mb")
    base = yaml.safe_load(params_path.read_text()) or {}
    # Always a fresh folder of our own (inside --work-dir if given): only it is deleted.
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gptpipe-bench-", dir=work_dir))
    click.echo(f"work directory: {root}", err=True)
    bench = Bench(base, root.resolve(), chosen, sample_interval, keep)
    batch_documents = int(base.get("tokenize", {}).get("batch_documents", 2048))
    corpora: list[Corpus] = []
    encoder_rows: list[EncoderRow] = []
    generated: list[Corpus] = []
    builtin_seconds = 0.0
    try:
        if not skip_builtin:
            begin = time.perf_counter()
            builtin = Corpus(
                "builtin",
                {"corpus": str(BUILTIN_CORPUS)},
                sum(len(t.encode("utf-8")) for t in builtin_texts()),
            )
            corpora.append(builtin)
            bench.run_corpus(builtin)
            if "bpe" in chosen:
                texts, _ = read_texts(bench.split_dirs["builtin"], ("train", "val"), None)
                click.echo("[builtin] comparing BPE encoders ...", err=True)
                encoder_rows.append(
                    compare_encoders(
                        "builtin train+val",
                        bench.tokenizers[("builtin", "bpe")],
                        texts,
                        batch_documents,
                        repeats=3,
                    )
                )
            builtin_seconds = time.perf_counter() - begin
        for size in sizes:
            target = (corpus_dir or root / f"corpus-{size:g}MB").resolve()
            corpus = generate_corpus(target, size, seed)
            corpora.append(corpus)
            generated.append(corpus)
            reuse = "builtin" if generated_vocab == "builtin" else None
            bench.run_corpus(corpus, reuse_vocab_from=reuse)
            if corpus_dir is None and not keep:
                shutil.rmtree(target)
            if "bpe" in chosen:
                limit = int(compare_mb * MB)
                texts, cut = read_texts(bench.split_dirs[corpus.name], ("train",), limit)
                click.echo(f"[{corpus.name}] comparing BPE encoders ...", err=True)
                label = f"{corpus.name} train" + (f" (first {compare_mb:g} MB)" if cut else "")
                encoder_rows.append(
                    compare_encoders(
                        label,
                        bench.tokenizers[(corpus.name, "bpe")],
                        texts,
                        batch_documents,
                        repeats=1,
                    )
                )
                del texts
        if generated and generated_vocab == "builtin":
            bench.notes.append(
                "Generated corpora: vocab was not run on them; tokenize used the builtin "
                "corpus's tokenizer of the same kind (--generated-vocab builtin)."
            )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    extra = extrapolation(
        bench, generated, builtin_seconds, encoder_rows, extrapolate_mb, compare_mb
    )
    text = report(bench, encoder_rows, corpora, extra)
    click.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        click.echo(f"written: {out}", err=True)


if __name__ == "__main__":
    main()
