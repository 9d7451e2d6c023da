"""Hugging Face Transformers folders: gptpipe's GPT written as one, and read back.

gptpipe's default network is a Llama in all but names (rotary positions that rotate
halves, RMSNorm, SwiGLU) and the classic configuration (learned positions, LayerNorm,
tanh GELU) is a GPT-2, so a model converts to a Transformers folder by renaming,
splitting and transposing tensors, and back by the inverse. Nothing here
imports ``transformers``: the folder is JSON and safetensors, and the package stays an
optional extra for whoever loads the result (and for the tests that compare logits and
greedy tokens against Transformers itself).

Which networks have a Transformers form (the rest are refused with one line: no
Transformers class computes them):

- positions rotary, norm rmsnorm, mlp swiglu -> ``LlamaForCausalLM``: the fused ``qkv``
  splits in thirds into q/k/v_proj, ``gate_up`` in halves into gate/up_proj (the first
  half is the gate); bias true is Llama's attention_bias and mlp_bias.
- the same with qk_norm -> ``Qwen3ForCausalLM``, whose q_norm/k_norm are gptpipe's (an
  RMSNorm over each head's dimensions, shared by the heads, before the rotation); its
  MLP has no biases, so bias true is refused.
- positions rotary, norm rmsnorm, mlp relu2 -> ``ArceeForCausalLM`` (an ungated MLP:
  ``gate_up`` is up_proj), and with qk_norm -> ``ApertusForCausalLM`` (its norms are
  named attention_layernorm/feedforward_layernorm; no MLP biases).
- positions learned, norm layernorm, mlp gelu -> ``GPT2LMHeadModel``: every Linear is a
  GPT-2 Conv1D, which stores (in, out), so weights are transposed. GPT-2 always has
  biases: bias false is written as zero biases and marked (``gptpipe_zero_biases``), and
  such a folder reads back as bias false while those biases are still zero.

An untied output head is ``lm_head.weight`` with ``tie_word_embeddings: false``, in any
of them. Value embeddings and logit soft-capping are in none of these (the architectures
that cap logits, Gemma 2 and NanoChat, compute other networks): such models are refused.

Reading accepts those architectures with the options gptpipe computes (one key/value
head per head, RMSNorm eps 1e-6, LayerNorm eps 1e-5, no rope scaling) and a tokenizer
gptpipe can use (``<pad> <unk> <bos> <eos>`` at ids 0-3). Weights are converted to
float32 in memory; nothing is written beside the folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from pipeline.core.errors import GptpipeError
from pipeline.core.io import MAX_JSON_BYTES, check_size, read_json
from pipeline.core.weights import load_state, load_tensors, save_tensors
from pipeline.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TextTokenizer,
    tokenizer_from_json,
)
from pipeline.lm.families import (
    APERTUS,
    GPT2,
    MODEL_TYPES,
    NO_MLP_BIAS,
    QWEN3,
    RELU2,
    architecture,
)
from pipeline.lm.model import GPT, GPTConfig, mlp_hidden, swiglu_hidden

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Every file write_transformers_folder writes: what a new export may replace.
TRANSFORMERS_FILES = (HF_CONFIG, GENERATION_CONFIG, HF_WEIGHTS, HF_TOKENIZER, TOKENIZER_CONFIG,
                      SPECIAL_TOKENS_MAP)

# The eps gptpipe's norms use (model.RMSNorm, nn.LayerNorm's default).
RMS_EPS, LAYERNORM_EPS = 1e-6, 1e-5
# GPT-2 only: the biases are zeros standing for none (gptpipe's bias false).
ZERO_BIASES = "gptpipe_zero_biases"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Tensors a Transformers checkpoint may hold that are no weights of the network: GPT-2's
# causal-mask buffers and a Llama's saved rotary frequencies (both recomputed).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# How a gptpipe tensor relates to the Transformers tensors it becomes.
SAME, TRANSPOSED, STACKED = "same", "transposed", "stacked"  # stacked: concatenated rows
Entry = tuple[str, tuple[str, ...], str]  # (gptpipe name, Transformers names, relation)


def _layout(config: GPTConfig, arch: str) -> list[Entry]:
    """Every gptpipe tensor (a tied lm_head aside) and the Transformers tensors it maps to.
    GPT-2's biases are listed whatever ``config.bias`` says (bias false: zeros).

    Shapes (C = n_embd, H = the MLP width): ``qkv.weight`` (3C, C) stacks q_proj, k_proj
    and v_proj, (C, C) each, in that order; SwiGLU's ``gate_up.weight`` (2H, C) stacks
    gate_proj and up_proj, (H, C) each (ReLU²'s is up_proj alone); a GPT-2 Conv1D weight
    is (in, out), the transpose of a Linear's: c_attn (C, 3C), attn c_proj (C, C), c_fc
    (C, 4C), mlp c_proj (4C, C).
    """
    head = [] if config.tie_embeddings else [("lm_head.weight", ("lm_head.weight",), SAME)]
    if arch == GPT2:
        return _gpt2_layout(config) + head
    norms = (("attention_layernorm", "feedforward_layernorm") if arch == APERTUS else
             ("input_layernorm", "post_attention_layernorm"))
    entries = [("wte.weight", ("model.embed_tokens.weight",), SAME),
               ("norm_f.weight", ("model.norm.weight",), SAME)]
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        entries += [(f"{ours}norm{n + 1}.weight", (f"{theirs}{name}.weight",), SAME)
                    for n, name in enumerate(norms)]
        if config.qk_norm:
            entries += [(f"{ours}attn.{x}_norm.weight", (f"{attn}{x}_norm.weight",), SAME)
                        for x in "qk"]
        up = ((f"{mlp}gate_proj", f"{mlp}up_proj") if config.mlp == "swiglu" else
              (f"{mlp}up_proj",))
        for kind in kinds:
            entries += [
                (f"{ours}attn.qkv.{kind}", tuple(f"{attn}{x}_proj.{kind}" for x in "qkv"),
                 STACKED),
                (f"{ours}attn.proj.{kind}", (f"{attn}o_proj.{kind}",), SAME),
                (f"{ours}mlp.gate_up.{kind}", tuple(f"{name}.{kind}" for name in up),
                 STACKED if len(up) > 1 else SAME),
                (f"{ours}mlp.down.{kind}", (f"{mlp}down_proj.{kind}",), SAME),
            ]
    return entries + head


def _gpt2_layout(config: GPTConfig) -> list[Entry]:
    entries = [("wte.weight", ("transformer.wte.weight",), SAME),
               ("wpe.weight", ("transformer.wpe.weight",), SAME),
               ("norm_f.weight", ("transformer.ln_f.weight",), SAME),
               ("norm_f.bias", ("transformer.ln_f.bias",), SAME)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            entries += [(f"{ours}{a}.{kind}", (f"{theirs}{b}.{kind}",), SAME)
                        for kind in ("weight", "bias")]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.gate_up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            entries += [(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), TRANSPOSED),
                        (f"{ours}{a}.bias", (f"{theirs}{b}.bias",), SAME)]
    return entries


# --------------------------------------------------------------------------- writing


def transformers_state(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's tensors under Transformers' names and layouts, in ``dtype``."""
    config = model.config
    arch = architecture(config)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    # A tied lm_head is wte: Transformers re-ties it on loading.
    used = {"lm_head.weight"} if config.tie_embeddings else set()
    for ours, theirs, relation in _layout(config, arch):
        if ours not in state:  # a GPT-2 bias of a bias-free model: zeros stand for none
            rows = state[ours.removesuffix(".bias") + ".weight"].shape[0]
            out[theirs[0]] = torch.zeros(rows, dtype=dtype)
            continue
        used.add(ours)
        tensor = state[ours].detach().to("cpu", dtype)
        if relation == TRANSPOSED:
            parts = [tensor.t()]
        elif relation == STACKED:
            parts = list(tensor.chunk(len(theirs), dim=0))
        else:
            parts = [tensor]
        out.update({name: part.contiguous() for name, part in zip(theirs, parts, strict=True)})
    left = set(state) - used
    if left:  # a new kind of tensor in the model that this mapping does not know
        raise ValueError(f"no Transformers name for {sorted(left)[0]}")
    return out


def transformers_config(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the Transformers model that computes ``config``'s network."""
    arch = architecture(config)
    common = {"architectures": [arch], "vocab_size": config.vocab_size,
              "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
              "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02,
              "use_cache": True, "torch_dtype": _DTYPES[dtype]}
    if arch != GPT2:
        return {**common, **_rotary_config(config, arch)}
    body = {**common, "model_type": "gpt2", "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_positions": config.context,
            "n_inner": 4 * config.n_embd,
            # PyTorch's tanh GELU itself, which gptpipe's MLP calls (gelu_new is the same
            # formula written out, a rounding apart).
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": LAYERNORM_EPS,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    if not config.bias:
        body[ZERO_BIASES] = True
    return body


def _rotary_config(config: GPTConfig, arch: str) -> dict[str, Any]:
    """The keys of a rotary architecture's config.json (Llama's, and its relatives')."""
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    model_type = next(name for name, cls in MODEL_TYPES.items() if cls == arch)
    body = {"model_type": model_type, "hidden_size": config.n_embd,
            "intermediate_size": mlp_hidden(config), "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_head,
            "head_dim": config.head_dim, "hidden_act": "relu2" if arch in RELU2 else "silu",
            "max_position_embeddings": config.context, "rms_norm_eps": RMS_EPS,
            # rope_theta for Transformers 4, rope_parameters for 5: the same base.
            "rope_theta": config.rope_base, "rope_parameters": rope,
            "attention_bias": config.bias, "attention_dropout": config.dropout}
    if arch not in NO_MLP_BIAS:
        body["mlp_bias"] = config.bias
    if arch == QWEN3:
        body["use_sliding_window"] = False
    return body


def transformers_tokenizer(tokenizer: TextTokenizer) -> bytes:
    """The tokenizer JSON with a post-processor that puts ``<bos>`` first, as gptpipe
    starts every document and prompt, so ``AutoTokenizer(text)`` gives the ids gptpipe
    feeds its model. Nothing else changes: the same vocabulary, merges and ids."""
    hf = HFTokenizer.from_str(tokenizer.json_bytes.decode("utf-8"))
    bos = SPECIAL_TOKENS[BOS_ID]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, BOS_ID)])
    return hf.to_str(pretty=True).encode("utf-8")


