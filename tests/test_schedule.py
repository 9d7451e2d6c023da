"""The learning-rate schedule against values worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.lm.schedule import lr_at

# lr = 1.0, min_lr = 0.1, warmup 4 steps, 14 steps in all: cosine over steps 4..14.
SCHEDULE = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.25),  # warmup: (0 + 1) / 4
        (1, 0.5),
        (3, 1.0),  # end of warmup reaches the peak
        (4, 1.0),  # cosine starts at the peak: 0.1 + 0.45 * (1 + cos 0)
        (9, 0.55),  # half way: 0.1 + 0.45 * (1 + cos(pi / 2)) = 0.55
        (14, 0.1),  # the floor
        (20, 0.1),  # and it stays there
    ],
)
def test_lr_at_chosen_steps(step, expected):
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected)


def test_quarter_of_the_cosine():
    # step 6.5 is not a step; step 6 is 2/10 of the way: 0.1 + 0.45 (1 + cos(0.2 pi))
    assert lr_at(6, **SCHEDULE) == pytest.approx(0.1 + 0.45 * (1 + 0.8090169943749475))


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, lr=3.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(3.0)
