"""Learning-rate schedules: a linear warmup, then a cosine decay or warmup-stable-decay.

``cosine`` (GPT-3, nanoGPT) decays from the first step after warmup. ``wsd`` (MiniCPM's
warmup-stable-decay, the trapezoid of nanochat and modded-nanogpt) holds the peak and
decays over the last steps only, so every step before the decay has the same rate
whatever the budget: a run can be extended, and it spends most of its steps at the peak.
"""

from __future__ import annotations

import math

SHAPES = ("cosine", "wsd")


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """The steps of wsd's decay: ``decay_fraction`` of the budget, rounded to the nearest
    step (halves to even, as Python rounds)."""
    return round(decay_fraction * total_steps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          shape: str = "cosine", decay_fraction: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup ramps linearly from lr / warmup_steps at step 0 to lr at step warmup_steps - 1
    (never 0, so the first step already moves). Then, ``cosine``: a half cosine from lr at
    step = warmup_steps down to min_lr at step = total_steps; ``wsd``: lr until the last
    D = :func:`decay_steps` steps, then a straight line from lr at step total_steps - D
    down to min_lr at step = total_steps. min_lr after that, either way.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    if shape == "wsd":
        decay = decay_steps(total_steps, decay_fraction)
        left = total_steps - step  # steps from this one to the end, this one included
        if left > decay:
            return lr
        return min_lr + (lr - min_lr) * left / decay
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def phases_problem(*, warmup_steps: int, total_steps: int, shape: str,
                   decay_fraction: float) -> str | None:
    """Why wsd's warmup and decay do not fit in ``total_steps`` (one clause), or None."""
    if shape != "wsd":
        return None
    decay = decay_steps(total_steps, decay_fraction)
    if warmup_steps + decay <= total_steps:
        return None
    return (f"train.warmup_steps ({warmup_steps}) + the wsd decay ({decay} steps: "
            f"train.decay_fraction {decay_fraction} of {total_steps}) exceed the budget of "
            f"{total_steps} steps")
