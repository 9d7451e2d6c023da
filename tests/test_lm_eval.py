"""lm-evaluation-harness on an exported model: the task folders `gptpipe lm-eval-tasks`
writes, what it refuses, and lm-eval's accuracies against gptpipe's on the same items.

Agreement. lm-eval sums a choice's float32 log-probabilities, gptpipe sums them in float64,
and the two run different kernels (Transformers' against gptpipe's own), so a choice's
log-likelihood agrees to about 1e-5, not to the bit; the accuracies are equal by
construction as long as no two choices of an item are that close, which the test checks
(its margin) before it compares them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, REPO_ROOT, synthetic_documents

from pipeline.core.errors import GptpipeError
from pipeline.core.params import VocabParams, load_params, parse_params
from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter
from pipeline.data.tokenizer import BOS_ID, train_tokenizer
from pipeline.lm.checkpoint import load_model, open_model_folder, save_model
from pipeline.lm.evaluation import BigramModel
from pipeline.lm.lm_eval_tasks import LOADER, evaluate_tasks, run, write_lm_eval_tasks
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.tasks import Item, _row, choice_loglikelihoods, read_task_file, score_task
from pipeline.stages import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hugging Face Hub: every test runs offline."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


DOCS = REPO_ROOT / "docs" / "lm_eval.md"

# Test documents in several scripts: items whose choices start with a space, a newline,
# and nothing (Chinese), and non-ASCII choices, where lm-eval's acc_norm (per character)
# and gptpipe's (per byte) part ways and acc_bytes is the one to compare.
MIXED = [
    "The Nile is a river in Africa. It flows north into the Mediterranean Sea.",
    "北京是中国的首都。它有三千多年的历史。",
    "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n",
    "Mozart was a composer of the Classical period. He wrote more than 600 works.",
    "Zürich liegt am Zürichsee. Die Stadt ist größer als Genf.",
    "東京は日本の首都です。人口は世界で最も多い。",
]


def _table(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with DocumentWriter(root, DOCUMENT_SCHEMA) as writer:
        for index, text in enumerate(texts):
            writer.append(id=index, source=f"d{index}", text=text)
    return root


def _write_params(root: Path, **evaluate) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["evaluate"].update(evaluate)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project laid out as after `dvc repro`: params.yaml (evaluate.task both, a few
    items), the test split, the example task file, and models/hf/pretrain: a tiny random
    Llama exported by gptpipe export."""
    root = tmp_path_factory.mktemp("project")
    texts = [*MIXED, *synthetic_documents(12)]
    _table(root / "data/split/test", texts)
    (root / "data/builtin").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "data/builtin/example-task.jsonl", root / "data/builtin")
    _write_params(root, task="both", task_items=10, task_choices=3)
    tokenizer = train_tokenizer(VocabParams(kind="bpe", vocab_size=400, min_freq=1),
                                texts * 2)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=2, n_head=2,
                          n_embd=32))
    with torch.no_grad():  # larger weights than at init: choices far apart in likelihood
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    save_model(root / "models/pretrain/best", model, model.config,
               {"tokenizer_sha256": tokenizer.sha256}, root / "tokenizer.json")
    export.run(parse_params({"export": {"dtype": "float32"}}),
               model=root / "models/pretrain/best", out=root / "models/hf/pretrain")
    return root


def _gptpipe_command(root: Path, out: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "gptpipe"), "lm-eval-tasks", "--params", "params.yaml", "--test-text",
         "data/split/test", "--task-file", "data/builtin/example-task.jsonl", "--out", out],
        cwd=root, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML, with its `!function` tag read as text."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {node.value}")


# --------------------------------------------------------------------- the task folder


def test_the_folder_holds_evaluates_items_as_lm_eval_tasks(project, tmp_path):
    out = tmp_path / "tasks"
    counts = run(load_params(project / "params.yaml"), test_text=project / "data/split/test",
                 task_file=project / "data/builtin/example-task.jsonl", out=out)
    assert counts == {"gptpipe_next_sentence": 10, "gptpipe_task_file": 12}
    assert sorted(p.name for p in out.iterdir()) == [
        f"{LOADER}.py", "gptpipe_next_sentence.jsonl", "gptpipe_next_sentence.yaml",
        "gptpipe_task_file.jsonl", "gptpipe_task_file.yaml"]
    expected = evaluate_tasks(load_params(project / "params.yaml"),
                              project / "data/split/test",
                              project / "data/builtin/example-task.jsonl")
    for name, items in expected.items():
        # The items file is a gptpipe task file: evaluate reads back the very items.
        assert read_task_file(out / f"{name}.jsonl") == items
        config = yaml.load((out / f"{name}.yaml").read_text(), Loader=_TaskLoader)
        assert config["task"] == name
        assert config["custom_dataset"] == f"!function {LOADER}.load"
        assert config["dataset_kwargs"] == {"data_file": f"{name}.jsonl"}
        assert config["target_delimiter"] == ""
        assert (config["output_type"], config["doc_to_text"], config["doc_to_choice"],
                config["doc_to_target"]) == ("multiple_choice", "context", "choices", "label")
        assert [m["metric"] for m in config["metric_list"]] == [
            "acc", "acc_norm", "acc_bytes", "acc_mutual_info"]
    # The builtin items hold a Chinese pair (no separator) and a line of code.
    contexts = [item.context for item in expected["gptpipe_next_sentence"]]
    assert "北京是中国的首都。" in contexts and "def area(r):" in contexts


