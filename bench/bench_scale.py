"""A big corpus end to end: every stage's wall time and peak memory at two corpus sizes.

For the builtin corpus and for generated corpora of each ``--size-mb`` (JSONL shards
built from the builtin corpus's sentences by ``common.generate_corpus``; 2048 MB and more
is the "bigger than a laptop's spare RAM" case), a scratch copy of this project (its own
git + DVC repository, the default params.yaml) runs every stage of dvc.yaml in order,
each as ``dvc repro --single-item <stage>`` (what a user's ``dvc repro`` runs, DVC's
hashing and caching of the outputs included), with a short training budget:
``train.steps`` (default 100) and short preference, reward, SFT and RL runs. For each
stage it records:

- seconds: wall time of ``dvc repro --single-item`` (start-up and DVC's caching included);
- largest process: the peak RSS of the largest single process (``os.wait4``'s ru_maxrss:
  DVC, the stage, or any worker the stage waited for);
- process tree: the sampled peak of the summed RSS of DVC, the stage and its workers.

Goals: every stage under 2 GB on both measures at every size, not growing with the
corpus; pretraining tokens/s on the biggest corpus within 5% of the builtin corpus's
(``metrics/pretrain_speed.json``, the steady-state rate).

``--smallest`` checks that the script works, in about a minute: the tiny params
(``tests/tiny_params.yaml``) on one generated corpus of 0.1 MB, no builtin corpus.

Usage (from the repository root; about an hour on 2 cores for 512 MB and 2048 MB, run it
alone: anything beside it skews the times)::

    .venv/bin/python bench/bench_scale.py --size-mb 512 --size-mb 2048 \\
        --corpus-dir /var/tmp/gptpipe-corpus --out bench/results-scale.md
    # the bounded data stages, 2 GB beside 8 GB: 70 GB of free disk (outputs and DVC's
    # cache are about 5 GB per GB of text); the data stages take 10-15 minutes a GB on 2 cores
    .venv/bin/python bench/bench_scale.py --size-mb 2048 --size-mb 8192 \\
        --corpus-dir /var/tmp/gptpipe-corpus --out bench/results-scale.md
    .venv/bin/python bench/bench_scale.py --smallest
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import click
import psutil
import torch
import yaml
from common import (
    BIN,
    MB,
    TINY_PARAMS,
    generate_corpus,
    md_table,
    publish,
    run_measured,
    scratch_repo,
    work_dir_and_out,
    work_folder,
)

from pipeline.core.io import read_json

SMALLEST_MB = 0.1


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


def run_corpus(name: str, data: dict, root: Path, budget: dict, interval: float) -> dict:
    """Every stage of a scratch repository on one corpus, measured."""
    # The corpus's data.* last: the tiny params name a corpus of their own.
    overrides = budget | {f"data.{key}": value for key, value in data.items()}
    repo = scratch_repo(root / name, overrides)
    rows = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        click.echo(f"[{name}] {stage}", err=True)
        log = root / f"{name}-{stage}.log"
        measured = run_measured(["dvc", "repro", "--single-item", stage], repo, log, interval)
        rows.append({"stage": stage, "seconds": measured.seconds,
                     "max_rss": measured.max_rss, "tree_rss": measured.tree_rss})
    speed = read_json(repo / "metrics/pretrain_speed.json")
    tokens = read_json(repo / "data/tokens/meta.json")["splits"]
    ingest = read_json(repo / "metrics/ingest.json")
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


def report(results: list[dict], budget_line: str) -> str:
    lines = ["### A big corpus end to end (`bench/bench_scale.py`)", "", *environment(), "",
             f"{budget_line}; each stage run as `dvc repro --single-item <stage>`. RSS in MB "
             "(2**20 bytes).", ""]
    corpus_rows = [[r["name"], f"{r['text_bytes'] / MB:,.0f}", f"{r['documents']:,}",
                    f"{r['train_tokens']:,}", f"{r['tokens_per_second']:,.0f}"]
                   for r in results]
    lines += [md_table(["corpus", "text MB", "documents", "train tokens", "pretrain tokens/s"],
                       corpus_rows), ""]
    headers = ["stage"]
    for r in results:
        headers += [f"{r['name']} s", f"{r['name']} largest MB", f"{r['name']} tree MB"]
    table = []
    for index, row in enumerate(results[0]["rows"]):
        cells = [row["stage"]]
        for r in results:
            cell = r["rows"][index]
            cells += [f"{cell['seconds']:.1f}", f"{cell['max_rss'] / MB:,.0f}",
                      f"{cell['tree_rss'] / MB:,.0f}"]
        table.append(cells)
    lines += [md_table(headers, table), ""]
    lines += [data_seconds_per_gb(results), ""]
    stage, name, peak = max(((row["stage"], r["name"], max(row["max_rss"], row["tree_rss"]))
                             for r in results for row in r["rows"]), key=lambda item: item[2])
    lines.append(f"Highest peak of any stage: {peak / MB:,.0f} MB ({stage} on {name}); "
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-interval", type=float, default=0.2, show_default=True)
@click.option("--smallest", is_flag=True,
              help=f"Tiny params on one {SMALLEST_MB:g} MB generated corpus: a check that "
                   "the script works, not a measurement.")
@work_dir_and_out
def main(sizes, steps, corpus_dir, work_dir, seed, sample_interval, smallest, out) -> None:
    # dvc, and the stage commands it starts, are this environment's.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    work = work_folder("gptpipe-scale-", work_dir)
    corpora: list[tuple[str, dict]] = [] if smallest else [("builtin", {})]  # params.yaml's
    base = corpus_dir or work / "corpora"
    for size in (SMALLEST_MB,) if smallest else sizes:
        corpus = generate_corpus(base / f"{size:g}MB", size, seed)
        corpora.append((corpus.name, corpus.data_params))
    budget = TINY_PARAMS if smallest else short_budget(steps)
    budget_line = ("Tiny params (tests/tiny_params.yaml)" if smallest else
                   f"Default params, `train.steps: {steps}` and short alignment stages")
    results = [run_corpus(name, data, work, budget, sample_interval) for name, data in corpora]
    publish(report(results, budget_line), out)
    click.echo(f"work directory: {work} (delete it when done)", err=True)


if __name__ == "__main__":
    main()
