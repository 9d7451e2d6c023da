"""Several sources: each document's source through the stages, val and test figures per
source, weights that up- or down-sample a source in pretraining, and a corpus of one
source (or unweighted sources) trained exactly as before."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import BIN, make_dvc_repo, run_cmd, synthetic_documents
from test_pipeline_dvc import TINY

from pipeline.core.errors import GptpipeError
from pipeline.core.params import parse_params
from pipeline.data.sources import (
    SourceSpans,
    SpanRecorder,
    check_weight_names,
    read_spans,
    source_name,
    weighted_starts,
)
from pipeline.lm.unit_scores import source_figures


@pytest.mark.parametrize(("source", "name"), [
    ("notes/a.txt", "notes"),
    ("notes/deeper/a.txt:3", "notes"),
    ("code/b.jsonl#7", "code"),
    ("book.txt:12", "book.txt"),
    ("rows.parquet#0", "rows.parquet"),
    ("a#b.txt", "a#b.txt"),
    ("日本語/文書.txt", "日本語"),
])
def test_a_documents_source_is_its_paths_first_segment(source, name):
    assert source_name(source) == name


def test_spans_merge_consecutive_documents_of_one_source_and_count_them(tmp_path):
    recorder = SpanRecorder()
    recorder.add(["a/1.txt", "a/2.txt", "b/1.txt"], np.array([5, 3, 4]), 0)
    recorder.add(["b/2.txt", "a/3.txt"], np.array([2, 6]), 12)
    assert list(zip(recorder.names, recorder.starts, recorder.ends, strict=True)) == [
        ("a", 0, 8), ("b", 8, 14), ("a", 14, 20)]
    assert recorder.counts() == {"a": {"documents": 3, "tokens": 14},
                                 "b": {"documents": 2, "tokens": 6}}
    recorder.write(tmp_path)
    spans = read_spans(tmp_path)
    assert spans.names == ["a", "b", "a"] and spans.tokens() == {"a": 14, "b": 6}
    assert read_spans(tmp_path / "nothing") is None


def _spans() -> SourceSpans:
    # a: [0, 100) and [150, 250); b: [100, 150) and [250, 400): 200 tokens each.
    return SourceSpans(["a", "b", "a", "b"], np.array([0, 100, 150, 250]),
                       np.array([100, 150, 250, 400]))


def test_equal_weights_keep_plain_uniform_sampling():
    assert weighted_starts(_spans(), {}, high=368) is None
    assert weighted_starts(_spans(), {"a": 2.0, "b": 2.0}, high=368) is None


def test_a_weight_of_zero_never_draws_that_source():
    plan = weighted_starts(_spans(), {"b": 0.0}, high=368)
    starts = plan.draw(2000, torch.Generator().manual_seed(0))
    inside_a = ((starts >= 0) & (starts < 100)) | ((starts >= 150) & (starts < 250))
    assert inside_a.all()
    assert set(np.unique(starts // 50).tolist()) == {0, 1, 3, 4}  # every run of a is drawn


def test_weights_set_each_sources_share_and_the_draws_follow_it():
    spans = _spans()
    high = 368  # the last start a window of 32 fits: b's last run offers 118 starts
    plan = weighted_starts(spans, {"a": 3.0}, high)
    # a offers 200 starts, b 50 + 118 = 168: shares in proportion to 3 x 200 and 168.
    assert plan.shares.tolist() == pytest.approx([600 / 768, 168 / 768])
    count = 20000
    starts = plan.draw(count, torch.Generator().manual_seed(1))
    assert starts.min() >= 0 and starts.max() < high
    in_b = ((starts >= 100) & (starts < 150)) | (starts >= 250)
    share_b, expected = in_b.mean(), 168 / 768
    assert abs(share_b - expected) < 4 * math.sqrt(expected * (1 - expected) / count)
    # Within b, starts are uniform over its starts: its two runs in proportion 50 : 118.
    first_run = ((starts >= 100) & (starts < 150)).sum() / in_b.sum()
    assert abs(first_run - 50 / 168) < 0.03
    again = plan.draw(count, torch.Generator().manual_seed(1))
    assert np.array_equal(starts, again)  # deterministic for a seed


def test_weights_that_name_no_source_or_weigh_everything_zero_are_one_line():
    with pytest.raises(GptpipeError, match=r"train.source_weights.cod: no source 'cod' in "
                                           r"data/tokens/train; allowed: code, prose"):
        check_weight_names({"cod": 2.0}, ["code", "prose"], "data/tokens/train")
    with pytest.raises(GptpipeError, match="every source weighs 0"):
        check_weight_names({"code": 0, "prose": 0.0}, ["code", "prose"], "corpus")
    check_weight_names({"code": 0}, ["code", "prose"], "corpus")  # prose weighs 1
    with pytest.raises(GptpipeError, match="hold no training window"):
        weighted_starts(SourceSpans(["a", "b"], np.array([0, 90]), np.array([90, 100])),
                        {"a": 0.0}, high=80)


@pytest.mark.parametrize(("raw", "message"), [
    ({"train": {"source_weights": {"a": 2}}},
     "train.source_weights = {'a': 2.0} with data.sources = 'one'; allowed: {}"),
    ({"data": {"sources": "subfolders"}, "train": {"source_weights": {"a": -1}}},
     "train.source_weights.a = -1.0; allowed: a weight >= 0"),
    ({"data": {"sources": "subfolders"}, "train": {"source_weights": {"a": ".nan"}}},
     "train.source_weights.a = '.nan'"),
    ({"data": {"sources": "subfolders"}, "train": {"source_weights": {"a": float("nan")}}},
     "train.source_weights.a = nan; allowed: a finite number"),
    ({"data": {"sources": "subfolders"}, "train": {"source_weights": [1.0]}},
     "train.source_weights = [1.0] (list); allowed: a mapping of str to float"),
    ({"data": {"sources": "folders"}}, "data.sources = 'folders'; allowed: 'one' | 'subfolders'"),
])
def test_bad_source_params_are_one_line(raw, message):
    with pytest.raises(GptpipeError) as caught:
        parse_params(raw)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_per_source_figures_by_hand():
    rows = {"split": ["val", "val", "val", "test"],
            "source": ["a/1.txt", "a/2.txt", "b/1.txt", "a/3.txt"],
            "tokens": [10, 30, 5, 4], "nats": [20.0, 40.0, 15.0, 8.0],
            "bytes": [40.0, 60.0, 20.0, 16.0], "correct": [1, 2, 3, 4]}
    found = source_figures(rows, resamples=200, seed=0)
    assert found["val.sources.a.bpb"] == pytest.approx(60 / 100 / math.log(2))
    assert found["val.sources.a.loss"] == pytest.approx(60 / 40)
    assert found["val.sources.b.bpb"] == pytest.approx(15 / 20 / math.log(2))
    assert found["val.sources.a.documents"] == 2 and found["val.sources.a.tokens"] == 40
    assert found["val.sources.a.bytes"] == 100
    assert found["val.sources.a.bpb_se"] > 0
    # One document has no spread to resample: no standard error is claimed for it.
    assert "val.sources.b.bpb_se" not in found and "test.sources.a.bpb_se" not in found
    assert found["test.sources.a.bpb"] == pytest.approx(8 / 16 / math.log(2))


# ------------------------------------------------------------ through the real pipeline

CODE = "def step_{0}(x):\n    return x * {0} + {1}  # update {0}\n\n\nfor i in range({1}):\n" \
       "    print(step_{0}(i))\n"


def _two_source_repo(tmp_path, overrides: dict) -> object:
    repo = make_dvc_repo(tmp_path / "repo", {**TINY, "data.sources": "subfolders",
                                             **overrides})
    (repo / "corpus" / "prose").mkdir(parents=True)
    (repo / "corpus" / "code").mkdir()
    for index, text in enumerate(synthetic_documents(160, seed=3)):
        (repo / "corpus" / "prose" / f"doc{index:04d}.txt").write_text(text + "\n")
    for index in range(120):
        (repo / "corpus" / "code" / f"mod{index:04d}.py").write_text(
            CODE.format(index, index % 7 + 2) * 2)
    return repo


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_params(repo, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_two_sources_get_their_own_figures_and_weights_move_training(tmp_path):
    repo = _two_source_repo(tmp_path, {})
    run_cmd(["dvc", "repro", "evaluate"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", "two sources, unweighted"], repo)

    # tokenize placed every document's source; the counts add up to the split's.
    tokenized = json.loads((repo / "metrics/tokenize.json").read_text())
    for split in ("train", "val", "test"):
        by_source = tokenized[split]["sources"]
        assert set(by_source) == {"code", "prose"}
        assert sum(s["documents"] for s in by_source.values()) == tokenized[split]["documents"]
        assert sum(s["tokens"] for s in by_source.values()) == tokenized[split]["tokens"]

    # evaluate: per source, what the per-document table gives, and the overall in between.
    result = json.loads((repo / "metrics/evaluate.json").read_text())
    documents = pq.read_table(repo / "evaluation/documents.parquet").to_pandas()
    for split in ("val", "test"):
        rows = documents[documents["split"] == split]
        for name in ("code", "prose"):
            mine = rows[rows["source"].str.startswith(name + "/")]
            key = f"{split}.sources.{name}"
            assert result[f"{key}.documents"] == len(mine)
            assert result[f"{key}.bpb"] == pytest.approx(
                mine["nats"].sum() / mine["bytes"].sum() / math.log(2), abs=2e-6)
            assert result[f"{key}.bpb_se"] > 0
        low, high = sorted(result[f"{split}.sources.{n}.bpb"] for n in ("code", "prose"))
        assert low <= result[f"{split}.bpb"] <= high

    pretrained = json.loads((repo / "metrics/pretrain.json").read_text())
    shares = {name: found["window_share"] for name, found in pretrained["sources"].items()}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5) and min(shares.values()) > 0
    model = repo / "models/pretrain/best/model.safetensors"
    unweighted = _sha(model)

    # One source: the tokens and the model are those of unweighted sources, bit for bit,
    # and no source file or figure is written.
    _set_params(repo, **{"data.sources": "one"})
    run_cmd(["dvc", "repro", "evaluate"], repo)
    assert _sha(model) == unweighted
    assert not (repo / "data/tokens/train/sources.parquet").exists()
    one = json.loads((repo / "metrics/evaluate.json").read_text())
    assert not any(".sources." in key for key in one)
    assert {k: v for k, v in result.items() if ".sources." not in k} == one

    # A weight of 0 on code, set as docs/corpus.md says: pretrain draws no window of it.
    run_cmd(["dvc", "exp", "run", "-S", "data.sources=subfolders",
             "-S", "+train.source_weights.code=0", "evaluate"], repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["source_weights"] == {
        "code": 0}
    weighted = json.loads((repo / "metrics/pretrain.json").read_text())["sources"]
    assert weighted["code"]["window_share"] == 0 and weighted["prose"]["window_share"] == 1
    assert weighted["code"]["weight"] == 0 and weighted["prose"]["weight"] == 1
    assert _sha(model) != unweighted

    # compare pairs each source's documents in both runs, and --fail-on takes them.
    output = run_cmd([str(BIN / "gptpipe"), "compare", "--fail-on",
                      "evaluate.test.sources.code.bpb"], repo, check=False)
    assert output.returncode in (0, 1), output.stderr
    rows = {line.split()[0]: line for line in output.stdout.splitlines()
            if line.startswith("evaluate.")}
    for split in ("val", "test"):
        for name in ("code", "prose"):
            assert "paired" in rows[f"evaluate.{split}.sources.{name}.bpb"]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.source_weights": {"poetry": 2.0}},
     "train.source_weights.poetry: no source 'poetry' in corpus; allowed: code, prose"),
    ({"train.source_weights": {"code": 0, "prose": 0}}, "every source weighs 0"),
    ({"data.corpus": "corpus/prose/doc0000.txt"},
     "data.sources = 'subfolders' with data.corpus = 'corpus/prose/doc0000.txt', not a "
     "folder"),
])
def test_bad_sources_stop_ingest_in_one_line_writing_nothing(tmp_path, overrides, message):
    repo = _two_source_repo(tmp_path, overrides)
    found = run_cmd([str(BIN / "gptpipe"), "ingest", "--params", "params.yaml", "--out",
                     "data/raw", "--metrics", "metrics/ingest.json"], repo, check=False)
    assert found.returncode == 2
    lines = found.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (repo / "data/raw").exists() and not (repo / "metrics/ingest.json").exists()