def tokenizer_files(tokenizer: TextTokenizer, context: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a
    ``PreTrainedTokenizerFast`` with gptpipe's special tokens."""
    pad, unk, bos, eos = SPECIAL_TOKENS
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "model_max_length": context,
              # Text is text: a literal "<eos>" in a prompt is encoded as characters, as
              # gptpipe encodes corpus text, never as the special id.
              "split_special_tokens": True,
              # Decoding gives back exactly what gptpipe's decoder does.
              "clean_up_tokenization_spaces": False}
    return {HF_TOKENIZER: transformers_tokenizer(tokenizer),
            TOKENIZER_CONFIG: _json_bytes(config), SPECIAL_TOKENS_MAP: _json_bytes(specials)}


def write_transformers_folder(directory: Path, model: GPT, tokenizer: TextTokenizer,
                              dtype: torch.dtype = torch.float32) -> str:
    """Write the Transformers folder into the existing (temporary) ``directory``; return
    the architecture's class name."""
    config = model.config
    arch = architecture(config)
    save_tensors(transformers_state(model, dtype), directory / HF_WEIGHTS, {"format": "pt"})
    (directory / HF_CONFIG).write_bytes(_json_bytes(transformers_config(config, dtype)))
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (directory / GENERATION_CONFIG).write_bytes(_json_bytes(generation))
    for name, data in tokenizer_files(tokenizer, config.context).items():
        (directory / name).write_bytes(data)
    return arch


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


