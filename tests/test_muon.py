"""Muon (pipeline/lm/optim.py): its update against torch.optim.Muon and by hand, the
matrices stacked in one parameter, and the AdamW that goes with it."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.optim import NS_COEFFICIENTS, MuonAdamW, muon_adamw, muon_scale, newton_schulz


def _muon(params, ns_dtype=torch.float32, blocks=1, **group) -> MuonAdamW:
    settings = {"momentum": 0.9, "ns_steps": 5, "weight_decay": 0.1, **group}
    return MuonAdamW([{"params": params, "muon": True, "blocks": blocks, **settings}],
                     lr=0.02, betas=(0.9, 0.95), weight_decay=0.1, fused=None,
                     ns_dtype=ns_dtype)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)], ids=str)
def test_in_bfloat16_it_is_torch_optim_muon_bit_for_bit(shape):
    """torch.optim.Muon's documented update (Nesterov momentum, 5 Newton-Schulz
    iterations in bfloat16, lr x sqrt(max(1, rows / cols)), decoupled weight decay)."""
    torch.manual_seed(0)
    start = torch.randn(shape)
    theirs, ours = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.9)
    optimizer = _muon([ours], ns_dtype=torch.bfloat16)
    for _ in range(3):
        gradient = torch.randn(shape)
        theirs.grad, ours.grad = gradient.clone(), gradient.clone()
        reference.step()
        optimizer.step()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, start)


def test_newton_schulz_of_a_diagonal_matrix_is_the_quintic_on_each_entry_by_hand():
    """A diagonal matrix stays diagonal: each entry s / ||S|| goes through
    x <- a x + b x^3 + c x^5 five times (the singular values move towards 1)."""
    entries = [3.0, 1.0, 0.1]
    norm = math.sqrt(sum(s * s for s in entries))
    a, b, c = NS_COEFFICIENTS
    expected = []
    for s in entries:
        x = s / norm
        for _ in range(5):
            x = a * x + b * x**3 + c * x**5
        expected.append(x)
    found = newton_schulz(torch.diag(torch.tensor(entries)), 5, torch.float32)
    torch.testing.assert_close(found, torch.diag(torch.tensor(expected)), rtol=1e-5, atol=1e-6)
    assert all(0.6 < x < 1.25 for x in expected)  # near-orthogonal, not exactly


def test_newton_schulz_keeps_the_singular_vectors_of_a_tall_matrix():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 3))
    v, _ = torch.linalg.qr(torch.randn(3, 3))
    matrix = u @ torch.diag(torch.tensor([2.0, 0.5, 0.05])) @ v.T  # (8, 3)
    found = newton_schulz(matrix, 5, torch.float32)
    values = u.T @ found @ v  # diagonal when the singular vectors are the same
    torch.testing.assert_close(values, torch.diag(torch.diagonal(values)), atol=1e-5, rtol=0)
    assert torch.all(torch.diagonal(values) > 0.6)


def test_the_learning_rate_factor_of_tall_updates():
    assert muon_scale(6, 4) == math.sqrt(1.5) and muon_scale(4, 6) == 1.0


def test_stacked_matrices_are_each_updated_as_if_alone():
    """A (3n, n) parameter of 3 stacked blocks (a fused qkv) moves as three (n, n)
    parameters under torch.optim.Muon would (bfloat16, to compare bit for bit)."""
    torch.manual_seed(0)
    start = torch.randn(12, 4)
    fused = torch.nn.Parameter(start.clone())
    apart = [torch.nn.Parameter(part.clone()) for part in start.chunk(3)]
    reference = torch.optim.Muon(apart, lr=0.02, weight_decay=0.1, momentum=0.9)
    optimizer = _muon([fused], ns_dtype=torch.bfloat16, blocks=3)
    for _ in range(2):
        gradient = torch.randn(12, 4)
        fused.grad = gradient.clone()
        for param, part in zip(apart, gradient.chunk(3), strict=True):
            param.grad = part.clone()
        reference.step()
        optimizer.step()
    assert torch.equal(fused, torch.cat(apart))


def test_its_adamw_groups_are_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    matrix = torch.nn.Parameter(torch.randn(4, 4))
    reference = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True)
    optimizer = MuonAdamW([{"params": ours},
                           {"params": [matrix], "muon": True, "blocks": 1, "momentum": 0.95,
                            "ns_steps": 5}],
                          lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for _ in range(3):
        for a, b in zip(theirs, ours, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        matrix.grad = torch.randn(4, 4)
        reference.step()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    assert set(optimizer.state[matrix]) == {"momentum_buffer", "step"}
    assert set(optimizer.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_the_gpt_split_muon_for_hidden_matrices_adamw_for_the_rest():
    model = GPT(GPTConfig(vocab_size=50, context=8, n_layer=2, n_head=2, n_embd=16,
                          tie_embeddings=False, qk_norm=True))
    optimizer = muon_adamw(model, model.hidden_matrices(), lr=3e-3, weight_decay=0.1,
                           betas=(0.9, 0.95), muon_lr=0.03, muon_momentum=0.95,
                           muon_weight_decay=0.0, ns_steps=5, device=torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)]: g["blocks"] for g in optimizer.param_groups if g["muon"]
            for p in g["params"]}
    adamw = sorted(names[id(p)] for g in optimizer.param_groups if not g["muon"]
                   for p in g["params"])
    assert muon == {f"blocks.{i}.{name}": blocks for i in range(2) for name, blocks in (
        ("attn.qkv.weight", 3), ("attn.proj.weight", 1), ("mlp.gate_up.weight", 2),
        ("mlp.down.weight", 1))}
    assert "wte.weight" in adamw and "lm_head.weight" in adamw
    assert "blocks.0.attn.q_norm.weight" in adamw
    # The schedule sets lr x lr_scale: Muon's peak is muon_lr.
    scales = sorted({g.get("lr_scale", 1.0) for g in optimizer.param_groups})
    assert scales == [1.0, pytest.approx(0.03 / 3e-3)]


def test_the_state_dict_round_trips_and_the_next_steps_agree():
    torch.manual_seed(0)
    start, gradients = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(4)]
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    first, second = _muon([a]), _muon([b])
    for gradient in gradients[:2]:
        a.grad, b.grad = gradient.clone(), gradient.clone()
        first.step()
        second.step()
    restored = _muon([b])
    restored.load_state_dict(second.state_dict())
    for gradient in gradients[2:]:
        a.grad, b.grad = gradient.clone(), gradient.clone()
        first.step()
        restored.step()
    assert torch.equal(a, b)


def test_only_matrices_take_muon():
    with pytest.raises(ValueError, match="Muon updates 2-D matrices only"):
        _muon([torch.nn.Parameter(torch.randn(4))])
