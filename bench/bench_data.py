"""Benchmark the data stages: wall time, MB/s and peak RSS of each stage, per vocab kind.

Every stage runs as its own subprocess through the real CLI, with exactly the options
dvc.yaml gives it (``gptpipe <stage> --params ... --input ... --out ... --metrics ...``),
in a scratch work directory, measured by ``common.run_measured``: wall time (start-up
included), CPU time, the peak RSS of the largest single process (``os.wait4``, exact) and
of the whole process tree summed (sampled every ``--sample-interval`` seconds).

Corpora: the builtin corpus (data/builtin/wikipedia-en.corpus, about 4.9 MB) and
generated ones of ``--size-mb`` MB (default 1024: ``common.generate_corpus``, JSONL
shards of the builtin corpus's sentences re-sampled with a seeded RNG). ingest, clean
and split run once per corpus; vocab and tokenize once per vocab kind.

Then, in this process, the bpe tokenizer of each corpus encodes the same texts three ways,
in batches of ``tokenize.batch_documents``: gptpipe's tiktoken path
(``load_tokenizer(path, fast=True).encode_batch``), plain HF ``tokenizers``
``Tokenizer.from_file(path).encode_batch`` and HF ``encode_batch_fast``, on the builtin
corpus's train+val splits (best of 3) and the first ``--compare-mb`` MB of the generated
train split (once), each warmed up on one batch first. Last, each stage's time is fitted
against the generated sizes and extrapolated to ``--extrapolate-mb``.

Text measured (MB = 2**20 bytes of UTF-8 text): ingest: the corpus text; clean, split,
tokenize: the clean text; vocab: the train split it learns from.

Usage (from the repository root; options: ``--help``)::

    .venv/bin/python bench/bench_data.py --out bench/results-data.md   # builtin + 1 GB
    .venv/bin/python bench/bench_data.py --kinds bpe --size-mb 5       # a quick check
    .venv/bin/python bench/bench_data.py --skip-builtin --size-mb 16 --size-mb 64

Benchmarks are scripts, never timed tests: run this on a quiet machine, one at a time.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml
from common import (
    BUILTIN_CORPUS,
    MB,
    REPO_ROOT,
    Corpus,
    Measured,
    builtin_texts,
    cpu_name,
    generate_corpus,
    git_commit,
    md_table,
    publish,
    run_measured,
    work_dir_and_out,
    work_folder,
)

from pipeline.core.io import read_json

KINDS = ("bpe", "word", "char")
RSS_LIMIT = 1536 * MB  # the bound: 1.5 GB per stage on the 1 GB corpus


@dataclass
class StageRun:
    """One stage subprocess and what it cost."""

    corpus: str
    kind: str  # "" for ingest, clean and split (shared by every kind)
    stage: str
    text_bytes: int
    measured: Measured
    size_mb: float | None = None  # the generated corpus's size, for the extrapolation


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

    def write_params(self, where: Path, corpus: Corpus, kind: str) -> None:
        params = json.loads(json.dumps(self.base_params))  # a deep copy
        params["data"] = {**params.get("data", {}), **corpus.data_params}
        params.setdefault("vocab", {})["kind"] = kind
        (where / f"params-{kind}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def stage(self, corpus: Corpus, where: Path, kind: str, stage: str, text_bytes: Callable,
              options: list[str]) -> None:
        """Run and record one stage; ``text_bytes(metrics)`` says how much text it read."""
        metrics = f"metrics/{stage}-{kind}.json" if kind else f"metrics/{stage}.json"
        args = [*gptpipe_command(), stage, "--params", f"params-{kind or self.kinds[0]}.yaml",
                *options, "--metrics", metrics]
        label = f"{stage}-{kind}" if kind else stage
        click.echo(f"[{corpus.name}] {label} ...", err=True, nl=False)
        try:
            result = run_measured(args, where, where / "logs" / f"{label}.log", self.interval)
        except click.ClickException as err:
            click.echo(" failed", err=True)
            if not self.keep:
                err.message += ("\n(the work directory is deleted: rerun with --keep to read "
                                "the log)")
            raise
        click.echo(f" {result.seconds:.1f} s, {result.peak / MB:.0f} MB peak", err=True)
        read = read_json(where / metrics)
        if stage == "clean":
            self.clean_metrics[corpus.name] = read
        self.runs.append(StageRun(corpus.name, kind, stage, text_bytes(read), result,
                                  corpus.size_mb))

    def run_corpus(self, corpus: Corpus, reuse_vocab_from: str | None = None) -> None:
        where = self.work_dir / corpus.name
        if where.exists():
            shutil.rmtree(where)
        (where / "logs").mkdir(parents=True)
        for kind in self.kinds:
            self.write_params(where, corpus, kind)
        self.stage(corpus, where, "", "ingest", lambda m: m["bytes"], ["--out", "data/raw"])
        self.stage(corpus, where, "", "clean", lambda m: m["bytes_out"],
                   ["--input", "data/raw", "--out", "data/clean"])
        clean_bytes = self.clean_metrics[corpus.name]["bytes_out"]
        self.stage(corpus, where, "", "split", lambda m: clean_bytes,
                   ["--input", "data/clean", "--out", "data/split"])
        train_bytes = read_json(where / "metrics/split.json")["train"]["bytes"]
        self.split_dirs[corpus.name] = where / "data" / "split"
        if not self.keep:
            shutil.rmtree(where / "data" / "raw")
            shutil.rmtree(where / "data" / "clean")
        for kind in self.kinds:
            if reuse_vocab_from is None:
                tokenizer = where / "data" / "vocab" / kind / "tokenizer.json"
                self.stage(corpus, where, kind, "vocab", lambda m: train_bytes,
                           ["--input", "data/split", "--out", str(tokenizer.relative_to(where))])
            else:
                tokenizer = self.tokenizers[(reuse_vocab_from, kind)]
            self.tokenizers[(corpus.name, kind)] = tokenizer
            self.stage(corpus, where, kind, "tokenize",
                       lambda m: sum(m[split]["bytes"] for split in ("train", "val", "test")),
                       ["--input", "data/split", "--tokenizer", str(tokenizer),
                        "--out", "data/tokens"])
            if not self.keep:
                shutil.rmtree(where / "data" / "tokens")


# -------------------------------------------------------------------------- encoders


@dataclass
class EncoderRow:
    corpus: str
    text_bytes: int
    documents: int
    rates: dict[str, float]  # encoder -> MB/s
    agree: bool  # ids identical on the warm-up batch and token totals equal


def read_texts(split_dir: Path, splits: Sequence[str], limit: int | None) -> tuple[list[str], bool]:
    """Texts of ``splits`` in order, stopping once ``limit`` UTF-8 bytes are reached, and
    whether the limit cut them short."""
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


def compare_encoders(corpus: str, tokenizer_path: Path, texts: list[str], batch_documents: int,
                     repeats: int) -> EncoderRow:
    """MB/s of gptpipe's tiktoken path, HF encode_batch and HF encode_batch_fast."""
    from tokenizers import Tokenizer

    from pipeline.data.tokenizer import load_tokenizer

    fast = load_tokenizer(tokenizer_path, fast=True)
    if not fast.uses_fast_encoder:
        raise click.ClickException(f"{tokenizer_path}: the tiktoken path is not in use")
    hf = Tokenizer.from_file(str(tokenizer_path))
    encoders: dict[str, Callable[[list[str]], list[list[int]]]] = {
        "gptpipe (tiktoken)": fast.encode_batch,
        "HF encode_batch": lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)],
    }
    if hasattr(hf, "encode_batch_fast"):  # tokenizers 0.21 and later
        encoders["HF encode_batch_fast"] = lambda b: [
            e.ids for e in hf.encode_batch_fast(b, add_special_tokens=False)]
    batches = [texts[i : i + batch_documents] for i in range(0, len(texts), batch_documents)]
    warm = {name: encode(batches[0]) for name, encode in encoders.items()}
    agree = all(ids == warm["HF encode_batch"] for ids in warm.values())
    best = dict.fromkeys(encoders, float("inf"))
    tokens = dict.fromkeys(encoders, 0)
    for _ in range(repeats):
        for name, encode in encoders.items():
            begin = time.perf_counter()
            tokens[name] = sum(len(ids) for batch in batches for ids in encode(batch))
            best[name] = min(best[name], time.perf_counter() - begin)
    size = sum(len(t.encode("utf-8")) for t in texts)
    rates = {name: size / MB / seconds for name, seconds in best.items()}
    return EncoderRow(corpus, size, len(texts), rates, agree and len(set(tokens.values())) == 1)


