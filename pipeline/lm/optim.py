"""The optimizers: the one AdamW set-up every optimizer of gptpipe uses (pretraining,
reward model, RL), and Muon with AdamW for pretraining (``train.optimizer: muon``).

Muon (Keller Jordan, 2024; ``torch.optim.Muon``) takes SGD's Nesterov momentum of a
weight matrix's gradient and replaces it with the nearest semi-orthogonal matrix (every
singular value near 1), found by a few Newton-Schulz iterations: each direction of the
update moves at the same rate, however small its gradient. It is meant for the hidden
matrices only; embeddings, the output head and vectors stay with AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# torch.optim.Muon's (Keller Jordan's) quintic: a, b, c of X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


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
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=_fused(fused, device))


def _fused(fused: bool, device: torch.device) -> bool | None:
    return True if fused and device.type in ("cuda", "cpu") else None


def newton_schulz(matrix: torch.Tensor, steps: int, dtype: torch.dtype,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """An approximately semi-orthogonal (R, C) matrix with ``matrix``'s singular vectors:
    U S' V^T with S' near 1 (0.7 to 1.2, as the quintic is tuned to get there fast).

    The operations of ``torch.optim.Muon`` in its order, in ``dtype`` (it always uses
    bfloat16): scaled to Frobenius norm 1 (so every singular value is at most 1), then
    ``steps`` iterations on the wide orientation (the Gram matrix is the smaller one).
    """
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (R, R), R <= C
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, update, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def muon_scale(rows: int, cols: int) -> float:
    """Keller Jordan's learning-rate factor for an update of shape (rows, cols),
    sqrt(max(1, rows / cols)), ``torch.optim.Muon``'s default ("original"): a tall
    matrix's orthogonal update has a smaller RMS per entry, this restores it."""
    return math.sqrt(max(1.0, rows / cols))


class MuonAdamW(torch.optim.AdamW):
    """AdamW for every parameter group but those marked ``muon``, which take Muon's
    update (``torch.optim.Muon``'s, with per-group ``momentum``, ``ns_steps`` and
    ``blocks``: the matrices stacked in a parameter's rows, each orthogonalized alone).

    One optimizer, so one state dict to snapshot and one object for the gradient scaler
    and the learning-rate schedule. ``ns_dtype`` is the Newton-Schulz iterations'
    precision: float32 keeps a CPU run the same bits on every machine (bfloat16 matmuls
    depend on the CPU's kernels); bfloat16 is torch's choice and a GPU's.
    """

    def __init__(self, groups: Sequence[dict[str, Any]], *, lr: float,
                 betas: tuple[float, float], weight_decay: float, fused: bool | None,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__([{"muon": False, **group} for group in groups], lr=lr, betas=betas,
                         weight_decay=weight_decay, fused=fused)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D matrices only")
        self.ns_dtype = ns_dtype
        # The gradient scaler unscales every gradient before step (as for unfused
        # optimizers), not only AdamW's fused kernel.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        everything = self.param_groups
        try:  # AdamW's own step, shown its groups only
            self.param_groups = [group for group in everything if not group["muon"]]
            super().step()
        finally:
            self.param_groups = everything
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
                # Updates done: AdamW's loading of a state dict expects a step in each.
                state["step"] = torch.zeros((), dtype=torch.float32)
            state["step"] += 1
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1 - momentum)
            direction = param.grad.lerp(buffer, momentum)  # Nesterov
            param.mul_(1 - lr * decay)
            for rows, block in zip(param.chunk(group["blocks"]),
                                   direction.chunk(group["blocks"]), strict=True):
                update = newton_schulz(block, group["ns_steps"], self.ns_dtype)
                rows.add_(update.to(param.dtype), alpha=-lr * muon_scale(*block.shape))


def muon_adamw(model: nn.Module, matrices: Sequence[tuple[nn.Parameter, int]], *,
               lr: float, weight_decay: float, betas: tuple[float, float],
               muon_lr: float, muon_momentum: float, muon_weight_decay: float,
               ns_steps: int, device: torch.device,
               ns_dtype: torch.dtype = torch.float32) -> MuonAdamW:
    """Muon for ``matrices`` ((parameter, matrices stacked in its rows), e.g.
    ``GPT.hidden_matrices()``), AdamW for the rest of ``model`` as :func:`adamw` groups
    them. Each Muon group's ``lr_scale`` is muon_lr / lr: the trainer sets a group's
    learning rate to the schedule's times its scale, so Muon follows the same shape."""
    chosen = {id(p) for p, _ in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    muon = {"muon": True, "lr": muon_lr, "lr_scale": muon_lr / lr, "momentum": muon_momentum,
            "weight_decay": muon_weight_decay, "ns_steps": ns_steps}
    by_blocks: dict[int, list[nn.Parameter]] = {}
    for param, blocks in matrices:
        by_blocks.setdefault(blocks, []).append(param)
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        *({**muon, "params": params, "blocks": blocks}
          for blocks, params in sorted(by_blocks.items())),
    ]
    return MuonAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                     fused=_fused(True, device), ns_dtype=ns_dtype)
