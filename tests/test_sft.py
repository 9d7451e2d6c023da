"""Supervised fine-tuning before RL: the stage, the encoding, and bad example files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_preferences import HOSTILE, write_hostile_jsonl
from test_rlhf import make_stage_inputs

from pipeline.alignment.sft import EncodedExample, Example, encode_examples
from pipeline.cli import cli
from pipeline.core.params import VocabParams
from pipeline.data.tokenizer import BOS_ID, EOS_ID, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(root: Path, file: Path | None = None) -> list[str]:
    return ["sft", "--params", str(root / "params.yaml"), "--model", str(root / "pretrain"),
            "--pairs", str(root / "prefs"), "--file", str(file or root / "absent.jsonl"),
            "--out", str(root / "sft"), "--metrics", str(root / "sft.json")]


def _set_sft(root: Path, **sft) -> None:
    params = json.loads((root / "params.yaml").read_text())
    params["sft"] = {"device": "cpu", "lr": 1e-2, "batch_size": 2, **sft}
    (root / "params.yaml").write_text(json.dumps(params))


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return make_stage_inputs(tmp_path)["root"]


def test_sft_learns_the_chosen_completions_of_the_pairs(inputs):
    from pipeline.alignment.preference_data import read_pairs_dir
    from pipeline.alignment.sft import from_pairs, sft_loss
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.lm.checkpoint import load_model

    _set_sft(inputs, epochs=8)
    result = CliRunner().invoke(cli, _args(inputs))
    assert result.exit_code == 0, result.output
    metrics = json.loads((inputs / "sft.json").read_text())
    assert metrics["source"] == "pairs"
    assert (metrics["examples.train"], metrics["examples.heldout"]) == (3, 1)
    assert metrics["heldout_loss_before"] > 0 and metrics["heldout_loss_after"] > 0
    # The chosen completions of the train pairs are what it learned: their loss fell.
    train, _, _ = read_pairs_dir(inputs / "prefs")
    examples = encode_examples(load_tokenizer(inputs / "tokenizer.json"), from_pairs(train), 64)
    before, _ = load_model(inputs / "pretrain")
    after, _ = load_model(inputs / "sft")
    assert sft_loss(after, examples) < 0.75 * sft_loss(before, examples)
    assert sorted(p.name for p in (inputs / "sft").iterdir()) == [
        "gptpipe.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((inputs / "sft/gptpipe.json").read_text())
    assert config["sft_epochs"] == 8 and config["sft_source"] == "pairs"


def test_zero_epochs_pass_the_pretrained_weights_through(inputs):
    _set_sft(inputs, epochs=0)
    assert CliRunner().invoke(cli, _args(inputs)).exit_code == 0
    assert (inputs / "sft/model.safetensors").read_bytes() == (
        inputs / "pretrain/model.safetensors").read_bytes()
    metrics = json.loads((inputs / "sft.json").read_text())
    assert metrics["heldout_loss_after"] == metrics["heldout_loss_before"]
    assert metrics["train_loss"] is None


@pytest.mark.parametrize("record", [
    lambda i: {"prompt": f"The river {i}", "response": " runs north to the sea."},
    # TRL's formats: standard prompt-completion, and conversational (docs/trl.md).
    lambda i: {"prompt": f"The river {i}", "completion": " runs north to the sea."},
    lambda i: {"messages": [{"role": "user", "content": f"The river {i}?"},
                            {"role": "assistant", "content": "It runs north."}]},
], ids=["gptpipe", "trl standard", "trl conversational"])
def test_a_users_file_of_prompts_and_responses(inputs, record):
    lines = [record(i) for i in range(20)]
    file = inputs / "sft.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    _set_sft(inputs, source="file", epochs=1, heldout_fraction=0.2)
    result = CliRunner().invoke(cli, _args(inputs, file))
    assert result.exit_code == 0, result.output
    metrics = json.loads((inputs / "sft.json").read_text())
    assert metrics["source"] == "file"
    assert metrics["examples.train"] + metrics["examples.heldout"] == 20
    assert metrics["examples.heldout"] > 0


def test_a_file_with_no_held_out_example_reports_no_held_out_loss(inputs):
    from pipeline.alignment.preference_data import prompt_fraction

    # Prompts whose hash keeps them all on the train side of heldout_fraction 0.1.
    prompts = [p for p in (f"The river {i}" for i in range(100)) if prompt_fraction(p) >= 0.1]
    file = inputs / "sft.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "response": " runs north."}) + "\n"
                            for p in prompts[:5]))
    _set_sft(inputs, source="file", epochs=1, heldout_fraction=0.1)
    result = CliRunner().invoke(cli, _args(inputs, file))
    assert result.exit_code == 0, result.output
    metrics = json.loads((inputs / "sft.json").read_text())
    assert (metrics["examples.train"], metrics["examples.heldout"]) == (5, 0)
    # None, not a perfect 0.0.
    assert metrics["heldout_loss_before"] is None and metrics["heldout_loss_after"] is None
    assert "sft: no held-out example (sft.heldout_fraction = 0.1" in result.output
    assert metrics["train_loss"] > 0


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"prompt": "a", "response": "  "}\n', "line 1: field 'response' is empty"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', "line 2: field 'response' missing"),
    (b'{"prompt": 3, "response": "b"}\n', "line 1: field 'prompt' is a int"),
    (b'{"prompt": "a", "response": "b\xff"}\n', "line 1: not valid UTF-8"),
    (b'{"prompt": "a", "response": oops}\n', "line 1: not valid JSON"),
    (b"\n\n", "no example; allowed: JSONL lines with prompt and response"),
], ids=["empty response", "missing field", "not a string", "invalid utf-8", "not json", "empty"])
def test_a_bad_example_file_is_one_line_and_nothing_is_written(inputs, content, needle):
    file = inputs / "bad.jsonl"
    file.write_bytes(content)
    _set_sft(inputs, source="file")
    result = CliRunner().invoke(cli, _args(inputs, file))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "bad.jsonl" in lines[0]
    assert not (inputs / "sft").exists() and not (inputs / "sft.json").exists()


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("source", ["file", "pairs"])
def test_hostile_json_is_one_line_and_nothing_is_written(inputs, source, hostile):
    if source == "file":
        file = write_hostile_jsonl(inputs / "sft.jsonl", hostile,
                                   {"prompt": "The river", "response": " runs north."})
    else:  # the preference pairs' train.jsonl, which sft reads by default
        file = write_hostile_jsonl(inputs / "prefs/train.jsonl", hostile,
                                   {"prompt": "The river", "chosen": " runs.", "rejected": " no"})
    _set_sft(inputs, source=source)
    result = CliRunner().invoke(cli, _args(inputs, file if source == "file" else None))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{file}: {HOSTILE[hostile]}" in lines[0], lines[:1]
    assert not (inputs / "sft").exists() and not (inputs / "sft.json").exists()


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nan_gradient_of_a_finite_loss_stops_sft_before_the_step(grad_clip):
    import torch

    from pipeline.alignment.sft import train_sft
    from pipeline.core.errors import GptpipeError
    from pipeline.core.params import SftParams
    from pipeline.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, context=16, n_layer=1, n_head=2, n_embd=16))
    examples = [EncodedExample([BOS_ID, 5, 6, 7, EOS_ID], 2)] * 4
    # The loss stays finite; one weight's gradient turns NaN on its way back.
    model.blocks[0].mlp.down.weight.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    params = SftParams(epochs=1, batch_size=2, grad_clip=grad_clip, device="cpu")
    with pytest.raises(GptpipeError, match="sft: the loss's gradient at epoch 1 has norm nan; "
                                           "stopped before the optimizer step"):
        train_sft(model, examples, params, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_examples_keep_the_response_and_lose_the_prompts_start_first():
    tokenizer = train_tokenizer(VocabParams(kind="char", min_freq=1), ["abcdefgh"])
    (long,) = encode_examples(tokenizer, [Example("abcdef", "gh")], context=6)
    # <bos> + 6 prompt + 2 response + <eos> = 10 > 6: the prompt keeps its last 2 ids.
    prompt, response = tokenizer.encode_batch(["abcdef", "gh"])
    assert long == EncodedExample([BOS_ID, *prompt[-2:], *response, EOS_ID], 3)
    (short,) = encode_examples(tokenizer, [Example("ab", "cd")], context=64)
    prompt, response = tokenizer.encode_batch(["ab", "cd"])
    assert short == EncodedExample([BOS_ID, *prompt, *response, EOS_ID], 3)
