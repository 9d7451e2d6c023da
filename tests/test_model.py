"""The GPT: shapes, causality, the key/value cache, learning, and init."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.lm.model import GPT, GPTConfig, KVCache, ScalarHead


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=50, context=16, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"positions": "learned"},
        {"norm": "layernorm", "mlp": "gelu", "bias": True},
    ],
)
def test_logits_have_shape_batch_time_vocab(options):
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    idx = torch.randint(0, 50, (3, 11))
    targets = torch.randint(0, 50, (3, 11))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 11, 50)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # An untrained model is close to uniform: loss near ln(vocab).
    assert abs(loss.item() - math.log(50)) < 0.5


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_changing_a_later_token_never_changes_earlier_logits(positions):
    torch.manual_seed(0)
    model = GPT(tiny(positions=positions)).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("capacity", [None, 16], ids=["growing", "preallocated"])
def test_kv_cache_gives_the_same_logits_as_a_full_pass(capacity):
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, capacity)
        parts = [model(idx[:, :5], cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 9)]
        parts += [model(idx[:, 9:12], cache=cache)[0]]  # several new positions at once
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_full_preallocated_cache_refuses_more_positions():
    model = GPT(tiny()).eval()
    cache = KVCache(model.config.n_layer, capacity=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_sequence_longer_than_context_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 50, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_embeddings_are_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    config = tiny(n_layer=8, n_embd=64)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.15)
    assert qkv_std == pytest.approx(0.02, rel=0.15)


def test_the_scalar_head_is_a_linear_map_of_each_positions_final_hidden_state():
    torch.manual_seed(0)
    head = ScalarHead(GPT(tiny())).eval()
    with torch.no_grad():
        head.head.bias.fill_(0.5)
        idx = torch.randint(0, 50, (3, 9))
        values = head(idx)  # (B, T)
        hidden = head.body.hidden_states(idx)  # (B, T, C)
        by_hand = (hidden * head.head.weight[0]).sum(-1) + 0.5
        changed = idx.clone()
        changed[:, 6] = (changed[:, 6] + 1) % 50
        later_changed = head(changed)
    assert values.shape == (3, 9)
    torch.testing.assert_close(values, by_hand)
    # Causal, as the body is: a later token moves only its own and later values.
    assert torch.equal(later_changed[:, :6], values[:, :6])
    assert not torch.allclose(later_changed[:, 6:], values[:, 6:])


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_flops_per_token_counts_the_tied_output_matrix_once(positions):
    """Worked out by hand for tiny(): C = 32, V = 50, L = 2, H = 2, T = 16, no biases.

    Per block: norms 2 x 32, qkv 3 x 32 x 32 = 3072, proj 32 x 32 = 1024, SwiGLU width
    64 * ceil(8 * 32 / 3 / 64) = 128: gate_up 2 x 128 x 32 = 8192, down 32 x 128 = 4096;
    16448 per block, 32896 for two, + norm_f 32 = 32928. The output matrix (tied to the
    embedding, counted once) adds 50 x 32 = 1600: N = 34528, 6N = 207168. Attention scores
    and values: 12 L H D T = 12 x 2 x 2 x 16 x 16 = 12288. Total 219456. Learned
    positions add parameters (16 x 32) but no matrix product: the same FLOPs.
    """
    model = GPT(tiny(positions=positions))
    assert model.flops_per_token() == 219456
