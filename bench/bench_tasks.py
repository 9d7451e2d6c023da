"""How long the evaluate stage takes to score the builtin next-sentence task on the CPU.

What it measures, as the evaluate stage does it (``pipeline.lm.tasks``):

- ``items``: building the items from the test split's text (sentences of every document
  until ``--items`` have two; the distractors; the seeded order);
- ``bigram``: fitting the Witten-Bell bigram on the train token shards (the evaluate
  stage fits it once for bits per byte anyway; shown apart);
- ``score``: every (item, choice) sequence and every distinct choice alone through the
  model, in length-sorted batches of ``--batch-size``, and the bigram on the same items:
  the task's own cost.

Each phase is timed ``--repeats`` times and the median reported, with items/s for
scoring and the accuracies it found (the same on every repeat: the task is deterministic).

Usage (from the repository root, after ``dvc repro evaluate``):

    .venv/bin/python bench/bench_tasks.py --model models/pretrain/best \\
        --tokens data/tokens --test data/split/test
    .venv/bin/python bench/bench_tasks.py ... --threads 2 --out bench/results-tasks.md
    .venv/bin/python bench/bench_tasks.py ... --items 8 --repeats 1   # the smallest run

``--out FILE`` also writes the Markdown report there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from common import publish

from pipeline.core.params import EvaluateParams
from pipeline.data.shards import read_meta, read_tokens
from pipeline.lm.checkpoint import load_model, open_model_folder
from pipeline.lm.evaluation import BigramModel
from pipeline.lm.tasks import next_sentence_items, score_task

DEFAULTS = EvaluateParams()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder")
    parser.add_argument("--tokens", type=Path, required=True,
                        help="the token shards (data/tokens: train for the bigram)")
    parser.add_argument("--test", type=Path, required=True,
                        help="the test split's document table (data/split/test)")
    parser.add_argument("--items", type=int, default=DEFAULTS.task_items)
    parser.add_argument("--choices", type=int, default=DEFAULTS.task_choices)
    parser.add_argument("--seed", type=int, default=DEFAULTS.task_seed)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def timed(function, repeats: int):
    """(the last result, median seconds) of ``repeats`` calls."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    _, _, tokenizer = open_model_folder(args.model)
    model, _ = load_model(args.model, device)
    vocab = int(read_meta(args.tokens)["vocab_size"])
    items, items_s = timed(lambda: next_sentence_items(args.test, args.items, args.choices,
                                                       args.seed), args.repeats)
    train = read_tokens(args.tokens / "train")
    bigram, bigram_s = timed(lambda: BigramModel.fit(train, vocab), args.repeats)
    scores, score_s = timed(lambda: score_task(model, tokenizer, items, bigram,
                                               args.batch_size, device), args.repeats)
    c = model.config
    sequences = sum(len(item.choices) for item in items)
    lines = [
        "## The builtin next-sentence task: scoring time",
        "",
        f"Model: `{args.model}`, {c.n_layer} layers x {c.n_embd}, context {c.context}, vocab "
        f"{c.vocab_size} ({model.num_parameters() / 1e6:.2f}M parameters). CPU: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}. "
        f"Median of {args.repeats}.",
        "",
        "| phase | seconds | items/s |",
        "|---|---:|---:|",
        f"| items: {len(items)} from `{args.test}` | {items_s:.2f} | |",
        f"| bigram fit on {len(train):,} train tokens | {bigram_s:.2f} | |",
        f"| score: {sequences} choices (model and bigram) | {score_s:.2f} | "
        f"{len(items) / score_s:,.1f} |",
        "",
        "| | acc | acc_norm | acc_pmi |",
        "|---|---:|---:|---:|",
        *(f"| {who} | {scores[f'{key}acc']:.3f} | {scores[f'{key}acc_norm']:.3f} | "
          f"{scores[f'{key}acc_pmi']:.3f} |" for who, key in (("model", ""),
                                                               ("bigram", "bigram_"))),
        f"| chance | {scores['chance']:.3f} | {scores['chance']:.3f} | "
        f"{scores['chance']:.3f} |",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
