"""Downstream multiple-choice tasks: the builtin next-sentence items, task files, the
scoring maths, chance for a model that learned nothing, and the evaluate stage's keys.

Chance tolerance: a model that has learned nothing picks the right choice with
probability 1/4 on each of n items, so its accuracy has a binomial standard error of
sqrt(0.25 x 0.75 / n): 0.028 at n = 240. The tests allow 3.5 standard errors (0.1): a
correct scorer fails that by chance about once in 2,000 seeds, and the seeds are fixed.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import BIN, synthetic_documents

from pipeline.core.errors import GptpipeError
from pipeline.core.params import VocabParams, parse_params
from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter
from pipeline.data.tokenizer import BOS_ID, load_tokenizer, train_tokenizer
from pipeline.lm.checkpoint import save_model
from pipeline.lm.evaluation import BigramModel
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.tasks import (
    Item,
    _answers,
    _row,
    choice_loglikelihoods,
    next_sentence_items,
    read_task_file,
    score_task,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with DocumentWriter(root, DOCUMENT_SCHEMA) as writer:
        for index, text in enumerate(texts):
            writer.append(id=index, source=f"d{index}", text=text)
    return root


# ------------------------------------------------------------------ the builtin task

MIXED = [
    "The Nile is a river in Africa. It flows north into the Mediterranean Sea. It is long.",
    "Only one sentence here, so no item.",
    "北京是中国的首都。它有三千多年的历史。",
    "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n",
    "Paris, e.g. the capital, is in France. The Seine runs through it.",
    "Mozart was a composer of the Classical period. He wrote more than 600 works.",
    "Tokyo is the capital of Japan. It is the most populous city in the world.",
]


def test_items_are_a_documents_first_sentence_and_its_true_second_among_others(tmp_path):
    items = next_sentence_items(_table(tmp_path, MIXED), 10, 3, seed=1)
    assert [item.context for item in items] == [
        "The Nile is a river in Africa.", "北京是中国的首都。", "def area(r):",
        "Paris, e.g. the capital, is in France.", "Mozart was a composer of the Classical "
        "period.", "Tokyo is the capital of Japan."]
    truths = [item.choices[item.label] for item in items]
    assert truths == [" It flows north into the Mediterranean Sea.", "它有三千多年的历史。",
                      "\n    return 3.14 * r * r", " The Seine runs through it.",
                      " He wrote more than 600 works.",
                      " It is the most populous city in the world."]
    seconds = {t.lstrip() for t in truths}
    for item in items:
        assert len(item.choices) == len(set(item.choices)) == 3
        separator = item.choices[item.label][: -len(item.choices[item.label].lstrip())]
        for choice in item.choices:  # every choice: another item's answer, this separator
            assert choice.startswith(separator) and choice[len(separator):] in seconds


def test_a_document_whose_opening_is_a_fragment_or_too_long_gives_its_next_pair(tmp_path):
    source = '"""\nGeometry helpers.\n"""\n\nimport math\n\ndef area(r):\n    return r * r\n'
    long_opening = "It opens " + "with many words " * 20 + "here. Then a short one. And one more."
    items = next_sentence_items(_table(tmp_path, [source, long_opening, *MIXED[4:6]]), 10, 2,
                                seed=1)
    assert [(item.context, item.choices[item.label]) for item in items] == [
        ("import math", "\n\ndef area(r):"), ("Then a short one.", " And one more."),
        ("Paris, e.g. the capital, is in France.", " The Seine runs through it."),
        ("Mozart was a composer of the Classical period.", " He wrote more than 600 works.")]


def test_a_pair_that_an_earlier_item_answers_is_passed_over(tmp_path):
    header = "# (c) the authors\n# MIT licence\n"  # code: lines stand for sentences
    files = [header + f"def {name}(x):\n    return x{op}1\n"
             for name, op in (("inc", "+"), ("dec", "-"), ("dbl", "*"))]
    items = next_sentence_items(_table(tmp_path, files), 10, 3, seed=1)
    assert [(item.context, item.choices[item.label]) for item in items] == [
        ("# (c) the authors", "\n# MIT licence"), ("# MIT licence", "\ndef dec(x):"),
        ("# MIT licence", "\ndef dbl(x):")]


def test_the_same_split_and_seed_give_the_same_items_and_more_documents_keep_them(tmp_path):
    texts = synthetic_documents(60, seed=5)
    first = next_sentence_items(_table(tmp_path / "a", texts), 40, 4, seed=7)
    assert first == next_sentence_items(_table(tmp_path / "b", texts), 40, 4, seed=7)
    # Documents after the first 40 with two sentences change none of those items.
    longer = next_sentence_items(_table(tmp_path / "c", texts + synthetic_documents(9, 6)),
                                 40, 4, seed=7)
    assert longer == first
    other = next_sentence_items(_table(tmp_path / "d", texts), 40, 4, seed=8)
    assert [i.context for i in other] == [i.context for i in first] and other != first


def test_the_right_choice_is_equally_likely_in_every_place(tmp_path):
    items = next_sentence_items(_table(tmp_path, synthetic_documents(400, seed=2)), 400, 4,
                                seed=3)
    counts = np.bincount([item.label for item in items], minlength=4)
    # 100 expected in each place, binomial sd 8.7: within 3.5 sd.
    assert len(items) == 400 and all(abs(c - 100) <= 30 for c in counts), counts


def test_too_few_documents_with_two_sentences_is_one_line(tmp_path):
    with pytest.raises(GptpipeError, match=r"2 documents with two successive sentences of 2 "
                                           r"to 48 words \(2 distinct second sentences\); the "
                                           r"next-sentence task needs evaluate.task_choices = 4"):
        next_sentence_items(_table(tmp_path, MIXED[:3]), 100, 4, seed=1)


# ------------------------------------------------------------------------ task files


def test_a_task_file_reads_every_item(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = [json.dumps({"context": "The capital of France is", "choices": [" Paris", " Rome"],
                         "label": 0}),
             "",
             json.dumps({"context": "北京是", "choices": ["中国的首都", "一条河", "一本书"],
                         "label": 0, "source": "extra fields are ignored"}, ensure_ascii=False)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    assert read_task_file(path) == [
        Item("The capital of France is", (" Paris", " Rome"), 0),
        Item("北京是", ("中国的首都", "一条河", "一本书"), 0)]


BAD_LINES = [
    ('{"context": "a", "choices": ["b", "c"], "label": 2}',
     "line 2: label = 2; allowed: an integer in 0 .. 1 (the index of the right choice)"),
    ('{"context": "a", "choices": ["b", "c"], "label": -1}', "line 2: label = -1; allowed"),
    ('{"context": "a", "choices": ["b", "c"], "label": true}', "line 2: label = True; allowed"),
    ('{"context": "a", "choices": ["b"], "label": 0}',
     "line 2: choices = ['b']; allowed: a list of 2 or more texts"),
    ('{"context": "a", "choices": "bc", "label": 0}', "line 2: choices = 'bc'; allowed: a list"),
    ('{"context": " ", "choices": ["b", "c"], "label": 0}',
     "line 2: context = ' '; allowed: a non-empty text"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}',
     "line 2: choices[1] = ''; allowed: a non-empty text"),
    ('{"context": "a", "choices": ["b", 3], "label": 0}', "line 2: choices[1] = 3; allowed"),
    ('{"context": "a", "label": 0}', "line 2: field 'choices' missing; allowed: an object"),
    ('["a", ["b", "c"], 0]', "line 2: a JSON list; allowed: an object with context"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0', "line 2: not valid JSON"),
]


@pytest.mark.parametrize(("line", "needle"), BAD_LINES)
def test_a_bad_task_line_is_one_line_naming_it(tmp_path, line, needle):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "label": 1}\n' + line + "\n")
    with pytest.raises(GptpipeError) as caught:
        read_task_file(path)
    assert f"{path}: {needle}" in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_or_missing_task_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(GptpipeError, match=r"empty\.jsonl: no items; allowed: JSONL lines"):
        read_task_file(tmp_path / "empty.jsonl")
    with pytest.raises(GptpipeError, match=r"absent\.jsonl: task file not found"):
        read_task_file(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------- scoring


def _tiny_gpt(vocab: int, context: int = 12, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, context=context, n_layer=2, n_head=2, n_embd=16))


def test_batched_scoring_equals_one_sequence_at_a_time():
    model = _tiny_gpt(30).eval()
    rng = random.Random(0)
    # Rows of every length, some longer than the context (cut from the left).
    rows = [_row([BOS_ID, *rng.choices(range(4, 30), k=rng.randint(0, 14))],
                 rng.choices(range(4, 30), k=rng.randint(1, 15)), 12) for _ in range(23)]
    assert any(len(row.ids) == 13 for row in rows) and any(row.scored == 12 for row in rows)
    batched = choice_loglikelihoods(model, rows, batch_size=5, device="cpu")
    for row, total in zip(rows, batched, strict=True):
        ids = torch.tensor([row.ids])  # (1, T + 1)
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])  # (1, T, V)
        logp = torch.log_softmax(logits[0].double(), -1)  # (T, V)
        targets = range(len(row.ids) - 1 - row.scored, len(row.ids) - 1)
        expected = sum(logp[t, row.ids[t + 1]].item() for t in targets)
        assert total == pytest.approx(expected, abs=1e-4)


def test_a_long_sequence_keeps_its_choice_and_loses_the_start_of_its_context():
    row = _row([BOS_ID, 10, 11, 12, 13], [20, 21, 22], context=5)
    assert row.ids == [11, 12, 13, 20, 21, 22] and row.scored == 3
    row = _row([BOS_ID, 10], [20, 21, 22, 23, 24, 25, 26], context=5)
    assert row.ids == [21, 22, 23, 24, 25, 26] and row.scored == 5


def test_accuracies_by_hand():
    items = [Item("c", ("aa", "b"), 0), Item("c", ("x", "yyyy"), 1), Item("c", ("p", "q"), 1)]
    given = np.array([-4.0, -3.0,   -2.0, -6.0,   -1.0, -1.0])
    alone = np.array([-9.0, -3.0,   -2.0, -9.0,   -1.0, -2.0])
    # acc: item 1 picks b (wrong), item 2 x (wrong), item 3 ties: the first, p (wrong).
    # acc_norm (per byte): -2 vs -3 right; -2 vs -1.5 right; tie again wrong.
    # acc_pmi: 5 vs 0 right; 0 vs 3 right; 0 vs 1 right.
    answers = _answers(items, given, alone)
    assert {rule: right.tolist() for rule, right in answers.items()} == {
        "acc": [False, False, False], "acc_norm": [True, True, False],
        "acc_pmi": [True, True, True]}


def _topic_documents(count: int, seed: int) -> list[str]:
    """Two sentences per document, both of words of one of six topics: the second is
    predictable from the first only through the topic (nothing a bigram sees)."""
    rng = random.Random(seed)
    topics = [[f"{chr(97 + t)}{w}" for w in "bcdfghjklmnp"] for t in range(6)]
    documents = []
    for _ in range(count):
        vocabulary = topics[rng.randrange(6)]
        first, second = ([rng.choice(vocabulary) for _ in range(rng.randint(5, 8))]
                         for _ in range(2))
        documents.append(" ".join(first).capitalize() + ". " +
                         " ".join(second).capitalize() + ".")
    return documents


@pytest.fixture(scope="module")
def topic_task(tmp_path_factory):
    """A word tokenizer, the train token stream, and next-sentence items of held-out
    topic documents."""
    train_texts = _topic_documents(600, seed=1)
    tokenizer = train_tokenizer(VocabParams(kind="word", min_freq=1), train_texts)
    stream = tokenizer.encode_documents(train_texts, np.int64)
    table = _table(tmp_path_factory.mktemp("topics"), _topic_documents(240, seed=2))
    return tokenizer, stream, next_sentence_items(table, 240, 4, seed=0)


def _train(model: GPT, stream: np.ndarray, steps: int) -> GPT:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, context = torch.from_numpy(stream), model.config.context
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (16,), generator=generator)
        batch = torch.stack([data[s : s + context + 1] for s in starts])  # (16, T + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_a_model_that_learned_nothing_scores_chance_and_a_trained_one_beats_it(topic_task):
    tokenizer, stream, items = topic_task
    bigram = BigramModel.fit(stream, tokenizer.vocab_size)
    untrained = _tiny_gpt(tokenizer.vocab_size, context=48)
    before = score_task(untrained, tokenizer, items, bigram, 32, "cpu")
    assert before["items"] == 240 and before["chance"] == 0.25
    for key in ("acc", "acc_norm", "acc_pmi", "bigram_acc_pmi"):
        assert abs(before[key] - 0.25) <= 0.1, (key, before)
    after = score_task(_train(untrained, stream, steps=300), tokenizer, items, bigram, 32, "cpu")
    # The topic carries from the first sentence to the second: the trained model finds
    # the true one above chance every way (raw log-likelihoods least: they also favour
    # the shorter choice), and far above the bigram, which cannot see the topic.
    assert all(after[key] > 0.25 + 0.1 for key in ("acc", "acc_norm", "acc_pmi")), after
    assert after["acc_pmi"] >= 0.6 and after["acc_pmi"] > after["bigram_acc_pmi"] + 0.25, after


# --------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> Path:
    """Data stages on a small corpus (word vocabulary) and a random model with its
    tokenizer: what the evaluate stage reads."""
    from pipeline.stages import clean, ingest, split, tokenize, vocab

    root = tmp_path_factory.mktemp("stage")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n"
                              for t in synthetic_documents(300, seed=4)))
    params = parse_params({"data": {"corpus": str(corpus)},
                           "clean": {"min_bytes": 10, "workers": 1},
                           "vocab": {"kind": "word", "min_freq": 1}})
    ingest.run(params, out=root / "raw", metrics=root / "m.json")
    clean.run(params, input=root / "raw", out=root / "clean", metrics=root / "m.json")
    split.run(params, input=root / "clean", out=root / "split", metrics=root / "m.json")
    vocab.run(params, input=root / "split", out=root / "tokenizer.json", metrics=root / "m.json")
    tokenize.run(params, input=root / "split", tokenizer=root / "tokenizer.json",
                 out=root / "tokens", metrics=root / "m.json")
    size = json.loads((root / "tokens/meta.json").read_text())["vocab_size"]
    model = _tiny_gpt(size, context=32)
    save_model(root / "model", model, model.config,
               {"tokenizer_sha256": load_tokenizer(root / "tokenizer.json").sha256},
               root / "tokenizer.json")
    (root / "task.jsonl").write_text("".join(
        json.dumps({"context": f"Document {i}.", "choices": [" The river.", " A city."],
                    "label": i % 2}) + "\n" for i in range(10)))
    return root


def _evaluate_args(root: Path, out: Path, params: Path, task_file: Path) -> list[str]:
    return ["evaluate", "--params", str(params), "--model", str(root / "model"),
            "--tokens", str(root / "tokens"), "--prompts-from", str(root / "split/test"),
            "--clean", str(root / "clean"), "--task-file", str(task_file),
            "--metrics", str(out / "evaluate.json"), "--samples", str(out / "samples.json")]


def _write_params(path: Path, **evaluate) -> Path:
    settings = {"device": "cpu", "num_prompts": 1, "temperatures": [0.0],
                "max_new_tokens": 4, "task_items": 30, **evaluate}
    path.write_text(json.dumps({"evaluate": settings}))  # JSON is YAML
    return path


def _gptpipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "gptpipe"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_the_stage_writes_both_tasks_beside_bits_per_byte(stage_inputs, tmp_path):
    params = _write_params(tmp_path / "params.yaml", task="both")
    result = _gptpipe(_evaluate_args(stage_inputs, tmp_path, params,
                                     stage_inputs / "task.jsonl"), tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "evaluate.json").read_text())
    for task, items in (("next_sentence", 30), ("task_file", 10)):
        assert metrics[f"{task}.items"] == items
        for key in ("acc", "acc_norm", "acc_pmi", "bigram_acc", "bigram_acc_norm",
                    "bigram_acc_pmi"):
            assert 0.0 <= metrics[f"{task}.{key}"] <= 1.0
        assert f"evaluate: {task}: acc " in result.stdout
    assert metrics["next_sentence.chance"] == 0.25 and metrics["task_file.chance"] == 0.5
    assert math.isfinite(metrics["test.bpb"])


def test_no_task_means_no_task_keys(stage_inputs, tmp_path):
    params = _write_params(tmp_path / "params.yaml", task="none")
    result = _gptpipe(_evaluate_args(stage_inputs, tmp_path, params,
                                     tmp_path / "not-read.jsonl"), tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "evaluate.json").read_text())
    assert not [k for k in metrics if k.startswith(("next_sentence.", "task_file."))]


def test_a_bad_task_file_stops_the_stage_in_one_line_and_writes_nothing(stage_inputs, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n'
                    '{"context": "a", "choices": ["b", "c"], "label": 5}\n')
    params = _write_params(tmp_path / "params.yaml", task="file")
    result = _gptpipe(_evaluate_args(stage_inputs, tmp_path / "out", params, task), tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{task}: line 2: label = 5; allowed: an integer in 0 .. 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_stage_writes_what_its_figures_average(stage_inputs, tmp_path):
    """Per-document rows that add up to val and test's figures, per-item answers that
    make the task accuracies, and an interval beside every figure."""
    import pyarrow.parquet as pq

    from pipeline.core.item_scores import text_hash
    from pipeline.data.doctable import iter_batches

    params = _write_params(tmp_path / "params.yaml", task="both")
    args = [*_evaluate_args(stage_inputs, tmp_path, params, stage_inputs / "task.jsonl"),
            "--splits", str(stage_inputs / "split"),
            "--document-scores", str(tmp_path / "documents.parquet"),
            "--task-scores", str(tmp_path / "tasks.parquet")]
    result = _gptpipe(args, tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "evaluate.json").read_text())
    documents = pq.read_table(tmp_path / "documents.parquet").to_pandas()
    for split in ("val", "test"):
        rows = documents[documents.split == split]
        table = pa.concat_tables(pa.Table.from_batches([b]) for b in iter_batches(
            stage_inputs / "split" / split))
        assert len(rows) == table.num_rows == metrics[f"{split}.documents"]
        assert rows.tokens.sum() == metrics[f"{split}.tokens"]
        assert rows.bytes.sum() == pytest.approx(metrics[f"{split}.bytes"], rel=1e-9)
        assert rows.nats.sum() / rows.tokens.sum() == pytest.approx(
            metrics[f"{split}.loss"], abs=2e-6)
        texts = table.column("text").to_pylist()
        assert rows.text_sha256.tolist() == [text_hash(texts[i]) for i in rows.document]
        assert rows.source.tolist() == [table.column("source")[i].as_py()
                                        for i in rows.document]
        for key in ("loss", "ppl", "bpb", "acc"):
            assert 0 < metrics[f"{split}.{key}_se"] < metrics[f"{split}.{key}"]
    tasks = pq.read_table(tmp_path / "tasks.parquet").to_pandas()
    for task, items in (("next_sentence", 30), ("task_file", 10)):
        rows = tasks[tasks.task == task]
        assert len(rows) == items == rows.item_sha256.nunique()
        for rule in ("acc", "acc_norm", "acc_pmi", "bigram_acc"):
            assert rows[rule].mean() == pytest.approx(metrics[f"{task}.{rule}"], abs=1e-6)
        for rule in ("acc", "acc_norm", "acc_pmi"):
            assert (metrics[f"{task}.{rule}_lo"] <= metrics[f"{task}.{rule}"]
                    <= metrics[f"{task}.{rule}_hi"])
    assert "+- " in result.stdout  # the bits per byte are printed with their interval


def test_no_task_writes_an_empty_item_table(stage_inputs, tmp_path):
    import pyarrow.parquet as pq

    params = _write_params(tmp_path / "params.yaml", task="none")
    args = [*_evaluate_args(stage_inputs, tmp_path, params, tmp_path / "not-read.jsonl"),
            "--task-scores", str(tmp_path / "tasks.parquet")]
    assert _gptpipe(args, tmp_path).returncode == 0
    table = pq.read_table(tmp_path / "tasks.parquet")
    assert table.num_rows == 0 and "item_sha256" in table.column_names