# --------------------------------------------------------------------------- reading


def is_transformers_config(raw: Any) -> bool:
    """Whether a parsed config.json is a Transformers one (not gptpipe's older format,
    which holds a "model" object)."""
    return isinstance(raw, dict) and not isinstance(raw.get("model"), dict)


def _model_type(raw: dict[str, Any], where: str) -> str:
    model_type = raw.get("model_type")
    shown = f"model_type = {model_type!r}"
    if model_type is None:  # some older configs name only the class
        names = raw.get("architectures") or []
        model_type = next((t for t, cls in MODEL_TYPES.items() if cls in names), None)
        shown = f"architectures = {names!r}"
    if model_type not in MODEL_TYPES:
        raise GptpipeError(
            f"{where}: {shown}: not an architecture gptpipe computes; allowed: llama, "
            "qwen3, arcee, apertus or gpt2 (LlamaForCausalLM ... GPT2LMHeadModel), as "
            "gptpipe export writes them"
        )
    return model_type


def _check(raw: dict[str, Any], where: str, key: str, allowed: Iterable[Any],
           default: Any, say: str | None = None) -> Any:
    """``raw[key]`` (or ``default``) when it is one of ``allowed``, else one line."""
    value = raw.get(key, default)
    allowed = list(allowed)
    if value not in allowed:
        wanted = say or " or ".join(repr(a) for a in allowed)
        raise GptpipeError(f"{where}: {key} = {value!r}; allowed: {wanted}")
    return value


