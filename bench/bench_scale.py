"""A big corpus end to end: every stage's wall time and peak memory at two corpus sizes.

For the builtin corpus and for generated corpora of each ``--size-mb`` (JSONL shards
built from the builtin corpus's sentences by ``bench/bench_data.py``'s generator; 2048 MB
and more is the "bigger than a laptop's spare RAM" case), a scratch copy of this project
(its own git + DVC repository, the default params.yaml) runs every stage of dvc.yaml in
order, each as ``dvc repro --single-item <stage>`` (what a user's ``dvc repro`` runs,
DVC's hashing and caching of the outputs included), with a short training budget:
``train.steps`` (default 100) and short preference, reward, SFT and RL runs. For each
stage it records:

- seconds: wall time of ``dvc repro --single-item`` (start-up and DVC's caching included);
- largest process: the peak RSS of the largest single process (``os.wait4``'s ru_maxrss:
  DVC, the stage, or any worker the stage waited for);
- process tree: the sampled peak of the summed RSS of DVC, the stage and its workers.

Goals: every stage under 2 GB on both measures at every size, not growing with the
corpus; pretraining tokens/s on the biggest corpus within 5% of the builtin corpus's
(``metrics/pretrain_speed.json``, the steady-state rate).

Usage (from the repository root; about an hour on 2 cores for 512 MB and 2048 MB, run it
alone: anything beside it skews the times)::

    .venv/bin/python bench/bench_scale.py --size-mb 512 --size-mb 2048 \\
        --corpus-dir /var/tmp/gptpipe-corpus --out bench/results-scale.md
    # the bounded data stages, 2 GB beside 8 GB (about 1.5 hours; 70 GB of free disk)
    .venv/bin/python bench/bench_scale.py --size-mb 2048 --size-mb 8192 \\
        --corpus-dir /var/tmp/gptpipe-corpus --out bench/results-scale.md
    .venv/bin/python bench/bench_scale.py --size-mb 8 --steps 10   # a smoke run
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import click
import psutil
import torch
import yaml

# Run as a script, bench/ is on the import path: the data bench's generator and meter.
from bench_data import generate_corpus, md_table, run_measured
from common import scratch_repo

MB = 2**20


def short_budget(steps: int) -> dict:
    """A whole pipeline in minutes: the default model, ``steps`` pretraining steps, and
    short alignment stages (their cost does not depend on the corpus size)."""
    return {
        "train.steps": steps,
        "train.warmup_steps": max(1, steps // 10),
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.log_every": max(1, steps // 10),
        "preferences.num_prompts": 64,
        "preferences.min_pairs": 16,
        "reward.epochs": 1,
        "sft.epochs": 1,
        "rlhf.steps": 4,
        "rlhf.eval_every": 2,
        "rlhf.eval_prompts": 8,
    }


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def run_corpus(name: str, data: dict, root: Path, steps: int, interval: float) -> dict:
    """Every stage of a scratch repository on one corpus, measured."""
    overrides = {f"data.{key}": value for key, value in data.items()} | short_budget(steps)
    repo = scratch_repo(root / name, overrides)
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    rows = []
    for stage in stage_names(repo):
        click.echo(f"[{name}] {stage}", err=True)
        log = root / f"{name}-{stage}.log"
        measured = run_measured(["dvc", "repro", "--single-item", stage], repo, log, interval)
        rows.append({"stage": stage, "seconds": measured.seconds,
                     "max_rss": measured.max_rss, "tree_rss": measured.tree_rss or 0})
    speed = json.loads((repo / "metrics/pretrain_speed.json").read_text())
    tokens = json.loads((repo / "data/tokens/meta.json").read_text())["splits"]
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    return {"name": name, "rows": rows, "tokens_per_second": speed["tokens_per_second"],
            "train_tokens": tokens["train"]["tokens"], "text_bytes": ingest["bytes"],
            "documents": ingest["documents"]}


def environment() -> list[str]:
    memory = psutil.virtual_memory().total / 2**30
    return [
        f"- machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {memory:.0f} GiB RAM; {platform.platform()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
    ]


# The stages whose work grows with the corpus's text (the others' with the model's budget).
DATA_STAGES = ("ingest", "clean", "split", "vocab", "tokenize")


def data_seconds_per_gb(results: list[dict]) -> str:
    """Each data stage's wall time per GiB of corpus text, on each corpus."""
    rows = []
    for stage in DATA_STAGES:
        cells = [stage]
        for r in results:
            seconds = next((row["seconds"] for row in r["rows"] if row["stage"] == stage), None)
            cells.append("" if seconds is None else f"{seconds / (r['text_bytes'] / 2**30):,.0f}")
        rows.append(cells)
    return md_table(["data stage", *(f"{r['name']} s/GB" for r in results)], rows)


