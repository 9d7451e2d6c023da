"""Hugging Face Transformers folders: export, exactness against Transformers itself, the
tokenizer, the way back, and what is refused.

Tolerance. Logits are compared with ``torch.testing.assert_close`` at its float32
defaults, rtol 1.3e-6 and atol 1e-5. Both sides compute the same float32 operations;
only the kernels may differ in the order they sum (an attention backend, a fused RMSNorm
against mean-then-rsqrt), and each reordered sum moves the last bit or two of a float32
(about 1e-7 relative), which a few layers carry to about 1e-6 relative: far below any
mistake in the mapping (a swapped half, a missing transpose, a wrong eps moves logits by
1e-3 and more). On the CPU here they are in fact identical, bit for bit.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BIN, REPO_ROOT, synthetic_documents
from safetensors.torch import load_file, save_file

from pipeline.core.errors import GptpipeError
from pipeline.core.params import VocabParams, parse_params
from pipeline.data.tokenizer import BOS_ID, train_tokenizer
from pipeline.lm.checkpoint import (
    CONFIG,
    load_model,
    open_model_folder,
    read_config,
    save_model,
)
from pipeline.lm.hf import ZERO_BIASES
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.sampling import SamplingConfig, generate_ids
from pipeline.stages import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")
transformers.utils.logging.disable_progress_bar()

LLAMA = {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu"}
GPT2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}
RELU2 = LLAMA | {"mlp": "relu2"}
FAMILIES = {
    "llama": (LLAMA | {"bias": False}, "LlamaForCausalLM"),
    "llama-bias": (LLAMA | {"bias": True, "rope_base": 500.0}, "LlamaForCausalLM"),
    "llama-untied": (LLAMA | {"tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen3": (LLAMA | {"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    "arcee": (RELU2 | {"bias": True}, "ArceeForCausalLM"),
    "apertus": (RELU2 | {"qk_norm": True, "tie_embeddings": False}, "ApertusForCausalLM"),
    "gpt2": (GPT2 | {"bias": True}, "GPT2LMHeadModel"),
    "gpt2-no-bias": (GPT2 | {"bias": False}, "GPT2LMHeadModel"),
    "gpt2-untied": (GPT2 | {"bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
}
MIXED_TEXT = [
    "The river Thames flows through London. It is 346 km long!",
    "北京是中华人民共和国的首都，也是全国的政治中心。",
    "def add(a, b):\n    return a + b  # 😀 emoji\n\tprint(add(1, 2))\n",
    "Emoji 🎉🐍 and accents: café, naïve, Zürich; a literal <eos> and <bos> in text.",
    "  leading spaces, trailing spaces   \n\n\nand blank lines",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer of mixed text, saved to a file."""
    texts = [*synthetic_documents(40), *MIXED_TEXT] * 2
    tok = train_tokenizer(VocabParams(kind="bpe", vocab_size=400, min_freq=1), texts)
    tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok


