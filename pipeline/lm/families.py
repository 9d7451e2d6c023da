"""Which Hugging Face Transformers class computes a gptpipe network, if any.

The rule alone, apart from the tensor mapping (``pipeline.lm.hf``), so that the pretrain
stage can refuse, before training, a model its pipeline could not export, without
depending on how the export is written.
"""

from __future__ import annotations

from pipeline.core.errors import GptpipeError
from pipeline.core.params import ModelParams

LLAMA, QWEN3, GPT2 = "LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"
ARCEE, APERTUS = "ArceeForCausalLM", "ApertusForCausalLM"
# config.json's model_type -> its class.
MODEL_TYPES = {"llama": LLAMA, "qwen3": QWEN3, "arcee": ARCEE, "apertus": APERTUS,
               "gpt2": GPT2}
# (positions, norm, mlp, qk_norm) -> the class that computes that network.
_FAMILIES = {("rotary", "rmsnorm", "swiglu", False): LLAMA,
             ("rotary", "rmsnorm", "swiglu", True): QWEN3,
             ("rotary", "rmsnorm", "relu2", False): ARCEE,
             ("rotary", "rmsnorm", "relu2", True): APERTUS,
             ("learned", "layernorm", "gelu", False): GPT2}
_ALLOWED = ("positions rotary + norm rmsnorm + mlp swiglu or relu2, with or without qk_norm "
            "(Llama, Qwen3, Arcee, Apertus), or positions learned + norm layernorm + mlp "
            "gelu without qk_norm (GPT2LMHeadModel)")
NO_MLP_BIAS = (QWEN3, APERTUS)  # their MLPs have no biases
RELU2 = (ARCEE, APERTUS)  # their MLPs are ungated, relu2

def architecture(config: ModelParams) -> str:
    """The Transformers class that computes the network of ``config`` (model params, or a
    ``GPTConfig``), or a one-line refusal."""
    if config.value_embeddings:
        raise GptpipeError("model.value_embeddings = true: no Transformers architecture "
                           "computes value embeddings; allowed: false, to export the model")
    if config.logit_softcap > 0:
        raise GptpipeError(f"model.logit_softcap = {config.logit_softcap}: the Transformers "
                           "architectures that cap logits (Gemma 2, NanoChat) compute other "
                           "networks; allowed: 0, to export the model")
    family = (config.positions, config.norm, config.mlp, config.qk_norm)
    if family not in _FAMILIES:
        shown = "/".join(map(str, family[:3])) + (" with qk_norm" if config.qk_norm else "")
        raise GptpipeError(
            f"model.positions/norm/mlp = {shown}: no Transformers architecture computes this "
            f"mix; allowed: {_ALLOWED}"
        )
    arch = _FAMILIES[family]
    if config.bias and arch in NO_MLP_BIAS:
        raise GptpipeError(f"model.bias = true: {arch} (this mix's architecture) has no MLP "
                           "biases; allowed: false")
    return arch
