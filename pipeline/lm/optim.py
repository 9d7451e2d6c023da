"""The one AdamW set-up every optimizer of gptpipe uses (pretraining, reward model, RL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
          device: torch.device, fused: bool = True,
          extra_groups: Sequence[dict[str, Any]] = ()) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, weight decay on matrices only.

    Matrices (dim >= 2: embeddings, linear weights) decay; norms and biases are exempt,
    as decaying a gain towards 0 only fights the normalization it scales (nanoGPT and
    GPT-3 do the same). ``extra_groups`` are further parameter groups with settings of
    their own (a value head's learning rate, say). ``fused`` takes the fused kernel where
    torch has one (CUDA and CPU: about 2x the per-tensor loop on CPU; MPS falls back);
    its rounding differs from the loop's in the last bit.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *extra_groups,
    ]
    use_fused = fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=use_fused or None)