# --------------------------------------------------------------------------- report


def _mb(value: int) -> str:
    return f"{value / MB:,.0f}"


def _rate(size: int, seconds: float) -> str:
    return f"{size / MB / seconds:,.1f}" if seconds > 0 else "n/a"


def environment() -> list[str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {version(name)}"
                         for name in ("torch", "tokenizers", "tiktoken", "pyarrow"))
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_name()}, {usable} usable cores ({os.cpu_count()} online)",
        f"- Python {platform.python_version()}, {packages}",
        f"- gptpipe commit: {git_commit()}",
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
        (x - mean_x) ** 2 for x, _ in points)
    if slope <= 0:
        return proportional, largest_value / largest_size, "proportional (no positive slope)"
    return mean_y + slope * (target - mean_x), slope, "linear fit"


def extrapolation(bench: Bench, generated: list[Corpus], builtin_seconds: float,
                  encoder_rows: list[EncoderRow], target_mb: float, compare_mb: float) -> list[str]:
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
        seconds, slope, method = _fit([(r.size_mb, r.measured.seconds) for r in runs], target_mb)
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
        compare = sum(min(compare_mb, 0.8 * target_mb) / rate for rate in rates[-1].values())
        total += compare
        rows.append(["(encoder comparison)", "bpe", f"{compare:,.0f}", "", "", "measured MB/s"])
    measured = ", ".join(f"{s:g}" for s in sizes)
    headers = ["stage", "kind", "wall s", "CPU s", "MB/s (slope)", "method"]
    bound = (" (an upper bound: some stages were scaled in proportion, start-up included)."
             if upper_bound else ".")
    return [
        f"## Extrapolation to a {target_mb:g} MB generated corpus", "",
        f"Fitted per stage on the generated corpora measured here ({measured} MB); the "
        "builtin corpus's measured time is added as is. Fits from sizes of a few MB are "
        "dominated by start-up and by noise: use sizes of 16 MB or more for a useful one.", "",
        md_table(headers, rows), "",
        f"Estimated duration of the whole run: **{total / 60:,.0f} min**" + bound, "",
    ]


