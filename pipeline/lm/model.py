"""A decoder-only GPT, plus the scalar head that reward and value models put on top.

Design. Each choice was measured on the builtin corpus (bpe 8192, 4 layers x 256,
context 128, batch 16, lr 3e-3, 250 steps; bench/README.md, "Model choices"):
- Rotary position embeddings (RoPE): val 2.015 bits/byte against 2.144 for a learned
  position table at the same step count and about the same speed: a clear win.
  ``positions: learned`` is kept for comparison.
- Pre-norm blocks with RMSNorm: LayerNorm reached 2.006 (0.009 lower) but trained 1.5%
  slower, which is a tie at equal wall time; RMSNorm has no mean or bias to compute or
  learn, and is what current references use. ``norm: layernorm`` is kept.
- SwiGLU MLP with hidden size 8/3 * d (the parameters of a 4d GELU MLP): GELU reached
  2.006 at equal steps but trained 7% slower, so SwiGLU is ahead at equal wall time.
  ``mlp: gelu`` is kept.
- Causal attention through ``F.scaled_dot_product_attention``, which picks the fastest
  kernel available (flash / memory-efficient on CUDA, a fused kernel on CPU).
- Tied input/output embeddings; residual output projections initialized with std
  0.02 / sqrt(2 * n_layer) (GPT-2), so the residual stream does not grow with depth.
- An optional key/value cache makes generation cost one position per new token.

The options of the modern recipes (nanochat, modded-nanogpt; measured in bench/README.md,
"Recipe"): QK-norm (``qk_norm``, Qwen3's: a learned RMSNorm over each head's queries and
keys, before the rotary positions), the ReLU² MLP (``mlp: relu2``), an untied output
head (``tie_embeddings: false``), logit soft-capping (``logit_softcap``) and value
embeddings (``value_embeddings``).

Shapes: B batch, T time (tokens), C = n_embd, H = n_head, D = C // H.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.params import ModelParams, parse_section


@dataclass(frozen=True)
class GPTConfig(ModelParams):
    """Everything needed to rebuild the network: the ``model`` params (their fields and
    defaults, :class:`pipeline.core.params.ModelParams`) and the vocabulary size. Saved
    as JSON beside the weights."""

    vocab_size: int = field(kw_only=True)

    def validate(self) -> None:
        super().validate()
        if self.vocab_size < 1:
            raise self.fail("vocab_size", self.vocab_size, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> GPTConfig:
        """A config read back from JSON, checked as params are (one-line GptpipeError)."""
        return parse_section(cls, raw, "model", where)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotary_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim // 2), for rotating query/key pairs."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; cos/sin are (T, D/2). Halves, not interleaved."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Per-layer keys and values of the positions seen so far, for incremental decoding.

    With ``capacity`` (the model's context, say) each layer's buffers are allocated once,
    (B, H, capacity, D), and new positions are written in place, so a new token costs one
    position's copy; without it every update concatenates (a copy of the whole cache).
    """

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    def layer_length(self, layer: int) -> int:
        return self.lengths[layer]

    @property
    def length(self) -> int:
        """Positions cached so far (read before a forward pass updates the layers)."""
        return self.layer_length(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append (B, H, T, D) keys and values; return all cached ones, (B, H, length, D)."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if self.capacity is None:
            if self.keys[layer] is not None:
                k = torch.cat((self.keys[layer], k), dim=2)
                v = torch.cat((self.values[layer], v), dim=2)
            self.keys[layer], self.values[layer] = k, v
            self.lengths[layer] = end
            return k, v
        if end > self.capacity:
            raise ValueError(f"KVCache holds {self.capacity} positions; asked for {end}")
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.rotary = config.positions == "rotary"
        self.q_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.value_gate = (ValueGate(config) if config.value_embeddings
                           and has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, cos, sin, cache: KVCache | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if self.value_gate is not None:  # (B, T, C) + (B, T, H, 1) * (B, T, H, D)
            v = self.value_gate.mix(x, v, value_embedding)
        # (B, T, C) -> (B, H, T, D)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        if self.q_norm is not None:  # per head, over D; before rotation (Qwen3's order)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.layer_length(self.layer)
            k, v = cache.update(self.layer, k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        elif T == 1:
            # One new query attends to every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # T new queries after `past` cached ones: query i sees keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


def swiglu_hidden(n_embd: int) -> int:
    """The SwiGLU MLP's hidden width: 8/3 * C keeps the parameter count of a 4 * C GELU
    MLP; rounded up to a multiple of 64 for speed."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def mlp_hidden(config: GPTConfig) -> int:
    """The MLP's hidden width: SwiGLU's (:func:`swiglu_hidden`), else 4 * C."""
    return swiglu_hidden(config.n_embd) if config.mlp == "swiglu" else 4 * config.n_embd


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0)^2 (Primer, So et al. 2021): sparse like ReLU, smooth at 0."""
    return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = mlp_hidden(config)
        # SwiGLU's gate and up projections are one matrix, (2 * hidden, C): one matmul.
        width = 2 * hidden if self.kind == "swiglu" else hidden
        self.gate_up = nn.Linear(config.n_embd, width, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down.residual_projection = True
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = relu_squared(self.gate_up(x))
        else:
            h = F.gelu(self.gate_up(x), approximate="tanh")
        return F.dropout(self.down(h), self.dropout, self.training)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Whether ``layer`` gets a value embedding: every other layer, the last included
    (nanochat's pattern)."""
    return layer % 2 == (n_layer - 1) % 2


class ValueGate(nn.Module):
    """How much of a value embedding each head adds to its values: 3 sigmoid(W x[:12]),
    a gate in (0, 3) per head and position read from the first 12 channels of the
    block's input (nanochat's; about 1.5 at initialization)."""

    CHANNELS = 12

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.channels = min(self.CHANNELS, config.n_embd)
        self.n_head = config.n_head
        self.proj = nn.Linear(self.channels, config.n_head, bias=False)

    def mix(self, x: torch.Tensor, v: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """v + gate * embedding: x, v and embedding (B, T, C); the gate (B, T, H, 1)."""
        B, T, C = v.shape
        gate = 3 * torch.sigmoid(self.proj(x[..., : self.channels])).unsqueeze(-1)
        mixed = v.view(B, T, self.n_head, -1) + gate * embedding.view(B, T, self.n_head, -1)
        return mixed.view(B, T, C)


class OutputHead(nn.Linear):
    """The output projection with logit soft-capping: cap * tanh(logits / cap) (Gemma 2,
    nanochat), which keeps a confident logit from growing without bound. The divide,
    tanh, multiply order is Transformers' ``final_logit_softcapping``."""

    def __init__(self, n_embd: int, vocab_size: int, cap: float) -> None:
        super().__init__(n_embd, vocab_size, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): about the logits where |logits| << cap, never past cap."""
    return torch.tanh(logits / cap) * cap


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache: KVCache | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cache, value_embedding)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.context, config.n_embd) if config.positions == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        # A ModuleDict keyed by layer (as str): the layers with a value embedding.
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd)
            for i in range(config.n_layer)
            if config.value_embeddings and has_value_embedding(i, config.n_layer)})
        if config.logit_softcap > 0:
            self.lm_head = OutputHead(config.n_embd, config.vocab_size, config.logit_softcap)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        cos, sin = rotary_tables(config.head_dim, config.context, config.rope_base)
        # Buffers are not saved: they are a pure function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Every parameter (a tied matrix once); ``exclude_embeddings``: without the
        tables that are looked up, not multiplied (token, position, value embeddings)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            tables = [self.wte, *self.value_embeds.values()]
            tables += [self.wpe] if self.wpe is not None else []
            total -= sum(table.weight.numel() for table in tables)
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H D T,
        N the parameters that multiply (the output head counted, tied or not)."""
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        if c.tie_embeddings:
            n += c.vocab_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.context

    def hidden_matrices(self) -> list[tuple[nn.Parameter, int]]:
        """The blocks' 2-D weight matrices that Muon orthogonalizes, each with the number
        of matrices it stacks in its rows: ``qkv`` holds q, k and v; SwiGLU's
        ``gate_up`` holds gate and up (each orthogonalized alone, as if separate). The
        value gates are left to AdamW, like the embeddings, head and norms."""
        swiglu = self.config.mlp == "swiglu"
        return [matrix for block in self.blocks for matrix in (
            (block.attn.qkv.weight, 3), (block.attn.proj.weight, 1),
            (block.mlp.gate_up.weight, 2 if swiglu else 1), (block.mlp.down.weight, 1))]

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) final normalized hidden states."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.context:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context "
                f"({self.config.context})"
            )
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        cos = self.rope_cos[start : start + T]
        sin = self.rope_sin[start : start + T]
        for i, block in enumerate(self.blocks):
            value_embedding = (self.value_embeds[str(i)](idx)  # (B, T, C)
                               if str(i) in self.value_embeds else None)
            x = block(x, cos, sin, cache, value_embedding)
        return self.norm_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, given targets (B, T), the mean cross-entropy."""
        logits = self.lm_head(self.hidden_states(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        return logits, loss


class ScalarHead(nn.Module):
    """A GPT body with a scalar output per position (reward and value models).

    ``forward`` returns (B, T) scalars; a reward model reads the last real token's value.
    """

    def __init__(self, body: GPT) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(body.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.body.hidden_states(idx)).squeeze(-1)
