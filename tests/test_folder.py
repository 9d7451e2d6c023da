"""The model folder, opened once: its kind, config, tokenizer and weights; the one way
weights are loaded; hostile JSON in a model folder is one line, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cmd, save_tiny_checkpoint, synthetic_documents
from torch import nn

from pipeline.core.errors import GptpipeError
from pipeline.core.weights import load_state, tied_names, unique_state
from pipeline.lm.folder import GPTPIPE, OLDER_GPTPIPE, TRANSFORMERS, ModelFolder
from pipeline.lm.hf import write_transformers_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """root/model (a gptpipe folder), root/older (its config as config.json) and root/hf
    (its Transformers form)."""
    root = save_tiny_checkpoint(tmp_path_factory.mktemp("folders"), synthetic_documents(20),
                                "word", n_layer=1)
    shutil.copytree(root / "model", root / "older")
    (root / "older" / "gptpipe.json").rename(root / "older" / "config.json")
    folder = ModelFolder.open(root / "model")
    (root / "hf").mkdir()
    write_transformers_folder(root / "hf", folder.load_model(), folder.tokenizer())
    return root


@pytest.mark.parametrize("name, kind, config_name", [
    ("model", GPTPIPE, "gptpipe.json"), ("older", OLDER_GPTPIPE, "config.json"),
    ("hf", TRANSFORMERS, "config.json")])
def test_each_kind_of_folder_opens_to_the_same_model(saved, name, kind, config_name):
    folder = ModelFolder.open(saved / name)
    assert (folder.kind, folder.config_path.name) == (kind, config_name)
    reference = ModelFolder.open(saved / "model")
    assert folder.config == reference.config
    assert folder.tokenizer().vocab_size == reference.tokenizer().vocab_size
    ids = torch.randint(0, folder.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(folder.load_model().eval()(ids)[0],
                           reference.load_model().eval()(ids)[0])


@pytest.mark.parametrize("name", ["model", "hf"])
def test_an_opened_folder_never_reads_its_config_again(saved, tmp_path, name):
    """The kind and config are worked out once: the tokenizer and the weights load from
    what was opened, even after the config file is gone."""
    copy = shutil.copytree(saved / name, tmp_path / name)
    folder = ModelFolder.open(copy)
    folder.config_path.write_text("not JSON any more")
    assert folder.tokenizer().vocab_size == folder.config.vocab_size
    assert folder.load_model().config == folder.config


# ------------------------------------------------------------ one way to load weights


class _Tied(nn.Module):
    """An embedding (3 x 2) whose transpose use ties an output matrix to it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.out = nn.Linear(2, 3, bias=False)
        self.out.weight = self.embed.weight


def test_load_state_tolerates_only_the_tied_names_being_absent():
    module = _Tied()
    assert tied_names(module) == {"out.weight"}
    weights = torch.arange(6.0).reshape(3, 2)
    load_state(module, {"embed.weight": weights}, "w: weights do not match c")
    assert torch.equal(module.out.weight, weights)  # re-tied by loading the first name
    assert list(unique_state(module)) == ["embed.weight"]


@pytest.mark.parametrize("state, problem", [
    ({}, "missing embed.weight"),
    ({"embed.weight": torch.zeros(3, 2), "extra": torch.zeros(1)}, "unexpected extra"),
    ({"embed.weight": torch.zeros(4, 2)}, "size mismatch for embed.weight"),
])
def test_load_state_names_the_first_problem_in_one_line(state, problem):
    with pytest.raises(GptpipeError) as caught:
        load_state(_Tied(), state, "w.safetensors: weights do not match c.json")
    message = caught.value.format_message()
    assert message.startswith("w.safetensors: weights do not match c.json (")
    assert problem in message and "\n" not in message


def test_a_folder_whose_weights_are_another_shape_is_one_line(saved, tmp_path):
    copy = shutil.copytree(saved / "model", tmp_path / "model")
    config = json.loads((copy / "gptpipe.json").read_text())
    config["model"]["n_embd"] = 64
    (copy / "gptpipe.json").write_text(json.dumps(config))
    with pytest.raises(GptpipeError, match=r"model.safetensors: weights do not match "
                                           r"gptpipe.json \(size mismatch for "):
        ModelFolder.open(copy).load_model()


# ----------------------------------------------------------- hostile JSON, end to end

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INTEGER = "7" * 5000


def _hostile(text: str, where: str) -> str:
    """``text`` as a JSON value inside a real file's ``where`` key."""
    return '{"' + where + '": ' + text + "}"


def _generate(folder: Path, cwd: Path):
    return run_cmd(["gptpipe", "generate", "--model", str(folder), "--max-new-tokens", "2",
                    "x"], cwd, check=False)


@pytest.mark.parametrize("value", [DEEP, HUGE_INTEGER], ids=["deep", "5000-digits"])
@pytest.mark.parametrize("source, file", [
    ("hf", "config.json"), ("model", "gptpipe.json"), ("older", "config.json"),
    ("hf", "tokenizer.json"), ("model", "tokenizer.json"),
    ("hf", "model.safetensors.index.json")])
def test_hostile_json_in_a_model_folder_is_one_line_and_exit_2(saved, tmp_path, source,
                                                               file, value):
    folder = shutil.copytree(saved / source, tmp_path / "folder")
    if file == "model.safetensors.index.json":
        (folder / "model.safetensors").unlink()  # the weights are then read by the index
    (folder / file).write_text(_hostile(value, "weight_map" if "index" in file else "x"))
    result = _generate(folder, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {folder / file}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
