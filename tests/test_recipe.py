"""The recipe options in the trainer and the pretrain stage: resuming with Muon and wsd is
bit for bit the uninterrupted run, and the params they cannot honour are refused in one
line before training."""

from __future__ import annotations

import pytest
import torch
from test_pretrain import (  # noqa: F401  (token_data is a fixture)
    TINY_MODEL,
    TINY_TRAIN,
    _cli_args,
    _Crash,
    _gptpipe,
    _write_params,
    token_data,
)

from pipeline.core.device import Runtime
from pipeline.core.errors import GptpipeError
from pipeline.core.params import parse_params
from pipeline.data.shards import read_meta, read_tokens
from pipeline.lm.training import Trainer

# Every option on at once, so that each one's state (Muon's momentum, the value embeddings
# and gates, the untied head, the QK-norm gains) goes through the snapshot.
MODERN_MODEL = {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
                "logit_softcap": 15.0, "value_embeddings": True}
MODERN_TRAIN = {"optimizer": "muon", "schedule": "wsd", "decay_fraction": 0.5,
                "muon_lr": 0.02}


def _modern_trainer(data, state_dir) -> Trainer:
    params = parse_params({"model": {**TINY_MODEL, **MODERN_MODEL},
                           "train": {**TINY_TRAIN, **MODERN_TRAIN}})
    meta = read_meta(data / "tokens")
    return Trainer(params.model, params.train, Runtime(torch.device("cpu"), torch.float32),
                   read_tokens(data / "tokens/train"), read_tokens(data / "tokens/val"),
                   meta["vocab_size"], {"tokens": data / "tokens",
                                        "tokenizer": data / "tokenizer.json"},
                   state_dir, {})


def test_a_muon_wsd_run_resumed_after_a_crash_is_the_uninterrupted_run(
        token_data, tmp_path):  # noqa: F811 (the fixture)
    straight: dict[int, float] = {}
    first = _modern_trainer(token_data, tmp_path / "a")
    first.fit(lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert any(group.get("muon") for group in first.optimizer.param_groups)

    resumed: dict[int, float] = {}

    def crash_at_15(log):
        resumed[log.step] = log.train_loss
        if log.step == 15:
            raise _Crash  # between the snapshots of steps 12 and 18

    with pytest.raises(_Crash):
        _modern_trainer(token_data, tmp_path / "b").fit(crash_at_15, lambda s, v: None)
    second = _modern_trainer(token_data, tmp_path / "b")
    assert second.resumed_from == 12
    second.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == straight  # bit for bit, the three steps run twice included
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_wsd_phases_that_do_not_fit_stop_the_stage_in_one_line_before_training(
        token_data, tmp_path):  # noqa: F811 (the fixture)
    # 24 steps: a decay of half of them (12) after 16 warmup steps does not fit.
    params = _write_params(tmp_path / "params.yaml", train={
        "schedule": "wsd", "decay_fraction": 0.5, "warmup_steps": 16})
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path, check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()
    assert error == ["Error: train.schedule = 'wsd': train.warmup_steps (16) + the wsd decay "
                     "(12 steps: train.decay_fraction 0.5 of 24) exceed the budget of 24 "
                     "steps; allowed: fewer warmup steps, a smaller train.decay_fraction or "
                     "a larger budget"]
    assert not (tmp_path / "models").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(("train", "needle"), [
    ({"muon_ns_steps": 0}, "train.muon_ns_steps = 0; allowed: an integer in [1, 99]"),
    ({"muon_momentum": 1.0}, "train.muon_momentum = 1.0; allowed: a number in [0, 1)"),
    ({"muon_lr": 0.0}, "train.muon_lr = 0.0; allowed: a number > 0"),
    ({"muon_weight_decay": -0.1}, "train.muon_weight_decay = -0.1"),
    ({"optimizer": "lion"}, "train.optimizer = 'lion'"),
    ({"schedule": "linear"}, "train.schedule = 'linear'"),
    ({"decay_fraction": 1.5}, "train.decay_fraction = 1.5; allowed: a fraction in [0, 1]"),
], ids=["ns steps", "momentum", "lr", "weight decay", "optimizer", "schedule", "fraction"])
def test_recipe_params_it_cannot_honour_are_refused_in_one_line(train, needle):
    with pytest.raises(GptpipeError) as refused:
        parse_params({"train": train})
    assert needle in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("model", "needle"), [
    ({"logit_softcap": -1.0}, "model.logit_softcap = -1.0"),
    ({"logit_softcap": float("inf")}, "model.logit_softcap = inf"),
    ({"mlp": "geglu"}, "model.mlp = 'geglu'"),
], ids=["negative cap", "infinite cap", "mlp"])
def test_recipe_model_options_out_of_range_are_refused_in_one_line(model, needle):
    with pytest.raises(GptpipeError) as refused:
        parse_params({"model": model})
    assert needle in str(refused.value) and "\n" not in str(refused.value)
