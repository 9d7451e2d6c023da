"""How sure a figure is: standard errors and 95% intervals, deterministic and cheap.

Every figure a run reports is an average over units (documents, task items, held-out
pairs, prompts) that happen to be in its evaluation set; another set of the same size
would give another number. These functions say how much another, on the units alone:

- :func:`bootstrap_sums`: resample the units with replacement (Efron's bootstrap) and
  sum columns of per-unit figures; a ratio of two sums (nats / bytes for bits per byte,
  correct / tokens for accuracy) is then one division per resample. Seeded, so the same
  units give the same standard error on every run and machine (integer draws and
  numpy's own summation, no BLAS).
- :func:`wilson_interval`: a proportion's interval (Wilson's score interval: unlike
  p +- 1.96 sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0 or 1).
- :func:`mean_se`: the standard error of a mean of independent per-unit scores.
- :func:`newcombe_interval`: two independent proportions' difference, from their Wilson
  intervals (Newcombe's hybrid score method 10).
- :func:`verdict`: what an interval of a difference says (better, worse, within noise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

# The two-sided 95% quantile of the standard normal distribution.
Z95 = 1.959963984540054
# Fewer units than this give a bootstrap that understates the spread: evaluation falls
# back to blocks of windows, and compare to unpaired intervals.
MIN_UNITS = 30
# The most (resample, unit) draws held at once: 4M int64 indices are 32 MiB.
_DRAWS_AT_ONCE = 1 << 22


def _resampled_indices(units: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """(r, units) int64 arrays of unit indices drawn with replacement, ``resamples``
    rows in all, in chunks of bounded size; the same rows for the same arguments."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _DRAWS_AT_ONCE // max(units, 1))
    for first in range(0, resamples, per_chunk):
        yield rng.integers(0, units, size=(min(per_chunk, resamples - first), units))


def bootstrap_sums(columns: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(R, k) sums of each of the k columns of (n, k) per-unit figures over ``resamples``
    bootstrap resamples of the n units (rows); the same resamples for every column, so
    a statistic of several columns (a ratio, a difference) is paired within a
    resample."""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim != 2 or columns.shape[0] < 1:
        raise ValueError(f"columns must be (n >= 1, k), got shape {columns.shape}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    return np.concatenate([columns[rows].sum(axis=1)
                           for rows in _resampled_indices(len(columns), resamples, seed)])


def spread(replicates: np.ndarray) -> float:
    """The standard error a set of bootstrap replicates of one statistic shows."""
    return float(np.std(replicates, ddof=1))


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of bootstrap replicates: a 95% interval."""
    low, high = np.quantile(replicates, [0.025, 0.975])
    return float(low), float(high)


def ratio_se(numerators: np.ndarray, denominators: np.ndarray, resamples: int,
             seed: int) -> float:
    """The bootstrap standard error of sum(numerators) / sum(denominators) over units
    (bits per byte: summed nats over summed bytes, per document)."""
    sums = bootstrap_sums(np.column_stack([numerators, denominators]), resamples, seed)
    return spread(sums[:, 0] / sums[:, 1])


def mean_se(values: np.ndarray) -> float | None:
    """The standard error of the mean of independent values (sample standard deviation
    over sqrt(n)); None for fewer than two values, which say nothing of their spread."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def wilson_interval(successes: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / trials (95% by default).

    ``successes`` may be fractional (a tie counted half): the interval is then that of
    the nearest binomial, close enough when ties are few. No trial: (0, 1), nothing known.
    """
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(p_old: float, interval_old: tuple[float, float], p_new: float,
                      interval_new: tuple[float, float]) -> tuple[float, float]:
    """A 95% interval of p_new - p_old for two independent proportions, from each one's
    Wilson interval (Newcombe 1998, method 10)."""
    (low_old, high_old), (low_new, high_new) = interval_old, interval_new
    difference = p_new - p_old
    return (difference - math.hypot(p_new - low_new, high_old - p_old),
            difference + math.hypot(high_new - p_new, p_old - low_old))


def normal_interval(difference: float, se: float) -> tuple[float, float]:
    """difference +- 1.96 standard errors."""
    return difference - Z95 * se, difference + Z95 * se


def verdict(interval: tuple[float, float], higher_is_better: bool | None) -> str:
    """What a 95% interval of (new - old) says: better or worse when it excludes zero
    (``higher_is_better`` None: a figure with no better side, such as a KL, reads higher
    or lower), else within noise. A zero-width interval at zero is within noise."""
    low, high = interval
    if low <= 0.0 <= high:
        return "within noise"
    up = low > 0.0
    if higher_is_better is None:
        return "higher" if up else "lower"
    return "better" if up == higher_is_better else "worse"
