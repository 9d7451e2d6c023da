"""The params schema: defaults valid, unknown keys and bad values rejected in one line."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import GptpipeError
from pipeline.core.params import Params, load_params, parse_params

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
        ({"clean": {"min_bytes": -1}}, "clean.min_bytes = -1"),
        ({"clean": {"min_bytes": "ten"}}, "clean.min_bytes = 'ten' (str); allowed: int"),
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
        ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size = 0"),
        ({"evaluate": {"temperatures": []}}, "evaluate.temperatures = []"),
        ({"evaluate": {"temperatures": [0.5, -1]}}, "evaluate.temperatures = [0.5, -1.0]"),
        ({"evaluate": {"top_p": 0}}, "evaluate.top_p = 0.0"),
        ({"evaluate": {"prompts": ["ok", " "]}}, "evaluate.prompts = ['ok', ' ']"),
        ({"evaluate": {"device": "tpu"}}, "evaluate.device = 'tpu'"),
        ({"evaluate": {"task": "hellaswag"}}, "evaluate.task = 'hellaswag'; allowed: 'builtin'"),
        ({"evaluate": {"task_items": 0}}, "evaluate.task_items = 0"),
        ({"evaluate": {"task_choices": 1}}, "evaluate.task_choices = 1; allowed: an integer >= 2"),
        ({"evaluate": {"task_file": "my 'task'.jsonl"}}, "allowed: a file path without quotes"),
        ({"export": {"dtype": "int8"}}, "export.dtype = 'int8'; allowed: 'float32'"),
        ({"gold": {"min_words": 50, "max_words": 40}}, "gold.min_words = 50; allowed: at most"),
        ({"gold": {"repeat_ngram": 0}}, "gold.repeat_ngram = 0"),
        ({"gold": {"noise": -0.5}}, "gold.noise = -0.5"),
        ({"preferences": {"completions_per_prompt": 1}}, "preferences.completions_per_prompt"),
        ({"preferences": {"heldout_fraction": 1.0}}, "preferences.heldout_fraction = 1.0"),
        ({"preferences": {"source": "humans"}}, "preferences.source = 'humans'"),
        ({"preferences": {"file": "my prefs'.jsonl"}}, "preferences.file = \"my prefs'.jsonl\""),
        ({"preferences": {"file": "a\nb.jsonl"}}, "allowed: a file path without quotes"),
        ({"preferences": {"file": " "}}, "preferences.file = ' '"),
        ({"reward": {"epochs": 0}}, "reward.epochs = 0"),
        ({"reward": {"lr": -1e-3}}, "reward.lr = -0.001"),
        ({"reward": {"baseline_c": 0}}, "reward.baseline_c = 0.0"),
        ({"rlhf": {"algo": "trpo"}}, "rlhf.algo = 'trpo'"),
        ({"rlhf": {"minibatch_size": 32, "batch_size": 16}}, "rlhf.minibatch_size = 32"),
        ({"rlhf": {"gamma": 1.5}}, "rlhf.gamma = 1.5"),
        ({"rlhf": {"kl_coef": -0.1}}, "rlhf.kl_coef = -0.1"),
        ({"rlhf": {"temperature": 0}}, "rlhf.temperature = 0.0"),
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


def _fields(annotation: type) -> list[tuple[str, str]]:
    """(section, key) of every field of the schema whose type is ``annotation``."""
    hints = typing.get_type_hints(Params)
    return [(section.name, item.name)
            for section in dataclasses.fields(Params)
            for item in dataclasses.fields(hints[section.name])
            if typing.get_type_hints(hints[section.name])[item.name] is annotation]


FLOAT_FIELDS = _fields(float)
SEED_FIELDS = [(section, key) for section, key in _fields(int) if key.endswith("seed")]


def test_every_section_with_numbers_is_covered():
    assert {section for section, _ in FLOAT_FIELDS} >= {
        "clean", "split", "model", "train", "evaluate", "gold", "preferences", "reward", "rlhf"}
    assert {section for section, _ in SEED_FIELDS} == {
        "split", "train", "evaluate", "preferences", "reward", "sft", "rlhf"}


@pytest.mark.parametrize(("section", "key"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), ".nan", ".inf"])
def test_non_finite_numbers_are_refused_in_every_section(section, key, value):
    # NaN passes "> 0" and ">= 0" checks (every comparison with NaN is False), so it is
    # refused by type: train.grad_clip = NaN would silently turn clipping off.
    raw = {section: {key: value}}
    if isinstance(value, str):  # how YAML spells them: read through the YAML parser
        raw = yaml.safe_load(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(GptpipeError, match=rf"p.yaml: {section}.{key} = .*allowed: a finite"):
        parse_params(raw, "p.yaml")


def test_non_finite_numbers_inside_lists_are_refused():
    with pytest.raises(GptpipeError, match=r"evaluate.temperatures\[1\] = nan; allowed: a finite"):
        parse_params({"evaluate": {"temperatures": [0.5, float("nan")]}})


@pytest.mark.parametrize(("section", "key"), SEED_FIELDS)
@pytest.mark.parametrize("value", [-1, 2**32, -(2**40)])
def test_out_of_range_seeds_are_refused_in_every_section(section, key, value):
    # A negative seed used to train a whole RLHF run and then crash in numpy.
    with pytest.raises(GptpipeError, match=rf"{section}.{key} = {value}; allowed: an integer in "
                                           r"0 \.\. 4294967295"):
        parse_params({section: {key: value}})


@pytest.mark.parametrize(("section", "key"), SEED_FIELDS)
def test_seeds_at_the_ends_of_the_range_are_accepted(section, key):
    for value in (0, 2**32 - 1):
        assert getattr(getattr(parse_params({section: {key: value}}), section), key) == value


def test_a_preferences_file_path_with_spaces_and_other_scripts_is_accepted():
    path = "my data/préférences 2024.jsonl"
    assert parse_params({"preferences": {"file": path}}).preferences.file == path
