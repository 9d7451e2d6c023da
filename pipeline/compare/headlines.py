"""The headline figures ``gptpipe compare`` reports, and where each one's uncertainty
and per-item rows live.

Every figure is an average over units (documents, task items, pairs, prompts), so each
names its metrics file and key, which way is better, how its within-run uncertainty is
written (``se``: a standard error ``<key>_se``; ``proportion``: a Wilson interval
``<key>_lo`` .. ``<key>_hi``), and the per-item table that pairs two runs unit by unit:
its file, the rows that count, the column naming a unit, and the figure as a ratio of
two column sums (a mean is a ratio over a column of ones).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Items:
    """Where a figure's units are: a per-item table, the rows that count (``column``
    equal to ``value``; None: every row), the key naming a unit in every run, and the
    figure as ``scale * sum(numerator) / sum(denominator)`` (None: a count of rows)."""

    table: str
    kind: str  # what read_item_scores checks
    key: str
    numerator: str
    denominator: str | None = None
    where: tuple[str, str] | None = None
    scale: float = 1.0
    unit: str = "items"
    source: str | None = None  # only the documents of this corpus source (data.sources)


@dataclass(frozen=True)
class Headline:
    """One figure compare reports."""

    file: str
    key: str
    higher_is_better: bool | None  # None: neither (a KL), reported as higher or lower
    error: str  # "se" or "proportion"
    items: Items | None = None
    per_token: bool = False  # compares only between runs with one tokenizer

    @property
    def name(self) -> str:
        """``<metrics file stem>.<key>``: what --fail-on names."""
        return f"{self.file.removeprefix('metrics/').removesuffix('.json')}.{self.key}"


def _evaluate_headlines(stem: str, suffix: str) -> list[Headline]:
    """The figures of one evaluate stage (``metrics/<stem>.json``)."""
    documents = f"evaluation/documents{suffix}.parquet"
    tasks = f"evaluation/tasks{suffix}.parquet"
    found = []
    for split in ("val", "test"):
        found += [
            Headline(f"metrics/{stem}.json", f"{split}.bpb", False, "se",
                     Items(documents, "documents", "text_sha256", "nats", "bytes",
                           ("split", split), 1 / math.log(2), "documents")),
            Headline(f"metrics/{stem}.json", f"{split}.loss", False, "se",
                     Items(documents, "documents", "text_sha256", "nats", "tokens",
                           ("split", split), 1.0, "documents"), per_token=True),
        ]
    for task in ("next_sentence", "task_file"):
        for rule in ("acc", "acc_norm", "acc_pmi"):
            found.append(Headline(f"metrics/{stem}.json", f"{task}.{rule}", True,
                                  "proportion", Items(tasks, "tasks", "item_sha256", rule,
                                                      where=("task", task))))
    return found


HEADLINES: list[Headline] = [
    *_evaluate_headlines("evaluate", ""),
    Headline("metrics/reward.json", "gpt.heldout_accuracy", True, "proportion",
             Items("evaluation/reward_pairs.parquet", "reward pairs", "pair_sha256",
                   "gpt_outcome", unit="pairs")),
    Headline("metrics/sft.json", "heldout_loss_after", False, "se",
             Items("evaluation/sft_examples.parquet", "sft examples", "prompt_sha256",
                   "nats_after", "tokens", unit="examples"), per_token=True),
    Headline("metrics/rlhf.json", "gold_after", True, "se",
             Items("evaluation/rlhf_prompts.parquet", "rlhf prompts", "prompt_sha256",
                   "best_gold", unit="prompts")),
    Headline("metrics/rlhf.json", "win_rate", True, "se",
             Items("evaluation/rlhf_prompts.parquet", "rlhf prompts", "prompt_sha256",
                   "win", unit="prompts")),
    Headline("metrics/rlhf.json", "kl_best", None, "se",
             Items("evaluation/rlhf_prompts.parquet", "rlhf prompts", "prompt_sha256",
                   "best_kl", unit="prompts")),
    *_evaluate_headlines("evaluate_rlhf", "_rlhf"),
]

METRICS_FILES = tuple(dict.fromkeys(h.file for h in HEADLINES))
# What must agree for two runs' documents (and task items) to be the same ones.
SPLIT_FINGERPRINT = ("fingerprint.corpus", "fingerprint.split")
TOKENIZER_FINGERPRINT = "fingerprint.tokenizer"


# A per-source figure of an evaluate stage (data.sources: subfolders).
_SOURCE_KEY = re.compile(r"(val|test)\.sources\.(.+)\.bpb")
_EVALUATE_STAGES = {"metrics/evaluate.json": "", "metrics/evaluate_rlhf.json": "_rlhf"}


def _source_headline(file: str, key: str) -> Headline | None:
    """The headline of a per-source bits per byte key, paired on that source's
    documents; None for any other key."""
    found = _SOURCE_KEY.fullmatch(key)
    if found is None or file not in _EVALUATE_STAGES:
        return None
    split, source = found.groups()
    return Headline(file, key, False, "se",
                    Items(f"evaluation/documents{_EVALUATE_STAGES[file]}.parquet",
                          "documents", "text_sha256", "nats", "bytes", ("split", split),
                          1 / math.log(2), "documents", source=source))


def headlines_of(runs: list[dict[str, dict]]) -> list[Headline]:
    """The fixed headlines and, after them, each per-source figure any of ``runs``
    (metrics file -> metrics) reports, in the order the first run that has it wrote it."""
    extra: dict[tuple[str, str], Headline] = {}
    for files in runs:
        for file in _EVALUATE_STAGES:
            for key in files.get(file, {}):
                head = _source_headline(file, key)
                if head is not None:
                    extra.setdefault((file, key), head)
    return [*HEADLINES, *extra.values()]


def headline(name: str) -> Headline:
    """The headline ``name`` (``evaluate.test.bpb``, ``evaluate.val.sources.code.bpb``);
    one line listing them otherwise."""
    from pipeline.core.errors import GptpipeError

    for found in HEADLINES:
        if found.name == name:
            return found
    stem, _, key = name.partition(".")
    per_source = _source_headline(f"metrics/{stem}.json", key)
    if per_source is not None:
        return per_source
    raise GptpipeError(f"compare: --fail-on {name}: no such headline metric; allowed: "
                       + ", ".join(h.name for h in HEADLINES)
                       + " (and evaluate.<split>.sources.<source>.bpb with data.sources)")


def within_run_se(head: Headline, metrics: dict) -> float | None:
    """A run's own standard error of ``head``: its ``_se`` key, or a Wilson interval's
    half-width over 1.96 (None: the run wrote neither)."""
    from pipeline.core.stats import Z95

    if head.error == "se":
        value = metrics.get(f"{head.key}_se")
        return float(value) if isinstance(value, int | float) else None
    low, high = metrics.get(f"{head.key}_lo"), metrics.get(f"{head.key}_hi")
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        return None
    return (high - low) / (2 * Z95)