def report(results: list[dict], steps: int) -> str:
    lines = ["### A big corpus end to end (`bench/bench_scale.py`)", "", *environment(), "",
             f"Default params, `train.steps: {steps}` and short alignment stages; each stage "
             "run as `dvc repro --single-item <stage>`. RSS in MB (2**20 bytes).", ""]
    corpus_rows = [[r["name"], f"{r['text_bytes'] / MB:,.0f}", f"{r['documents']:,}",
                    f"{r['train_tokens']:,}", f"{r['tokens_per_second']:,.0f}"]
                   for r in results]
    lines += [md_table(["corpus", "text MB", "documents", "train tokens", "pretrain tokens/s"],
                       corpus_rows), ""]
    stages = [row["stage"] for row in results[0]["rows"]]
    headers = ["stage"]
    for r in results:
        headers += [f"{r['name']} s", f"{r['name']} largest MB", f"{r['name']} tree MB"]
    table = []
    for index, stage in enumerate(stages):
        cells = [stage]
        for r in results:
            row = r["rows"][index]
            cells += [f"{row['seconds']:.1f}", f"{row['max_rss'] / MB:,.0f}",
                      f"{row['tree_rss'] / MB:,.0f}"]
        table.append(cells)
    lines += [md_table(headers, table), ""]
    lines += [data_seconds_per_gb(results), ""]
    peak = max(max(row["max_rss"], row["tree_rss"]) for r in results for row in r["rows"])
    worst = max(((row["stage"], r["name"], max(row["max_rss"], row["tree_rss"]))
                 for r in results for row in r["rows"]), key=lambda item: item[2])
    lines.append(f"Highest peak of any stage: {peak / MB:,.0f} MB ({worst[0]} on {worst[1]}); "
                 f"goal < 2,048 MB: {'met' if peak < 2 * 2**30 else 'NOT met'}.")
    if len(results) > 1:
        base, big = results[0], results[-1]
        ratio = big["tokens_per_second"] / base["tokens_per_second"]
        lines.append(f"Pretraining tokens/s, {big['name']} over {base['name']}: {ratio:.3f} "
                     f"(goal within 5%: {'met' if abs(ratio - 1) <= 0.05 else 'NOT met'}).")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--size-mb", "sizes", type=float, multiple=True, default=(512.0, 2048.0),
              show_default=True, help="Generated corpus size; repeat for several.")
@click.option("--steps", type=int, default=100, show_default=True,
              help="Pretraining steps on every corpus.")
@click.option("--corpus-dir", type=click.Path(path_type=Path), default=None,
              help="Where to generate (and reuse) the corpora.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-interval", type=float, default=0.2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write the Markdown report here.")
def main(sizes, steps, corpus_dir, work_dir, seed, sample_interval, out) -> None:
    work = Path(tempfile.mkdtemp(prefix="gptpipe-scale-", dir=work_dir))
    corpora: list[tuple[str, dict]] = [("builtin", {})]  # params.yaml's own corpus
    base = corpus_dir or work / "corpora"
    for size in sizes:
        corpus = generate_corpus(base / f"{size:g}MB", size, seed)
        corpora.append((corpus.name, corpus.data_params))
    results = [run_corpus(name, data, work, steps, sample_interval) for name, data in corpora]
    text = report(results, steps)
    click.echo(text)
    if out is not None:
        out.write_text(text)
    click.echo(f"work directory: {work} (delete it when done)", err=True)


if __name__ == "__main__":
    main()
