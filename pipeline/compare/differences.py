"""The difference of one headline figure between two runs, with its 95% interval and
verdict: paired over the units both runs scored when they share them, unpaired from each
run's own uncertainty otherwise.

Paired is far tighter: the same documents are hard or easy for both models, so their
per-document difference varies much less than either figure does. The bootstrap draws
units (documents, items, prompts) and recomputes both runs' figures on the same draw;
a run compared with itself differs by exactly zero in every draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np

from pipeline.compare.headlines import Headline, Items, within_run_se
from pipeline.compare.sources import RunSource
from pipeline.core.item_scores import read_item_scores
from pipeline.core.stats import (
    MIN_UNITS,
    Z95,
    bootstrap_sums,
    newcombe_interval,
    normal_interval,
    percentile_interval,
    verdict,
)
from pipeline.data.sources import source_name

RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Difference:
    """new - old for one headline, its 95% interval (None: neither run says how sure it
    is), what that says, and how it was measured."""

    headline: Headline
    old: float
    new: float
    interval: tuple[float, float] | None
    verdict: str
    how: str

    @property
    def difference(self) -> float:
        return self.new - self.old


@dataclass(frozen=True)
class Units:
    """One run's units of a figure: their keys and the two sums' per-unit terms."""

    keys: np.ndarray  # (U,) str
    numerator: np.ndarray  # (U,) float64
    denominator: np.ndarray  # (U,) float64


def paired_interval(old: Units, new: Units, scale: float,
                    resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The 95% bootstrap interval of scale * (new ratio - old ratio) over units both
    runs scored, aligned by key (the caller checked that the keys are the same set)."""
    old_order, new_order = np.argsort(old.keys), np.argsort(new.keys)
    columns = np.column_stack([old.numerator[old_order], old.denominator[old_order],
                               new.numerator[new_order], new.denominator[new_order]])
    sums = bootstrap_sums(columns, resamples, seed)  # (R, 4)
    replicates = scale * (sums[:, 2] / sums[:, 3] - sums[:, 0] / sums[:, 1])
    return percentile_interval(replicates)


def unpaired_interval(head: Headline, old: dict, new: dict) -> tuple[float, float] | None:
    """The 95% interval of new - old from each run's own uncertainty, as if independent:
    Newcombe's from two Wilson intervals, else 1.96 standard errors of the difference."""
    difference = float(new[head.key]) - float(old[head.key])
    if head.error == "proportion" and all(
            isinstance(m.get(f"{head.key}_{end}"), int | float)
            for m in (old, new) for end in ("lo", "hi")):
        return newcombe_interval(float(old[head.key]), (old[f"{head.key}_lo"],
                                                         old[f"{head.key}_hi"]),
                                 float(new[head.key]), (new[f"{head.key}_lo"],
                                                        new[f"{head.key}_hi"]))
    errors = [within_run_se(head, m) for m in (old, new)]
    if any(error is None for error in errors):
        return None
    return normal_interval(difference, float(np.hypot(*errors)))


def read_units(source: RunSource, items: Items) -> Units | None:
    """A run's units of a figure from its per-item table (None: it has no such table)."""
    raw = source.read(items.table)
    if raw is None:
        return None
    columns = read_item_scores(BytesIO(raw), f"{items.table} at {source.label}", items.kind)
    if not columns or items.key not in columns:
        return None
    rows = np.ones(len(columns[items.key]), dtype=bool)
    if items.where is not None:
        column, value = items.where
        rows = columns[column] == value
    if items.source is not None:
        rows &= np.array([source_name(str(path)) == items.source
                          for path in columns["source"]], dtype=bool)
    numerator = columns[items.numerator][rows].astype(np.float64)
    denominator = (columns[items.denominator][rows].astype(np.float64)
                   if items.denominator else np.ones(int(rows.sum())))
    return Units(columns[items.key][rows].astype(str), numerator, denominator)


def pairable(old: Units | None, new: Units | None) -> str | None:
    """Why two runs' units cannot be paired (None: they can): missing, too few, or not
    the very same units."""
    if old is None or new is None:
        return "no per-item table"
    keys = set(old.keys.tolist())
    if len(keys) != len(old.keys) or len(set(new.keys.tolist())) != len(new.keys):
        return "units not named uniquely"
    if keys != set(new.keys.tolist()):
        return "different units"
    if len(keys) < MIN_UNITS:
        return f"{len(keys)} units, too few to pair"
    return None


def compare_headline(head: Headline, old: RunSource, new: RunSource, old_metrics: dict,
                     new_metrics: dict, same_split: bool) -> Difference:
    """``head`` in both runs: paired when both have its per-item table over the same
    units (and, for evaluate's figures, the same test split), unpaired otherwise."""
    before, after = float(old_metrics[head.key]), float(new_metrics[head.key])
    reason = "no per-item table" if head.items is None else None
    if head.items is not None:
        reason = None if same_split else "the test splits differ"
        old_units = read_units(old, head.items) if same_split else None
        new_units = read_units(new, head.items) if same_split else None
        reason = reason or pairable(old_units, new_units)
        if reason is None:
            interval = paired_interval(old_units, new_units, head.items.scale)
            return Difference(head, before, after, interval,
                              verdict(interval, head.higher_is_better),
                              f"paired, {len(old_units.keys)} {head.items.unit}")
    interval = unpaired_interval(head, old_metrics, new_metrics)
    if interval is None:
        return Difference(head, before, after, None, "no interval",
                          "a run wrote no standard error")
    return Difference(head, before, after, interval, verdict(interval, head.higher_is_better),
                      f"unpaired ({reason})")


def half_width(se: float | None) -> float | None:
    """The 95% half-width of a standard error."""
    return None if se is None else Z95 * se