def _integer(raw: dict[str, Any], where: str, key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GptpipeError(f"{where}: {key} = {value!r}; allowed: an integer >= 1")
    return value


def _rope_base(raw: dict[str, Any], where: str) -> float:
    """Llama's rotary base, from rope_parameters (Transformers 5) or rope_theta beside
    rope_scaling (4); only the default, unscaled rotary embedding is gptpipe's."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise GptpipeError(f"{where}: rope_parameters = {rope!r}; allowed: an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise GptpipeError(f"{where}: rope_type = {kind!r}; allowed: 'default' (gptpipe's "
                           "rotary tables are unscaled)")
    _check(rope, where, "partial_rotary_factor", (1,), 1, "1 (every dimension rotates)")
    base = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(base, bool) or not isinstance(base, int | float) or base <= 0:
        raise GptpipeError(f"{where}: rope_theta = {base!r}; allowed: a number > 0")
    return float(base)


def _rotary_family_config(raw: dict[str, Any], where: str, arch: str) -> GPTConfig:
    """A Llama, Qwen3, Arcee or Apertus config.json as gptpipe's model params."""
    n_embd = _integer(raw, where, "hidden_size")
    n_head = _integer(raw, where, "num_attention_heads")
    _check(raw, where, "num_key_value_heads", (n_head,), n_head,
           f"{n_head} (num_attention_heads: gptpipe has one key/value head per head)")
    if n_embd % n_head:
        raise GptpipeError(f"{where}: hidden_size = {n_embd}; allowed: a multiple of "
                           f"num_attention_heads ({n_head})")
    _check(raw, where, "head_dim", (n_embd // n_head, None), None,
           f"{n_embd // n_head} (hidden_size / num_attention_heads)")
    mlp = "relu2" if arch in RELU2 else "swiglu"
    width = 4 * n_embd if mlp == "relu2" else swiglu_hidden(n_embd)
    _check(raw, where, "intermediate_size", (width,), None,
           f"{width} (gptpipe's {mlp} width for hidden_size {n_embd})")
    # What Transformers takes when config.json leaves a key out differs by class.
    act, default_act = ("relu2", "xielu" if arch == APERTUS else "relu2") if mlp == "relu2" \
        else ("silu", "silu")
    _check(raw, where, "hidden_act", (act,), default_act)
    _check(raw, where, "rms_norm_eps", (RMS_EPS,), 1e-5 if arch in RELU2 else RMS_EPS,
           f"{RMS_EPS} (gptpipe's RMSNorm)")
    if arch == QWEN3:
        _check(raw, where, "use_sliding_window", (False,), False, "false (full attention)")
    bias = _check(raw, where, "attention_bias", (False,) if arch in NO_MLP_BIAS else
                  (False, True), False)
    if arch not in NO_MLP_BIAS:
        _check(raw, where, "mlp_bias", (bias,), False, f"{str(bias).lower()}, as "
               "attention_bias (gptpipe has biases everywhere or nowhere)")
    if arch == APERTUS and not raw.get("rope_parameters") and not raw.get("rope_scaling"):
        raise GptpipeError(f"{where}: rope_parameters = None (Apertus's default: llama3 "
                           "scaling); allowed: rope_type 'default' written out")
    return _gpt_config(where, positions="rotary", norm="rmsnorm", mlp=mlp, bias=bias,
                       qk_norm=arch in (QWEN3, APERTUS),
                       tie_embeddings=_tied(raw, where, default=False),
                       context=_integer(raw, where, "max_position_embeddings"),
                       n_layer=_integer(raw, where, "num_hidden_layers"), n_head=n_head,
                       n_embd=n_embd, vocab_size=_integer(raw, where, "vocab_size"),
                       rope_base=_rope_base(raw, where),
                       dropout=raw.get("attention_dropout") or 0.0)


def _tied(raw: dict[str, Any], where: str, default: bool) -> bool:
    return _check(raw, where, "tie_word_embeddings", (True, False), default)


def _gpt2_config(raw: dict[str, Any], where: str, bias: bool) -> GPTConfig:
    n_embd = _integer(raw, where, "n_embd")
    _check(raw, where, "n_inner", (None, 4 * n_embd), None, f"null or {4 * n_embd} (4 x n_embd)")
    _check(raw, where, "activation_function", ("gelu_pytorch_tanh", "gelu_new"), "gelu_new",
           "gelu_pytorch_tanh or gelu_new (the tanh GELU)")
    _check(raw, where, "layer_norm_epsilon", (LAYERNORM_EPS,), LAYERNORM_EPS,
           f"{LAYERNORM_EPS} (LayerNorm's)")
    _check(raw, where, "scale_attn_weights", (True,), True)
    _check(raw, where, "scale_attn_by_inverse_layer_idx", (False,), False)
    _check(raw, where, "add_cross_attention", (False,), False)
    return _gpt_config(where, positions="learned", norm="layernorm", mlp="gelu", bias=bias,
                       tie_embeddings=_tied(raw, where, default=True),
                       context=_integer(raw, where, "n_positions"),
                       n_layer=_integer(raw, where, "n_layer"),
                       n_head=_integer(raw, where, "n_head"), n_embd=n_embd,
                       vocab_size=_integer(raw, where, "vocab_size"),
                       dropout=raw.get("resid_pdrop") or 0.0)


def _gpt_config(where: str, **fields: Any) -> GPTConfig:
    return GPTConfig.from_dict(fields, where)


def read_transformers_config(directory: Path, raw: dict[str, Any]) -> tuple[GPTConfig, dict]:
    """The GPTConfig that computes the Transformers model of ``directory`` (its parsed
    config.json ``raw``), and what gptpipe records of it."""
    where = str(directory / HF_CONFIG)
    model_type = _model_type(raw, where)
    if model_type == "gpt2":
        config = _gpt2_config(raw, where, bias=not _zero_biases(directory, raw))
    else:
        config = _rotary_family_config(raw, where, MODEL_TYPES[model_type])
    return config, {"transformers": MODEL_TYPES[model_type]}


def weight_files(directory: Path) -> tuple[Path, ...]:
    """model.safetensors, or the shards its index names; never a pickle, and never a file
    outside the folder (``../x``, an absolute path), which neither DVC nor a training
    fingerprint would track as part of the model."""
    single, index = directory / HF_WEIGHTS, directory / HF_WEIGHTS_INDEX
    if single.is_file():
        return (single,)
    if not index.is_file():
        raise GptpipeError(f"{directory}: no {HF_WEIGHTS} (nor {HF_WEIGHTS_INDEX}); allowed: "
                           "weights in safetensors (gptpipe never loads pickles)")
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise GptpipeError(f"{index}: not a safetensors index (no weight_map); allowed: an "
                           "object with a weight_map of tensor -> file")
    for name in weight_map.values():
        if not _plain_file_name(name):
            raise GptpipeError(f"{index}: weight_map names the file {name!r}; allowed: the "
                               "name of a file in the folder itself (no folder, no '..')")
    return tuple(directory / name for name in sorted(set(weight_map.values())))


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(
        char in name for char in "/\\\0")


def _zero_biases(directory: Path, raw: dict[str, Any]) -> bool:
    """Whether a GPT-2 folder marked as written from a bias-free model still has only zero
    biases (then it reads back as bias false; trained biases make it bias true)."""
    if raw.get(ZERO_BIASES) is not True:
        return False
    for path in weight_files(directory):
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    if name.endswith(".bias") and not name.endswith(_BUFFERS) and (
                            handle.get_tensor(name).any()):
                        return False
        except (SafetensorError, OSError) as err:
            raise GptpipeError(f"{path}: not a readable safetensors file ({err}); gptpipe "
                               "never loads pickles") from None
    return True


def read_transformers_tokenizer(directory: Path) -> TextTokenizer:
    """The folder's tokenizer.json as gptpipe's tokenizer. A post-processor (what adds
    ``<bos>`` for Transformers) is dropped: gptpipe adds its special tokens itself, and
    without it a tokenizer that gptpipe exported is byte for byte the one it trained."""
    path = directory / HF_TOKENIZER
    if not path.is_file():
        raise GptpipeError(f"{path}: missing; a Transformers folder used by gptpipe holds its "
                           "tokenizer as tokenizer.json (with <pad> <unk> <bos> <eos> at ids "
                           "0-3)")
    check_size(path, MAX_JSON_BYTES, "tokenizer.json")
    raw = path.read_bytes()
    try:
        # Hostile JSON (deep, huge integers) fails here too, and is named by the checks
        # of tokenizer_from_json below.
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception:  # tokenizers raises a bare Exception; the check below says what
        return tokenizer_from_json(raw, path)
    if hf.post_processor is not None:
        hf.post_processor = None
        raw = hf.to_str(pretty=True).encode("utf-8")
    return tokenizer_from_json(raw, path)


def load_transformers_weights(model: GPT, files: tuple[Path, ...], directory: Path) -> None:
    """Load the Transformers folder's weights (``files``: :func:`weight_files`) into
    ``model`` (built from its config), converted to float32; a one-line error when they do
    not match its config.json."""
    config = model.config
    arch = architecture(config)
    source = files[0] if files == (directory / HF_WEIGHTS,) else directory / HF_WEIGHTS_INDEX

    def mismatch(problem: str) -> GptpipeError:
        return GptpipeError(f"{source}: weights do not match {HF_CONFIG} ({problem})")

    theirs: dict[str, torch.Tensor] = {}
    for path in files:
        theirs.update(load_tensors(path))
    if arch == GPT2:  # saved from GPT2Model, the names lack the "transformer." prefix
        theirs = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                  for k, v in theirs.items()}
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used = {"lm_head.weight"}  # checked against the embeddings below
    for ours, names, relation in _layout(config, arch):
        missing = [name for name in names if name not in theirs]
        if missing:
            raise mismatch(f"missing {missing[0]}")
        used.update(names)
        if ours not in expected:  # a zero GPT-2 bias standing for none (checked on reading)
            continue
        shape = expected[ours].shape
        wanted = {SAME: shape, TRANSPOSED: shape[::-1],
                  STACKED: (shape[0] // len(names), *shape[1:])}[relation]
        for name in names:
            if theirs[name].shape != wanted:
                raise mismatch(f"{name} is {list(theirs[name].shape)}, the config makes it "
                               f"{list(wanted)}")
        parts = [theirs[name].float() for name in names]
        if relation == TRANSPOSED:
            tensor = parts[0].t()
        elif relation == STACKED:
            tensor = torch.cat(parts)
        else:
            tensor = parts[0]
        state[ours] = tensor.contiguous()
    unexpected = sorted(k for k in set(theirs) - used if not k.endswith(_BUFFERS))
    if unexpected:
        raise mismatch(f"unexpected {unexpected[0]}")
    head = theirs.get("lm_head.weight")
    if config.tie_embeddings and head is not None and not torch.equal(head.float(),
                                                                       state["wte.weight"]):
        raise mismatch("lm_head.weight differs from the token embeddings, and "
                       "tie_word_embeddings is true")
    load_state(model, state, f"{source}: the Transformers mapping left a tensor out")
