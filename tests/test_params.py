"""The params schema: defaults valid, unknown keys and bad values rejected in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import GptpipeError
from pipeline.params import Params, load_params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid_and_matches_defaults_where_stated():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.split.train == pytest.approx(0.8)
    assert params.vocab.kind in {"bpe", "word", "char"}


def test_missing_sections_take_defaults():
    params = parse_params({})
    assert params.split.val == pytest.approx(0.1)
    assert params.tokenize.shard_tokens > 0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"vocab": {"kind": "sentencepiece"}}, "vocab.kind = 'sentencepiece'; allowed: 'bpe'"),
        ({"vocab": {"colour": 1}}, "unknown key 'vocab.colour'"),
        ({"nonsense": {}}, "unknown key 'nonsense'"),
        ({"split": {"train": 0.7}}, "sum"),
        ({"split": {"val": -0.1}}, "split.val = -0.1"),
        ({"tokenize": {"shard_tokens": -5}}, "tokenize.shard_tokens = -5"),
        ({"vocab": {"vocab_size": 100}}, "vocab.vocab_size = 100"),
        ({"clean": {"min_chars": -1}}, "clean.min_chars = -1"),
        ({"clean": {"min_chars": "ten"}}, "clean.min_chars = 'ten' (str); allowed: int"),
        ({"clean": {"dedup": 1}}, "clean.dedup = 1 (int); allowed: bool"),
        ({"clean": {"near_dup_threshold": 1.5}}, "clean.near_dup_threshold = 1.5"),
        ({"vocab": ["kind"]}, "vocab is a list"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "model.n_embd = 100; allowed: a multiple of"),
        ({"model": {"n_embd": 36, "n_head": 4}}, "n_embd / n_head even"),
        ({"model": {"positions": "alibi"}}, "model.positions = 'alibi'"),
        ({"model": {"dropout": 1.0}}, "model.dropout = 1.0"),
        ({"train": {"min_lr": 0.1, "lr": 0.01}}, "train.min_lr = 0.1; allowed: at most"),
        ({"train": {"steps": 0, "tokens": 0}}, "train.steps = 0; allowed: a budget"),
        ({"train": {"beta2": 1.0}}, "train.beta2 = 1.0"),
        ({"train": {"device": "gpu"}}, "train.device = 'gpu'"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0"),
        ({"train": {"nproc_per_node": 0}}, "train.nproc_per_node = 0"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(raw, needle):
    with pytest.raises(GptpipeError) as err:
        parse_params(raw, "p.yaml")
    message = str(err.value.message)
    assert needle in message
    assert message.startswith("p.yaml")
    assert "\n" not in message


def test_ints_are_accepted_for_floats():
    params = parse_params({"clean": {"near_dup_threshold": 1}})
    assert isinstance(params.clean.near_dup_threshold, float)
    assert params.clean.near_dup_threshold == 1.0


def test_load_params_reports_missing_and_invalid_files(tmp_path):
    with pytest.raises(GptpipeError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab: [unclosed\n")
    with pytest.raises(GptpipeError, match="invalid YAML at line"):
        load_params(bad)


def test_round_trip_of_every_default_through_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"vocab": {"kind": "char", "max_size": 300}}))
    params = load_params(path)
    assert params.vocab.kind == "char"
    assert params.vocab.max_size == 300


def test_exponent_floats_that_pyyaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 6e-4\n  min_lr: 6e-5\n")
    params = load_params(path)
    assert params.train.lr == pytest.approx(6e-4)
    assert params.train.min_lr == pytest.approx(6e-5)


def test_vocab_size_is_only_bounded_for_bpe():
    assert parse_params({"vocab": {"kind": "word", "vocab_size": 100}}).vocab.kind == "word"
