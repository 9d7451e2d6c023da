"""End to end: real `dvc repro` of the whole pipeline in a throwaway git repository."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, REPO_ROOT, make_dvc_repo, run_cmd

pytestmark = pytest.mark.slow

DATA_STAGES = ["ingest", "clean", "split", "vocab", "tokenize"]
# After pretrain, DVC may run independent stages in either order: compared as sets.
AFTER_PRETRAIN = {"pretrain", "evaluate", "export", "preferences", "reward", "sft", "rlhf",
                  "evaluate_rlhf", "export_rlhf"}
# Tiny params for fast end-to-end runs: one file, read by tests and bench.
TINY = yaml.safe_load((REPO_ROOT / "tests" / "tiny_params.yaml").read_text(encoding="utf-8"))


def _repro(repo) -> list[str]:
    output = run_cmd(["dvc", "repro"], repo).stdout
    return re.findall(r"Running stage '([^']+)'", output)


def _set_param(repo, old: str, new: str) -> None:
    params = repo / "params.yaml"
    text = params.read_text()
    assert old in text
    params.write_text(text.replace(old, new))


def test_dvc_repro_builds_everything_then_reruns_only_what_changed(tmp_path, tiny_corpus):
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    tiny_corpus.rename(repo / "corpus")

    ran = _repro(repo)
    # contamination reads only the split: DVC may run it anywhere after split.
    assert ran.index("contamination") > ran.index("split")
    ran.remove("contamination")
    assert ran[:5] == DATA_STAGES and ran[5] == "pretrain" and set(ran[5:]) == AFTER_PRETRAIN

    # The shards hold every document, each ended by <eos> (id 3), within the shard bound.
    meta = json.loads((repo / "data/tokens/meta.json").read_text())
    total_docs = 0
    for split in ("train", "val", "test"):
        shards = sorted((repo / "data/tokens" / split).glob("shard-*.parquet"))
        assert shards, f"no shards for {split}"
        ids = [i for s in shards for i in pq.read_table(s).column("ids").to_pylist()]
        assert all(len(pq.read_table(s)) <= TINY["tokenize.shard_tokens"] for s in shards)
        assert len(ids) == meta["splits"][split]["tokens"]
        assert ids[-1] == meta["eos_id"] == 3
        assert ids[0] == 2  # <bos>
        assert ids.count(3) == ids.count(2) == meta["splits"][split]["documents"]
        total_docs += meta["splits"][split]["documents"]
    assert total_docs == 240
    assert (repo / "models/pretrain/best/model.safetensors").is_file()
    assert json.loads((repo / "metrics/pretrain.json").read_text())["steps"] == 6
    lock = (repo / "dvc.lock").read_text()
    assert "models/pretrain" in lock and "checkpoints/pretrain" in lock

    # The summary `make pipeline` prints: headline metrics, where things are, how to sample.
    summary = run_cmd([str(BIN / "python"), "-m", "pipeline.report"], repo).stdout
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert f"metrics/pretrain.json: val_bpb {pretrain['val_bpb']}" in summary
    assert "metrics/rlhf.json: algo ppo" in summary and "dvc plots show" in summary
    assert "models/pretrain/best" in summary and "models/rlhf/best" in summary
    assert 'gptpipe generate --model models/pretrain/best "The river"' in summary

    # Nothing changed: nothing runs, and dvc.lock is untouched.
    assert _repro(repo) == []
    assert (repo / "dvc.lock").read_text() == lock

    # Only the vocabulary size changed: vocab, tokenize and what depends on them.
    _set_param(repo, "vocab_size: 400", "vocab_size: 450")
    ran = _repro(repo)
    assert ran[:2] == ["vocab", "tokenize"] and set(ran[2:]) == AFTER_PRETRAIN

    # Only a training param changed: only pretrain runs.
    _set_param(repo, "lr: 0.003", "lr: 0.002")
    assert set(_repro(repo)) == AFTER_PRETRAIN

    # Only a sampling param changed: only evaluate runs.
    _set_param(repo, "max_new_tokens: 8", "max_new_tokens: 9")
    assert _repro(repo) == ["evaluate", "evaluate_rlhf"]

    # Only an RLHF param changed: rlhf runs, and the evaluation and export of its policy
    # only if the best policy's bytes changed (in a 2-step run the starting policy may stay
    # the best).
    _set_param(repo, "kl_coef: 0.05", "kl_coef: 0.1")
    ran = _repro(repo)
    assert ran[0] == "rlhf" and set(ran) <= {"rlhf", "evaluate_rlhf", "export_rlhf"}

    # Only the export dtype changed: only the two exports run.
    _set_param(repo, "dtype: float32", "dtype: bfloat16")
    assert set(_repro(repo)) == {"export", "export_rlhf"}

    # Editing the corpus re-runs the pipeline from ingest.
    (repo / "corpus" / "doc0000.txt").write_text("A brand new first document about rivers.\n")
    assert _repro(repo)[0] == "ingest"

    # Pointing data.corpus elsewhere re-runs it too.
    (repo / "corpus").rename(repo / "corpus2")
    _set_param(repo, "corpus: corpus", "corpus: corpus2")
    assert _repro(repo)[0] == "ingest"


def _builtin_extracts(count: int) -> list[str]:
    """The first ``count`` builtin English Wikipedia extracts (by title): real prose."""
    from pipeline.data.corpus import builtin_records

    articles = builtin_records(REPO_ROOT / "data/builtin/wikipedia-en.corpus")
    return [articles[title]["extract"] for title in sorted(articles)[:count]]


def test_one_big_text_file_goes_through_tokenize_with_every_default(tmp_path):
    """The shape of WikiText and of most exported corpora: one file, blank-line paragraphs.
    Every param at its default but data.corpus: txt_unit auto reads it in paragraphs."""
    repo = make_dvc_repo(tmp_path / "repo", {"data.corpus": "corpus.txt"})
    paragraphs = [p for text in _builtin_extracts(1200) for p in text.split("\n") if p.strip()]
    (repo / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    run_cmd(["dvc", "repro", "tokenize"], repo)
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["text_files_in_paragraphs"] == 1 and ingest["text_files_whole"] == 0
    assert ingest["documents"] == len(paragraphs)
    split = json.loads((repo / "metrics/split.json").read_text())
    assert min(split[name]["documents"] for name in ("train", "val", "test")) > 50
    assert json.loads((repo / "metrics/tokenize.json").read_text())["train"]["tokens"] > 0


def test_a_folder_of_three_long_text_files_goes_through_split_with_every_default(tmp_path):
    """Three manuals or books, each far longer than a document but under 1 MiB: read whole
    they are three documents, too few for three splits; txt_unit auto reads a corpus of so
    few files in paragraphs, and ingest says so."""
    repo = make_dvc_repo(tmp_path / "repo", {"data.corpus": "books"})
    paragraphs = [p for text in _builtin_extracts(900) for p in text.split("\n") if p.strip()]
    (repo / "books").mkdir()
    for index in range(3):
        book = paragraphs[index::3]
        (repo / "books" / f"book{index}.txt").write_text("\n\n".join(book) + "\n",
                                                         encoding="utf-8")
        assert 100_000 < (repo / "books" / f"book{index}.txt").stat().st_size < 2**20
    output = run_cmd(["dvc", "repro", "split"], repo).stdout
    assert "plain-text files read 3 in blank-line paragraphs (data.txt_unit: auto: a corpus " \
           "of fewer than 50 text files is read in paragraphs" in output
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["text_files_in_paragraphs"] == 3 and ingest["text_files_whole"] == 0
    assert ingest["documents"] == len(paragraphs)
    split = json.loads((repo / "metrics/split.json").read_text())
    assert min(split[name]["documents"] for name in ("train", "val", "test")) > 50


def test_a_folder_of_source_code_is_read_whole_with_its_layout(tmp_path):
    """A code base: data.include picks the .py files (other files are left out), each file
    is one document, and clean keeps its indentation and blank lines as written."""
    repo = make_dvc_repo(tmp_path / "repo", {"data.corpus": "code", "data.include": "**/*.py",
                                             "vocab.vocab_size": 2048})
    sources = sorted((REPO_ROOT / "pipeline").rglob("*.py"))
    for path in sources:
        target = repo / "code" / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (repo / "code" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (repo / "code" / "NOTES").write_text("Not a .py file: data.include leaves it out.\n")
    run_cmd(["dvc", "repro", "tokenize"], repo)
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["files_read"] == ingest["text_files_whole"] == len(sources)
    clean = {row["source"]: row["text"]
             for row in pq.read_table(repo / "data/clean").to_pylist()}
    text = (REPO_ROOT / "pipeline/core/runs.py").read_text()
    assert clean["pipeline/core/runs.py"] == text.strip("\n")  # indentation and all