def stage_table(bench: Bench) -> str:
    rows = [[r.corpus, r.kind or "all", r.stage, f"{r.measured.seconds:,.1f}",
             f"{r.measured.cpu_seconds:,.1f}", f"{r.text_bytes / MB:,.1f}",
             _rate(r.text_bytes, r.measured.seconds), _mb(r.measured.max_rss),
             _mb(r.measured.tree_rss)] for r in bench.runs]
    return md_table(["corpus", "kind", "stage", "seconds", "CPU s", "text MB", "MB/s",
                     "peak RSS MB (largest process)", "peak RSS MB (process tree)"], rows)


def clean_tokenize_table(bench: Bench, corpora: list[Corpus]) -> str:
    rows = []
    for corpus in corpora:
        shared = [r for r in bench.runs if r.corpus == corpus.name and not r.kind]
        clean = next((r for r in shared if r.stage == "clean"), None)
        for kind in bench.kinds if clean else ():
            own = [r for r in bench.runs if r.corpus == corpus.name and r.kind == kind]
            tokenize = next((r for r in own if r.stage == "tokenize"), None)
            if tokenize is None:
                continue
            peak = max(r.measured.peak for r in [*shared, *own])
            seconds = clean.measured.seconds + tokenize.measured.seconds
            rows.append([corpus.name, kind, f"{clean.text_bytes / MB:,.1f}",
                         f"{clean.measured.seconds:,.1f}", f"{tokenize.measured.seconds:,.1f}",
                         _rate(clean.text_bytes, seconds), _mb(peak),
                         "yes" if peak < RSS_LIMIT else "**no**"])
    return md_table(["corpus", "kind", "clean text MB", "clean s", "tokenize s",
                     "clean+tokenize MB/s", "max peak RSS MB (any stage)", "< 1.5 GB"], rows)


