"""Standard errors and intervals against numbers worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.stats import (
    Z95,
    bootstrap_sums,
    mean_se,
    newcombe_interval,
    normal_interval,
    percentile_interval,
    ratio_se,
    spread,
    verdict,
    wilson_interval,
)


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z^2 = 3.84146; centre (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half 1.959964 / 1.384146 * sqrt(0.016 + 0.0096037) = 0.226578.
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.490162, 0.943318), abs=1e-5)
    # 0 of 5 is not a zero-width interval: [0, z^2 / (n + z^2)] = [0, 0.43448].
    assert wilson_interval(0, 5) == pytest.approx((0.0, 3.84146 / 8.84146), abs=1e-5)
    assert wilson_interval(5, 5) == pytest.approx((1 - 3.84146 / 8.84146, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured, nothing known
    with pytest.raises(ValueError):
        wilson_interval(6, 5)


def test_wilson_interval_narrows_as_one_over_root_n():
    low, high = wilson_interval(500, 1000)
    # Near p = 1/2 with many trials it is nearly p +- z sqrt(p(1-p)/n) = 0.5 +- 0.030990
    # (0.2% narrower: the z^2 / n terms).
    assert (high - low) / 2 == pytest.approx(Z95 * math.sqrt(0.25 / 1000), rel=5e-3)


def test_mean_se_by_hand():
    # [1, 2, 3, 4]: sample variance 5/3, se = sqrt(5/3 / 4) = 0.645497.
    assert mean_se(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.645497, abs=1e-6)
    assert mean_se(np.array([2.0, 2.0, 2.0])) == 0.0
    assert mean_se(np.array([7.0])) is None  # one value says nothing of the spread


def test_bootstrap_of_two_units_matches_its_exact_distribution():
    # Resampling [0, 2] twice gives means 0, 1, 1, 2 with probabilities 1/4, 1/2, 1/4:
    # a standard deviation of sqrt(1/2) = 0.70711. 20000 resamples estimate it within
    # 1% (the estimate's own relative error is 1/sqrt(2 * 20000) = 0.5%).
    sums = bootstrap_sums(np.array([[0.0], [2.0]]), resamples=20000, seed=3)
    assert sums.shape == (20000, 1)
    assert set(np.unique(sums[:, 0])) <= {0.0, 2.0, 4.0}
    assert spread(sums[:, 0] / 2) == pytest.approx(math.sqrt(0.5), rel=0.01)


def test_bootstrap_ratio_se_of_equal_denominators_is_that_of_the_mean():
    # nats [1, 2, 3, 4] over one byte each: the ideal bootstrap's se of the mean is the
    # population deviation over sqrt(n): sqrt(1.25 / 4) = 0.559017.
    se = ratio_se(np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), resamples=20000, seed=0)
    assert se == pytest.approx(0.559017, rel=0.015)


def test_bootstrap_is_deterministic_and_zero_for_identical_units():
    values = np.array([[3.0, 1.0], [5.0, 2.0], [4.0, 2.0]])
    first = bootstrap_sums(values, resamples=500, seed=11)
    assert np.array_equal(first, bootstrap_sums(values, resamples=500, seed=11))
    assert not np.array_equal(first, bootstrap_sums(values, resamples=500, seed=12))
    assert ratio_se(np.full(5, 2.0), np.full(5, 4.0), resamples=200, seed=0) == 0.0


def test_bootstrap_in_chunks_draws_what_one_chunk_would(monkeypatch):
    import pipeline.core.stats as stats

    values = np.arange(12, dtype=np.float64).reshape(6, 2)
    whole = bootstrap_sums(values, resamples=100, seed=5)
    monkeypatch.setattr(stats, "_DRAWS_AT_ONCE", 12)  # two resamples at a time
    chunked = bootstrap_sums(values, resamples=100, seed=5)
    assert chunked.shape == whole.shape == (100, 2)
    assert np.array_equal(chunked, whole)


def test_bad_bootstrap_arguments_are_refused():
    with pytest.raises(ValueError):
        bootstrap_sums(np.empty((0, 1)), resamples=10, seed=0)
    with pytest.raises(ValueError):
        bootstrap_sums(np.ones((3, 1)), resamples=1, seed=0)


def test_percentile_interval_of_known_replicates():
    replicates = np.arange(1001, dtype=np.float64)  # quantiles 25 and 975 exactly
    assert percentile_interval(replicates) == (25.0, 975.0)


def test_newcombe_interval_by_hand():
    # 0.8 (Wilson 0.49016..0.94332) against 0.5 (Wilson 0.23659..0.76341 for 5 of 10):
    # 0.3 - hypot(0.8 - 0.49016, 0.76341 - 0.5), 0.3 + hypot(0.94332 - 0.8, 0.5 - 0.23659)
    old, new = wilson_interval(5, 10), wilson_interval(8, 10)
    low, high = newcombe_interval(0.5, old, 0.8, new)
    assert low == pytest.approx(0.3 - math.hypot(0.30984, 0.26341), abs=1e-4)
    assert high == pytest.approx(0.3 + math.hypot(0.14332, 0.26341), abs=1e-4)
    assert low < 0 < high  # 8/10 against 5/10 is not a measurable difference
    assert newcombe_interval(0.5, old, 0.5, old) == pytest.approx(
        (-math.hypot(0.26341, 0.26341), math.hypot(0.26341, 0.26341)), abs=1e-4)


def test_verdicts():
    assert normal_interval(1.0, 0.5) == pytest.approx((1 - Z95 / 2, 1 + Z95 / 2))
    assert verdict((0.1, 0.3), higher_is_better=True) == "better"
    assert verdict((0.1, 0.3), higher_is_better=False) == "worse"
    assert verdict((-0.3, -0.1), higher_is_better=False) == "better"
    assert verdict((-0.1, 0.3), higher_is_better=True) == "within noise"
    assert verdict((0.0, 0.0), higher_is_better=True) == "within noise"
    assert verdict((0.1, 0.3), higher_is_better=None) == "higher"
    assert verdict((-0.3, -0.1), higher_is_better=None) == "lower"
