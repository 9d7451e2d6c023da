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


# ----------------------------------------------------- the recipe options (model params)

RECIPE_OPTIONS = [
    {"qk_norm": True},
    {"mlp": "relu2"},
    {"tie_embeddings": False},
    {"logit_softcap": 15.0},
    {"value_embeddings": True},
    {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "logit_softcap": 10.0,
     "value_embeddings": True, "n_layer": 3},
]


@pytest.mark.parametrize("options", RECIPE_OPTIONS, ids=str)
def test_every_option_is_causal_and_the_cache_gives_a_full_passs_logits(options):
    torch.manual_seed(0)
    model = GPT(tiny(**options)).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, 16)
        parts = [model(idx[:, :5], cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
        moved, _ = model(changed)
    assert torch.equal(full[:, :7], moved[:, :7])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_relu_squared_by_hand():
    from pipeline.lm.model import relu_squared

    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(relu_squared(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_the_relu2_mlp_is_down_of_relu_squared_of_up_four_times_as_wide():
    from pipeline.lm.model import MLP

    torch.manual_seed(0)
    mlp = MLP(tiny(mlp="relu2"))
    assert mlp.gate_up.weight.shape == (4 * 32, 32) and mlp.down.weight.shape == (32, 128)
    x = torch.randn(2, 3, 32)
    by_hand = torch.clamp(x @ mlp.gate_up.weight.T, min=0) ** 2 @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), by_hand)


def test_softcap_by_hand_and_a_capped_model_never_passes_the_cap():
    from pipeline.lm.model import softcap

    x = torch.tensor([0.0, 15.0, -30.0, 1e-3, 1e4])
    # 15 tanh(x / 15): 0; 15 tanh(1) = 11.423912; 15 tanh(-2) = -14.460414; about x near 0.
    expected = torch.tensor([0.0, 11.423912, -14.460414, 1e-3, 15.0])
    torch.testing.assert_close(softcap(x, 15.0), expected, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    model = GPT(tiny(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
        logits, _ = model(torch.randint(0, 50, (2, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_qk_norm_normalizes_each_heads_queries_and_keys_by_hand():
    """RMSNorm over D = 16 with a gain per dimension, before the rotation: attention does
    not change when the query/key projections are scaled (without QK-norm it sharpens)."""
    from pipeline.lm.model import CausalSelfAttention, rotary_tables

    torch.manual_seed(0)
    config = tiny(qk_norm=True)
    attn = CausalSelfAttention(config, 0).eval()
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        attn.k_norm.weight.copy_(torch.linspace(2.0, 1.0, 16))
    cos, sin = rotary_tables(16, 5, 10000.0)
    x = torch.randn(1, 5, 32)
    # By hand: split heads, x / sqrt(mean(x^2) + 1e-6) * gain, rotate, attend.
    q, k, v = (part.view(1, 5, 2, 16).transpose(1, 2) for part in attn.qkv(x).split(32, 2))

    def rms(t, gain):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * gain

    from pipeline.lm.model import apply_rotary
    q = apply_rotary(rms(q, attn.q_norm.weight), cos, sin)
    k = apply_rotary(rms(k, attn.k_norm.weight), cos, sin)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(
        torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 32)
    with torch.no_grad():
        found = attn(x, cos, sin)
        torch.testing.assert_close(found, attn.proj(y), rtol=1e-5, atol=1e-6)
        attn.qkv.weight[:64].mul_(10)  # queries and keys 10x larger
        torch.testing.assert_close(attn(x, cos, sin), found, rtol=1e-4, atol=1e-5)


def test_an_untied_head_is_a_matrix_of_its_own_counted_once():
    torch.manual_seed(0)
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 50 * 32
    assert "lm_head.weight" in untied.state_dict()
    # The same matrix products either way: the same FLOPs (219456, worked out above).
    assert untied.flops_per_token() == tied.flops_per_token() == 219456


def test_value_embeddings_in_every_other_layer_the_last_included_gated_by_hand():
    from pipeline.lm.model import ValueGate

    assert sorted(GPT(tiny(value_embeddings=True, n_layer=3)).value_embeds) == ["0", "2"]
    model = GPT(tiny(value_embeddings=True, n_layer=4))
    assert sorted(model.value_embeds) == ["1", "3"]
    assert model.blocks[0].attn.value_gate is None and model.blocks[1].attn.value_gate
    # Embedding tables are looked up, not multiplied: not in the FLOPs' N.
    assert model.num_parameters(exclude_embeddings=True) == GPT(tiny(n_layer=4)).num_parameters(
        exclude_embeddings=True) + 2 * 2 * 12  # two gates, (H = 2) x 12
    gate = ValueGate(tiny())
    with torch.no_grad():
        gate.proj.weight.zero_()  # 3 sigmoid(0) = 1.5 for every head
        gate.proj.weight[1, 0] = 1e4  # head 1 reads channel 0: 3 sigmoid(big) = 3
    x = torch.zeros(1, 1, 32)
    x[..., 0] = 1.0
    v, embedding = torch.ones(1, 1, 32), torch.full((1, 1, 32), 2.0)
    mixed = gate.mix(x, v, embedding)  # head 0: 1 + 1.5 x 2 = 4; head 1: 1 + 3 x 2 = 7
    assert torch.equal(mixed, torch.cat([torch.full((16,), 4.0), torch.full((16,), 7.0)])
                       .view(1, 1, 32))


def test_hidden_matrices_are_the_blocks_weights_with_the_matrices_they_stack():
    model = GPT(tiny(value_embeddings=True))
    matrices = model.hidden_matrices()
    stacks = {name: blocks for param, blocks in matrices
              for name, p in model.named_parameters() if p is param}
    assert stacks == {f"blocks.{i}.{name}": blocks for i in range(2) for name, blocks in (
        ("attn.qkv.weight", 3), ("attn.proj.weight", 1), ("mlp.gate_up.weight", 2),
        ("mlp.down.weight", 1))}
    relu2 = GPT(tiny(mlp="relu2")).hidden_matrices()
    assert [blocks for _, blocks in relu2][:4] == [3, 1, 1, 1]


def test_the_default_model_has_none_of_the_options():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight and len(model.value_embeds) == 0
    assert type(model.lm_head) is torch.nn.Linear
    assert model.blocks[0].attn.q_norm is None and model.blocks[0].attn.value_gate is None