def test_an_empty_task_or_no_task_is_one_line_and_nothing_written(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project / "data", root / "data")
    (root / "data/builtin/example-task.jsonl").write_text("\n\n", encoding="utf-8")
    _write_params(root, task="file")
    result = _gptpipe_command(root, "tasks", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "example-task.jsonl: no items" in result.stderr
    _write_params(root, task="none")
    result = _gptpipe_command(root, "tasks", check=False)
    assert (result.returncode, result.stderr.strip()) == (
        2, "Error: evaluate.task = none: no task to write; allowed: builtin, file or both")
    assert sorted(p.name for p in root.iterdir()) == ["data", "params.yaml"]
    # A library caller: one empty task among full ones writes none of them.
    with pytest.raises(GptpipeError, match="direct: task gptpipe_y has no items"):
        write_lm_eval_tasks(tmp_path / "direct", {"gptpipe_x": [Item("a", ("b", "c"), 0)],
                                                  "gptpipe_y": []})
    with pytest.raises(GptpipeError, match="direct: no task to write"):
        write_lm_eval_tasks(tmp_path / "direct", {})
    assert not (tmp_path / "direct").exists()


# ------------------------------------------------------------------ lm-eval agreement


def _documented_commands() -> str:
    """The bash block of docs/lm_eval.md: what a user copies."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "docs/lm_eval.md: one bash block, the commands this test runs"
    return blocks[0]


def _gptpipe_scores(root: Path, items: list[Item]) -> tuple[dict, np.ndarray]:
    """gptpipe's accuracies on ``items`` (the exported folder's weights, read back) and
    every (item, choice) log-likelihood, in item order."""
    model, _ = load_model(root / "models/hf/pretrain")
    _, _, tokenizer = open_model_folder(root / "models/hf/pretrain")
    bigram = BigramModel.fit(np.arange(tokenizer.vocab_size), tokenizer.vocab_size)
    scores = score_task(model, tokenizer, items, bigram, 8, "cpu")
    contexts = tokenizer.encode_batch([item.context for item in items])
    rows = [_row([BOS_ID, *contexts[i]], choice, model.config.context)
            for i, item in enumerate(items)
            for choice in tokenizer.encode_batch(list(item.choices))]
    return scores, choice_loglikelihoods(model, rows, 8, "cpu")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lm_eval_on_the_export_gives_gptpipes_accuracies(project):
    pytest.importorskip("lm_eval")
    env = {**os.environ, **OFFLINE, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "HF_HOME": str(project / ".hf")}
    commands = _documented_commands()
    result = subprocess.run(["bash", "-e", "-c", commands], cwd=project,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [results] = (project / "metrics/lm_eval").glob("models__hf__pretrain/results_*.json")
    reported = json.loads(results.read_text())["results"]
    for task, prefix in (("gptpipe_next_sentence", "next_sentence"),
                         ("gptpipe_task_file", "task_file")):
        items = read_task_file(project / "lm_eval_tasks" / f"{task}.jsonl")
        ours, given = _gptpipe_scores(project, items)
        [samples] = (project / "metrics/lm_eval").glob(f"*/samples_{task}_*.jsonl")
        theirs = _lm_eval_loglikelihoods(samples, items)
        # Each choice's log-likelihood is the same number, to float32 summing ...
        np.testing.assert_allclose(theirs, given, rtol=1e-5, atol=1e-4)
        # ... and no two choices of an item are that close: the rankings are the same.
        at = 0
        for item in items:
            values = np.sort(given[at : at + len(item.choices)])
            assert np.diff(values).min() > 1e-3, (prefix, item)
            at += len(item.choices)
        mine = reported[task]
        assert mine["acc,none"] == pytest.approx(ours["acc"], abs=1e-12), prefix
        assert mine["acc_bytes,none"] == pytest.approx(ours["acc_norm"], abs=1e-12), prefix
        assert mine["acc_mutual_info,none"] == pytest.approx(ours["acc_pmi"], abs=1e-12)
        assert ours["items"] == len(items)


def _lm_eval_loglikelihoods(samples: Path, items: list[Item]) -> np.ndarray:
    """The (item, choice) log-likelihoods lm-eval logged, in item order (the first
    ``choices`` requests of each document; the rest are the unconditional ones)."""
    by_doc = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_doc[record["doc_id"]] = [float(r[0][0]) for r in record["resps"]]
    values = []
    for doc_id, item in enumerate(items):
        values.extend(by_doc[doc_id][: len(item.choices)])
    return np.array(values)


def test_lm_eval_puts_bos_first_without_being_asked(project):
    """lm-eval 0.4.9.2 and later leave special tokens to the tokenizer, and the exported
    tokenizer puts <bos> first: the documented add_bos_token=True only keeps older
    versions right."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(project / "models/hf/pretrain"), dtype="float32", device="cpu",
              batch_size=1)
    assert lm.add_bos_token is None  # nothing asked
    context, continuation = lm._encode_pair("The Nile is a river", " in Africa.")
    assert context[0] == BOS_ID and BOS_ID not in continuation
    assert lm.prefix_token_id == BOS_ID  # an empty context (acc_mutual_info) is <bos>
