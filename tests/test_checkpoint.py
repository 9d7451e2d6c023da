"""Checkpoints: safetensors + JSON round trips; pickles are refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.core.errors import GptpipeError
from pipeline.core.runs import load_training_state, read_training_info, save_training_state
from pipeline.lm.checkpoint import base_model, load_model, save_model
from pipeline.lm.model import GPT, GPTConfig


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, context=8, n_layer=2, n_head=2, n_embd=16))


def test_save_then_load_gives_identical_logits(tmp_path):
    model = _model().eval()
    save_model(tmp_path / "ckpt", model, model.config, {"step": 3})
    loaded, meta = load_model(tmp_path / "ckpt")
    assert meta["step"] == 3
    assert loaded.config == model.config
    idx = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded.eval()(idx)[0])
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "gptpipe.json", "model.safetensors"
    ]


def test_a_pickle_where_the_weights_should_be_is_refused(tmp_path):
    model = _model()
    save_model(tmp_path / "ckpt", model, model.config, {})
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(GptpipeError, match=r"not a readable safetensors file.*never loads pickles"):
        load_model(tmp_path / "ckpt")


def test_missing_checkpoint_and_config_are_clear_errors(tmp_path):
    with pytest.raises(GptpipeError, match="checkpoint directory not found"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptpipeError, match=r"gptpipe\.json: missing"):
        load_model(tmp_path / "empty")


def test_training_state_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 40, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    rng = {"torch": torch.get_rng_state()}
    save_training_state(tmp_path / "state", model, optimizer, rng, {"step": 1, "x": "y"})
    assert read_training_info(tmp_path / "state")["step"] == 1

    other = _model(seed=1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    restored_rng, info = load_training_state(tmp_path / "state", other, other_optimizer)
    assert info["x"] == "y"
    assert torch.equal(restored_rng["torch"], rng["torch"])
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    state_a, state_b = optimizer.state_dict(), other_optimizer.state_dict()
    for key, slots in state_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, state_b["state"][key][name])
    assert state_a["param_groups"][0]["lr"] == state_b["param_groups"][0]["lr"]


def test_no_snapshot_means_no_training_info(tmp_path):
    assert read_training_info(tmp_path / "nothing") is None


def test_init_from_naming_a_deeply_nested_file_is_one_line(tmp_path):
    pointer = tmp_path / "deep.init"
    pointer.write_text("[" * 5000 + "]" * 5000)  # YAML's parser recurses once per level
    with pytest.raises(GptpipeError, match=r"deep.init: a file, not a model folder; allowed"):
        base_model(pointer)
    pointer.write_text("kind: random\n")
    assert base_model(pointer) is None
