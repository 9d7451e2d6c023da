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


# --- when a changed budget still resumes exactly (pipeline/lm/pretrain_run.py) ----------

def _allow(steps: int, **train):
    from pipeline.core.params import parse_params
    from pipeline.lm.pretrain_run import budget_change

    params = parse_params({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4,
                                     "steps": steps, **train}}).train
    return budget_change(params, context=8, world_size=1)


STEPS_CHANGED = {"train.steps": (30, 14)}  # here, there


def _info(done: int, total: int = 14, eval_every: int = 5, log_every: int = 1) -> dict:
    return {"step": done, "total_steps": total,
            "settings": {"train.eval_every": eval_every, "train.log_every": log_every}}


def test_a_longer_budget_changes_the_cosines_learning_rates_after_warmup():
    # Steps 0..3 are warmup (the same under any budget); step 4 is the cosine's peak under
    # either, and step 5 is 1/10 down the cosine of 14 steps but 1/26 down that of 30.
    assert _allow(30)(STEPS_CHANGED, _info(5))[0] is True
    allowed, why = _allow(30)(STEPS_CHANGED, _info(6))
    assert not allowed and "the learning rates of the 6 steps done differ between 14 and " \
                           "30 steps" in why


def test_no_decay_resumes_any_budget_but_not_a_step_evaluated_as_the_last():
    flat = _allow(30, min_lr=1.0)
    assert flat(STEPS_CHANGED, _info(12))[0] is True
    # Finished at its own last step 14, which it evaluated as the last: not an eval step
    # (every 5) of the run of 30, so that run's history would differ.
    allowed, why = flat(STEPS_CHANGED, _info(14))
    assert not allowed and "step 14 of the snapshot was the end of a run of 14 steps" in why
    assert flat(STEPS_CHANGED, _info(14, total=14, eval_every=7))[0] is True
    # A shorter budget than the steps done cannot be resumed, and no other change can.
    assert _allow(10, min_lr=1.0)({"train.steps": (10, 14)}, _info(12))[0] is False
    assert flat({**STEPS_CHANGED, "train.lr": (1.0, 2.0)}, _info(4)) == (False, "")


# --- warmup-stable-decay ------------------------------------------------------------------

# lr = 1.0, min_lr = 0.1, warmup 4, 14 steps, decay_fraction 0.5: round(7) = 7 decay steps,
# 7..13; steps 4..6 hold the peak; the line goes from 1.0 at step 7 to 0.1 at step 14.
WSD = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14, shape="wsd",
           decay_fraction=0.5)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.25),  # the same warmup as the cosine
        (3, 1.0),  # the warmup's last step reaches the peak
        (4, 1.0),  # the stable phase starts ...
        (6, 1.0),  # ... and holds to the decay
        (7, 1.0),  # the decay's first step: 0.1 + 0.9 x 7 / 7
        (8, 0.1 + 0.9 * 6 / 7),
        (13, 0.1 + 0.9 / 7),  # the last step: one seventh of the way above the floor
        (14, 0.1),  # the floor, after the last step
        (99, 0.1),
    ],
)
def test_wsd_at_its_phase_boundaries(step, expected):
    assert lr_at(step, **WSD) == pytest.approx(expected, rel=1e-12)


def test_wsd_rounds_its_decay_and_a_zero_fraction_never_decays():
    from pipeline.lm.schedule import decay_steps

    assert decay_steps(900, 0.4) == 360 and decay_steps(5, 0.5) == 2  # 2.5 to even
    assert lr_at(13, **{**WSD, "decay_fraction": 0.0}) == 1.0


def test_wsd_phases_that_do_not_fit_the_budget_are_named():
    from pipeline.lm.schedule import phases_problem

    assert phases_problem(warmup_steps=7, total_steps=14, shape="wsd", decay_fraction=0.5) \
        is None
    assert phases_problem(warmup_steps=8, total_steps=14, shape="wsd", decay_fraction=0.5) == (
        "train.warmup_steps (8) + the wsd decay (7 steps: train.decay_fraction 0.5 of 14) "
        "exceed the budget of 14 steps")
    assert phases_problem(warmup_steps=50, total_steps=14, shape="cosine",
                          decay_fraction=0.5) is None


def test_a_longer_wsd_budget_resumes_exactly_before_either_decay_starts():
    # 14 steps decay from step 7 (still at the peak), 30 from step 15: steps 0..7 have
    # the same rates, step 8 does not.
    allow = _allow(30, schedule="wsd", decay_fraction=0.5)
    assert allow(STEPS_CHANGED, _info(8))[0] is True
    allowed, why = allow(STEPS_CHANGED, _info(9))
    assert not allowed and "(the wsd decay moves with the budget)" in why