def encoder_table(encoder_rows: list[EncoderRow]) -> list[str]:
    names = list(encoder_rows[0].rates)
    rows = [[e.corpus, f"{e.text_bytes / MB:,.1f}", f"{e.documents:,}",
             *(f"{e.rates[n]:,.1f}" for n in names),
             f"**{e.rates['gptpipe (tiktoken)'] / e.rates['HF encode_batch']:.2f}x**",
             "yes" if e.agree else "**no**"] for e in encoder_rows]
    headers = ["texts", "MB", "documents", *(f"{n} MB/s" for n in names),
               "tiktoken / encode_batch", "same ids"]
    return ["## BPE encoding: gptpipe (tiktoken) vs Hugging Face tokenizers", "",
            md_table(headers, rows), "",
            "Same tokenizer.json, same texts, batches of tokenize.batch_documents, one "
            "warm-up batch each; builtin: best of 3, generated: one pass. Goal: >= 2x.", ""]


def notes(bench: Bench, corpora: list[Corpus]) -> list[str]:
    lines = []
    for corpus in corpora:
        clean = bench.clean_metrics.get(corpus.name)
        if clean is None:
            continue
        note = (f"{corpus.name}: {clean['documents_in']:,} documents, "
                f"{clean['documents_out']:,} kept ({clean['dropped_exact_duplicate']} exact "
                f"duplicates, {clean['dropped_too_short']} too short)")
        if corpus.size_mb is not None:
            note += f"; generated in {corpus.generate_seconds:,.1f} s (not a stage)"
        lines.append(f"- {note}.")
    lines += [f"- {n}" for n in bench.notes]
    lines += [
        "- MB = 2^20 bytes of UTF-8 text. ingest: corpus text; clean, split, tokenize: clean "
        "text; vocab: train split. Seconds: wall time, the subprocess's start-up included. "
        "CPU s: user + system time of the stage and its workers (above seconds: parallel).",
        "- Largest process: os.wait4 ru_maxrss of the stage or any worker (exact). Process "
        "tree: stage + workers summed, sampled (shared pages counted once per process).",
    ]
    return ["## Notes", "", *lines, ""]


def report(bench: Bench, encoder_rows: list[EncoderRow], corpora: list[Corpus],
           extra: list[str]) -> str:
    lines = ["# Data stage benchmark", "", *environment(), ""]
    lines += ["## Stages", "", stage_table(bench), ""]
    lines += ["## Clean + tokenize", "", clean_tokenize_table(bench, corpora), ""]
    if encoder_rows:
        lines += encoder_table(encoder_rows)
    lines += notes(bench, corpora) + extra
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------ CLI


def measure_corpora(bench: Bench, sizes: Sequence[float], skip_builtin: bool,
                    generated_vocab: str, compare_mb: float, corpus_dir: Path | None,
                    seed: int) -> tuple[list[Corpus], list[EncoderRow], float]:
    """Run every corpus: (corpora, encoder rows, seconds the builtin corpus took)."""
    batch_documents = int(bench.base_params.get("tokenize", {}).get("batch_documents", 2048))
    corpora: list[Corpus] = []
    encoder_rows: list[EncoderRow] = []
    builtin_seconds = 0.0
    if not skip_builtin:
        begin = time.perf_counter()
        builtin = Corpus("builtin", {"corpus": str(BUILTIN_CORPUS)},
                         sum(len(t.encode("utf-8")) for t in builtin_texts()))
        corpora.append(builtin)
        bench.run_corpus(builtin)
        if "bpe" in bench.kinds:
            texts, _ = read_texts(bench.split_dirs["builtin"], ("train", "val"), None)
            click.echo("[builtin] comparing BPE encoders ...", err=True)
            encoder_rows.append(compare_encoders("builtin train+val",
                                                 bench.tokenizers[("builtin", "bpe")], texts,
                                                 batch_documents, repeats=3))
        builtin_seconds = time.perf_counter() - begin
    for size in sizes:
        target = (corpus_dir or bench.work_dir / f"corpus-{size:g}MB").resolve()
        corpus = generate_corpus(target, size, seed)
        corpora.append(corpus)
        bench.run_corpus(corpus, reuse_vocab_from="builtin" if generated_vocab == "builtin"
                         else None)
        if corpus_dir is None and not bench.keep:
            shutil.rmtree(target)
        if "bpe" in bench.kinds:
            texts, cut = read_texts(bench.split_dirs[corpus.name], ("train",),
                                    int(compare_mb * MB))
            click.echo(f"[{corpus.name}] comparing BPE encoders ...", err=True)
            label = f"{corpus.name} train" + (f" (first {compare_mb:g} MB)" if cut else "")
            encoder_rows.append(compare_encoders(label, bench.tokenizers[(corpus.name, "bpe")],
                                                 texts, batch_documents, repeats=1))
    if sizes and generated_vocab == "builtin":
        bench.notes.append("Generated corpora: vocab was not run on them; tokenize used the "
                           "builtin corpus's tokenizer of the same kind (--generated-vocab "
                           "builtin).")
    return corpora, encoder_rows, builtin_seconds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size-mb", type=float, multiple=True,
              help="Generated corpus size in MB (2^20 bytes of text); repeatable.  "
                   "[default: 1024]")