def _model(family: str, vocab_size: int, seed: int = 0) -> GPT:
    """A tiny GPT whose every weight, norms and biases included, is random: a mapping that
    swapped, dropped or mis-transposed a tensor changes its logits."""
    options, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, context=24, n_layer=2, n_head=2, n_embd=32,
                          **options))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def _folder(root: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """A gptpipe model folder of ``family`` with ``tokenizer``."""
    model = _model(family, tokenizer.vocab_size, seed)
    save_model(root / family, model, model.config, {"tokenizer_sha256": tokenizer.sha256},
               tokenizer.path)
    return root / family


def _export(model_dir: Path, out: Path, dtype: str = "float32") -> dict:
    return export.run(parse_params({"export": {"dtype": dtype}}), model=model_dir, out=out)


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tokenizer, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, gptpipe folder, its export) for each family."""
    root = tmp_path_factory.mktemp(request.param)
    source = _folder(root, request.param, tokenizer)
    _export(source, root / "hf")
    return request.param, source, root / "hf"


def test_the_export_is_a_transformers_folder_that_loads_with_auto_classes(exported):
    family, _, hf_dir = exported
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == FAMILIES[family][1]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (hf_tokenizer.pad_token, hf_tokenizer.unk_token, hf_tokenizer.bos_token,
            hf_tokenizer.eos_token) == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id,
            hf_tokenizer.eos_token_id) == (0, 1, 2, 3)
    assert model.generation_config.eos_token_id == 3


def test_transformers_logits_equal_gptpipe_logits(exported):
    _, source, hf_dir = exported
    ours, _ = load_model(source)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (3, ours.config.context),
                        generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        expected = ours.eval()(ids)[0]  # (B, T, V)
        found = theirs.eval()(ids).logits
    torch.testing.assert_close(found, expected, rtol=1.3e-6, atol=1e-5)
    assert expected.abs().max() > 0.5  # logits that are not all near zero


def test_greedy_generation_gives_the_same_tokens(exported, tokenizer):
    _, source, hf_dir = exported
    ours, _ = load_model(source)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = "The river"
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T), <bos> first
    assert ids[0].tolist() == [BOS_ID, *tokenizer.encode_batch([prompt])[0]]
    new = ours.config.context - ids.shape[1]  # within the context: no window is cut
    config = SamplingConfig(temperature=0.0, max_new_tokens=new, stop_at_eos=False)
    expected = list(generate_ids(ours, ids[0].tolist(), config, torch.Generator()))
    found = theirs.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                            attention_mask=torch.ones_like(ids))
    assert found[0, ids.shape[1]:].tolist() == expected


def test_export_then_import_gives_identical_weights_and_config(exported, tokenizer):
    family, source, hf_dir = exported
    original, _ = load_model(source)
    back, meta = load_model(hf_dir)
    assert meta == {"transformers": FAMILIES[family][1]}
    assert back.config == original.config  # bias false comes back from zero GPT-2 biases
    theirs, ours = back.state_dict(), original.state_dict()
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    # The tokenizer comes back byte for byte: continued training reads the same shards.
    _, _, back_tokenizer = open_model_folder(hf_dir)
    assert back_tokenizer.json_bytes == tokenizer.json_bytes


@pytest.mark.parametrize("kind", ["bpe", "word", "char"])
def test_the_exported_tokenizer_gives_gptpipe_ids_on_mixed_text(kind, tmp_path):
    params = VocabParams(kind=kind, vocab_size=400, min_freq=1)
    ours = train_tokenizer(params, [*synthetic_documents(30), *MIXED_TEXT])
    ours.save(tmp_path / "tokenizer.json")
    model = GPT(GPTConfig(vocab_size=ours.vocab_size, context=16, n_layer=1, n_head=2,
                          n_embd=16))
    save_model(tmp_path / "model", model, model.config, {"tokenizer_sha256": ours.sha256},
               tmp_path / "tokenizer.json")
    _export(tmp_path / "model", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in MIXED_TEXT:
        expected = [BOS_ID, *ours.encode_batch([text])[0]]
        assert theirs(text)["input_ids"] == expected, text
        assert theirs.decode(expected, skip_special_tokens=True) == ours.decode(
            expected[1:]), text
    if kind != "word":  # bytes and characters decode back to the very text
        assert all(theirs.decode(theirs(t)["input_ids"], skip_special_tokens=True) == t
                   for t in MIXED_TEXT)


def test_bfloat16_export_halves_the_weights_and_reads_back_rounded(tokenizer, tmp_path):
    source = _folder(tmp_path, "llama", tokenizer)
    _export(source, tmp_path / "hf", dtype="bfloat16")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16
               for t in load_file(tmp_path / "hf/model.safetensors").values())
    original, _ = load_model(source)
    back, _ = load_model(tmp_path / "hf")
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.bfloat16().float()), name


def test_an_old_folder_with_config_json_still_loads_and_exports(tokenizer, tmp_path):
    source = _folder(tmp_path, "llama", tokenizer)
    (source / CONFIG).rename(source / "config.json")  # as written before the rename
    config, meta = read_config(source)
    assert config.n_layer == 2 and meta["tokenizer_sha256"] == tokenizer.sha256
    load_model(source)
    assert _export(source, tmp_path / "hf")["architecture"] == "LlamaForCausalLM"


def test_gpt2_biases_trained_away_from_zero_read_back_as_biases(tokenizer, tmp_path):
    source = _folder(tmp_path, "gpt2-no-bias", tokenizer)
    _export(source, tmp_path / "hf")
    assert json.loads((tmp_path / "hf/config.json").read_text())[ZERO_BIASES] is True
    weights = tmp_path / "hf/model.safetensors"
    state = load_file(weights)
    state["transformer.h.0.mlp.c_fc.bias"][3] = 0.25  # as a fine-tune in Transformers would
    save_file(state, weights, {"format": "pt"})
    back, _ = load_model(tmp_path / "hf")
    assert back.config.bias is True
    assert back.blocks[0].mlp.gate_up.bias[3] == 0.25
    assert back.blocks[1].mlp.gate_up.bias.abs().sum() == 0


def test_sharded_safetensors_import_as_one_file(tokenizer, tmp_path):
    source = _folder(tmp_path, "llama", tokenizer)
    _export(source, tmp_path / "hf")
    state = load_file(tmp_path / "hf/model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, tmp_path / "hf" / file, {"format": "pt"})
    (tmp_path / "hf/model.safetensors").unlink()
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "hf/model.safetensors.index.json").write_text(json.dumps(index))
    original, _ = load_model(source)
    back, _ = load_model(tmp_path / "hf")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.state_dict().items())


def _shard_outside(tokenizer, tmp_path: Path, where: str) -> Path:
    """An export whose index names, for half the tensors, a real shard outside the folder:
    ``../outside.safetensors`` or its absolute path."""
    source = _folder(tmp_path, "llama", tokenizer)
    hf = tmp_path / "hf"
    _export(source, hf)
    state = load_file(hf / "model.safetensors")
    names = sorted(state)
    save_file({n: state[n] for n in names[::2]}, hf / "inside.safetensors", {"format": "pt"})
    save_file({n: state[n] for n in names[1::2]}, tmp_path / "outside.safetensors",
              {"format": "pt"})
    (hf / "model.safetensors").unlink()
    outside = {"relative": "../outside.safetensors",
               "absolute": str(tmp_path / "outside.safetensors")}[where]
    index = {"weight_map": {n: "inside.safetensors" for n in names[::2]}
             | {n: outside for n in names[1::2]}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    return hf


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tokenizer, tmp_path, where):
    """Neither DVC nor a training fingerprint tracks a file outside the folder: a model
    that changes with it must not load."""
    hf = _shard_outside(tokenizer, tmp_path, where)
    with pytest.raises(GptpipeError) as caught:
        load_model(hf)
    message = caught.value.format_message()
    assert message.startswith(f"{hf / 'model.safetensors.index.json'}: weight_map names the "
                              "file ")
    assert "outside.safetensors" in message and "allowed: the name of a file in the folder" \
        in message


def test_no_gptpipe_module_imports_transformers():
    """transformers is an optional extra: gptpipe writes and reads the folders itself."""
    for path in (REPO_ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), path


# -------------------------------------------------------------------------- bad input


def _gptpipe_export(model_dir: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text("export:\n  dtype: float32\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "gptpipe"), "export", "--params", "params.yaml",
                           "--model", str(model_dir), "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True)


def _with(**options):
    """A maker of a tiny model folder with ``options``."""
    def make(tokenizer, root: Path) -> Path:
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context=8, n_layer=1,
                              n_head=2, n_embd=16, **options))
        save_model(root / "model", model, model.config, {}, tokenizer.path)
        return root / "model"
    return make


_mixed = _with(positions="rotary", norm="layernorm", mlp="gelu")


def _reward(tokenizer, root: Path) -> Path:
    source = _folder(root, "llama", tokenizer)
    config = json.loads((source / CONFIG).read_text())
    (source / CONFIG).write_text(json.dumps({**config, "kind": "reward"}))
    return source


def _not_a_model(tokenizer, root: Path) -> Path:
    (root / "notes").mkdir()
    (root / "notes/readme.txt").write_text("hello")
    return root / "notes"


@pytest.mark.parametrize(("make", "needle"), [
    (_not_a_model, "notes/gptpipe.json: missing; a model folder holds gptpipe.json"),
    (_mixed, "model.positions/norm/mlp = rotary/layernorm/gelu: no Transformers architecture "
             "computes this mix; allowed: positions rotary + norm rmsnorm + mlp swiglu"),
    (_reward, "a model of kind 'reward'; allowed: a language model folder"),
    (_with(value_embeddings=True), "model.value_embeddings = true: no Transformers "
                                   "architecture computes value embeddings; allowed: false"),
    (_with(logit_softcap=15.0), "model.logit_softcap = 15.0: the Transformers architectures "
                                "that cap logits (Gemma 2, NanoChat) compute other networks"),
    (_with(qk_norm=True, bias=True), "model.bias = true: Qwen3ForCausalLM (this mix's "
                                     "architecture) has no MLP biases; allowed: false"),
    (_with(positions="learned", norm="layernorm", mlp="gelu", qk_norm=True),
     "model.positions/norm/mlp = learned/layernorm/gelu with qk_norm: no Transformers "
     "architecture computes this mix"),
], ids=["not a model", "unsupported mix", "reward model", "value embeddings", "softcap",
        "qk-norm bias", "gpt2 qk-norm"])
def test_export_refuses_in_one_line_and_writes_nothing(tokenizer, tmp_path, make, needle):
    model_dir = make(tokenizer, tmp_path)
    result = _gptpipe_export(model_dir, tmp_path / "out", tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: _edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"]),
     "model_type = 'mistral': not an architecture gptpipe computes; allowed: llama"),
    (lambda d: _edit_config(d, num_key_value_heads=1),
     "num_key_value_heads = 1; allowed: 2 (num_attention_heads"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     "rope_type = 'llama3'; allowed: 'default'"),
    (lambda d: _edit_config(d, rms_norm_eps=1e-5), "rms_norm_eps = 1e-05; allowed: 1e-06"),
    (lambda d: _edit_config(d, tie_word_embeddings=False),
     "weights do not match config.json (missing lm_head.weight)"),
    (lambda d: _edit_config(d, model_type="apertus", architectures=["ApertusForCausalLM"]),
     "hidden_act = 'silu'; allowed: 'relu2'"),
    (lambda d: _edit_config(d, num_hidden_layers=3),
     "hf/model.safetensors: weights do not match config.json (missing "
     "model.layers.2.input_layernorm.weight)"),
    (lambda d: _edit_config(d, hidden_size=64, intermediate_size=192, head_dim=32),
     "model.embed_tokens.weight is [400, 32], the config makes it [400, 64]"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
], ids=["architecture", "grouped kv", "rope scaling", "eps", "untied", "apertus act", "layers",
        "width", "no tokenizer", "no weights"])
def test_a_transformers_folder_gptpipe_cannot_compute_is_refused_in_one_line(
        tokenizer, tmp_path, change, needle):
    _export(_folder(tmp_path, "llama", tokenizer), tmp_path / "hf")
    change(tmp_path / "hf")
    with pytest.raises(GptpipeError) as caught:
        open_model_folder(tmp_path / "hf")
        load_model(tmp_path / "hf")
    message = str(caught.value)
    assert needle in message and "\n" not in message, message


def test_a_tokenizer_without_gptpipe_special_tokens_is_refused(tokenizer, tmp_path):
    _export(_folder(tmp_path, "llama", tokenizer), tmp_path / "hf")
    raw = json.loads((tmp_path / "hf/tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        token["content"] = token["content"].replace("<bos>", "<s>")
    raw["model"]["vocab"]["<s>"] = raw["model"]["vocab"].pop("<bos>")
    (tmp_path / "hf/tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(GptpipeError, match=r"special token <bos> has id None; allowed: "
                                           r"<pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3"):
        open_model_folder(tmp_path / "hf")


def test_a_transformers_folder_is_a_model_for_generate(tokenizer, tmp_path):
    """The way back needs no conversion step: gptpipe reads the folder in memory."""
    source = _folder(tmp_path, "gpt2", tokenizer)
    _export(source, tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "copy")
    before = sorted(p.name for p in (tmp_path / "copy").iterdir())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = ["--temperature", "0", "--max-new-tokens", "10", "The river"]
    outputs = [subprocess.run([str(BIN / "gptpipe"), "generate", "--model", str(d), *args],
                              env=env, capture_output=True, text=True, check=True).stdout
               for d in (source, tmp_path / "copy")]
    assert outputs[0] == outputs[1] and outputs[0].startswith("The river")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == before  # nothing written
