"""The gradient check every alignment optimizer step makes: a NaN or infinite gradient
stops the run before the step, so no weight ever takes it.

The loss can be finite while its gradient is not (an overflow on the way back), so the
loss check alone lets a NaN reach the weights, and Adam then spreads it to every weight
it touches. The norm is what gradient clipping computes anyway, so the check is free
when clipping is on.
"""

from __future__ import annotations

import math

import torch

from pipeline.core.errors import GptpipeError


def gradient_norm(module: torch.nn.Module, grad_clip: float) -> float:
    """The total norm of ``module``'s gradients, clipped to ``grad_clip`` when > 0 (the
    norm before clipping is returned); 0 when no parameter has a gradient."""
    if grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip))
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def finite_gradient_norm(module: torch.nn.Module, grad_clip: float, what: str,
                         lr_key: str) -> float:
    """:func:`gradient_norm`, or one line when it is NaN or infinite: ``what`` names the
    gradient and where it happened, ``lr_key`` the learning rate to lower."""
    norm = gradient_norm(module, grad_clip)
    if not math.isfinite(norm):
        raise GptpipeError(f"{what} has norm {norm}; stopped before the optimizer step, so no "
                           f"weight changed and no model was written; lower {lr_key}")
    return norm