@click.option("--kinds", default=",".join(KINDS), show_default=True,
              help="Comma-separated vocab kinds.")
@click.option("--skip-generated", is_flag=True, help="Only the builtin corpus.")
@click.option("--skip-builtin", is_flag=True, help="Only the generated corpus.")
@click.option("--generated-vocab", type=click.Choice(["train", "builtin"]), default="train",
              show_default=True,
              help="Run vocab on the generated corpus, or reuse the builtin corpus's tokenizer.")
@click.option("--compare-mb", type=float, default=128, show_default=True,
              help="MB of generated train text the BPE encoders are compared on.")
@click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path),
              default=REPO_ROOT / "params.yaml", help="The params.yaml to start from.")
@click.option("--corpus-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Generate the corpus here and reuse it on later runs (kept).")
@click.option("--keep", is_flag=True, help="Keep the work directory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Corpus generator seed.")
@click.option("--extrapolate-mb", type=float, default=1024, show_default=True,
              help="Estimate the run's duration for a generated corpus of this size.")
@click.option("--sample-interval", type=float, default=0.05, show_default=True,
              help="Seconds between RSS samples of a stage's process tree.")
@work_dir_and_out
def main(size_mb: tuple[float, ...], kinds: str, skip_generated: bool, skip_builtin: bool,
         generated_vocab: str, compare_mb: float, params_path: Path, work_dir: Path | None,
         corpus_dir: Path | None, keep: bool, seed: int, extrapolate_mb: float,
         sample_interval: float, out: Path | None) -> None:
    """Benchmark the data stages; see the module docstring (bench/bench_data.py)."""
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if not chosen or any(k not in KINDS for k in chosen):
        raise click.BadParameter(f"{kinds!r}; allowed: a comma-separated subset of bpe,word,char")
    sizes = () if skip_generated else (size_mb or (1024.0,))
    if generated_vocab == "builtin" and skip_builtin and sizes:
        raise click.BadParameter("--generated-vocab builtin needs the builtin corpus")
    if any(s <= 0 for s in sizes):
        raise click.BadParameter("--size-mb must be > 0")
    if corpus_dir is not None and len(sizes) > 1:
        raise click.BadParameter("--corpus-dir holds one corpus: give one --size-mb")
    base = yaml.safe_load(params_path.read_text()) or {}
    root = work_folder("gptpipe-bench-", work_dir)
    click.echo(f"work directory: {root}", err=True)
    bench = Bench(base, root, chosen, sample_interval, keep)
    try:
        corpora, encoder_rows, builtin_seconds = measure_corpora(
            bench, sizes, skip_builtin, generated_vocab, compare_mb, corpus_dir, seed)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    generated = [c for c in corpora if c.size_mb is not None]
    extra = extrapolation(bench, generated, builtin_seconds, encoder_rows, extrapolate_mb,
                          compare_mb)
    publish(report(bench, encoder_rows, corpora, extra), out)


if __name__ == "__main__":
    main()
