"""The compare report as text (a terminal table) and as Markdown (a pull request's),
for two runs and for replicates of one configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.compare.differences import Difference
from pipeline.compare.headlines import Headline, within_run_se
from pipeline.core.stats import Z95

PAIR_COLUMNS = ("metric", "{old}", "{new}", "difference", "95% interval", "verdict", "how")
REPLICATE_COLUMNS = ("metric", "runs", "mean", "sd across runs", "mean within-run se",
                     "sd / se")


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def pair_rows(differences: list[Difference]) -> list[list[str]]:
    """One row per compared figure."""
    rows = []
    for found in differences:
        interval = ("-" if found.interval is None else
                    f"[{found.interval[0]:+.4f}, {found.interval[1]:+.4f}]")
        rows.append([found.headline.name, _number(found.old), _number(found.new),
                     f"{found.difference:+.4f}", interval, found.verdict, found.how])
    return rows


@dataclass(frozen=True)
class Spread:
    """One figure over replicate runs: how much it moved between them, and how much each
    run's own uncertainty said it would."""

    headline: Headline
    values: list[float]
    within: list[float]  # each run's own standard error, where it wrote one

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    @property
    def mean_within(self) -> float | None:
        return float(np.mean(self.within)) if self.within else None

    @property
    def ratio(self) -> float | None:
        if self.sd is None or not self.mean_within:
            return None
        return self.sd / self.mean_within


def spreads(runs: list[dict[str, dict]]) -> list[Spread]:
    """Each headline over the runs (metrics file -> metrics, per run) that report it."""
    from pipeline.compare.headlines import headlines_of

    found = []
    for head in headlines_of(runs):
        present = [files[head.file] for files in runs
                   if files.get(head.file) and isinstance(files[head.file].get(head.key),
                                                          int | float)]
        if len(present) < 2:
            continue
        within = [se for metrics in present if (se := within_run_se(head, metrics)) is not None]
        found.append(Spread(head, [float(m[head.key]) for m in present], within))
    return found


def replicate_rows(found: list[Spread]) -> list[list[str]]:
    return [[s.headline.name, str(len(s.values)), _number(s.mean), _number(s.sd),
             _number(s.mean_within), _number(s.ratio, 2)] for s in found]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def pair_header(old: str, new: str) -> list[str]:
    return [column.format(old=old, new=new) for column in PAIR_COLUMNS]


def pair_markdown(old: str, new: str, rows: list[list[str]], notes: list[str],
                  pictures: dict[str, str]) -> str:
    """The whole Markdown report of two runs: the table, the notes, the curves."""
    parts = [f"## gptpipe compare: {old} -> {new}", "",
             "Differences are new - old with a 95% interval; a verdict is better or worse "
             "only when the interval excludes zero. Paired: the same units on both sides.",
             "", markdown_table(pair_header(old, new), rows)]
    if notes:
        parts += ["", *(f"- {note}" for note in notes)]
    for name, file in pictures.items():
        parts += ["", f"![{name}]({file})"]
    return "\n".join(parts) + "\n"


def replicate_markdown(labels: list[str], rows: list[list[str]],
                       pictures: dict[str, str]) -> str:
    parts = [f"## gptpipe compare: {len(labels)} replicates", "",
             "Runs: " + ", ".join(labels), "",
             "sd / se near 1: each run's own interval is honest about what another seed "
             f"would give (the 95% half-width is {Z95:.2f} se).", "",
             markdown_table(list(REPLICATE_COLUMNS), rows)]
    for name, file in pictures.items():
        parts += ["", f"![{name}]({file})"]
    return "\n".join(parts) + "\n"
