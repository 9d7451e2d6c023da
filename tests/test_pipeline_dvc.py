"""End to end: real `dvc repro` of the data stages in a throwaway git repository."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from conftest import make_dvc_repo, run_cmd

pytestmark = pytest.mark.slow

DATA_STAGES = ["ingest", "clean", "split", "vocab", "tokenize"]
TINY = {
    "data.corpus": "corpus",
    "clean.min_chars": 20,
    "clean.workers": 1,
    "vocab.vocab_size": 400,
    "tokenize.shard_tokens": 2000,
}


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _repro(repo) -> list[str]:
    return _ran(run_cmd(["dvc", "repro", *DATA_STAGES_TARGETS], repo).stdout)


# Later issues add training stages; this test covers the data half of the pipeline.
DATA_STAGES_TARGETS = ["tokenize"]


def test_dvc_repro_builds_shards_then_reruns_only_what_changed(tmp_path, tiny_corpus):
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    tiny_corpus.rename(repo / "corpus")

    assert _repro(repo) == DATA_STAGES

    # The shards decode back to the corpus: every document ends in <eos> (id 3).
    meta = json.loads((repo / "data/tokens/meta.json").read_text())
    total_docs = 0
    for split in ("train", "val", "test"):
        shards = sorted((repo / "data/tokens" / split).glob("shard-*.parquet"))
        assert shards, f"no shards for {split}"
        ids = [i for s in shards for i in pq.read_table(s).column("ids").to_pylist()]
        assert all(len(pq.read_table(s)) <= TINY["tokenize.shard_tokens"] for s in shards)
        assert len(ids) == meta["splits"][split]["tokens"]
        assert ids[-1] == meta["eos_id"] == 3
        assert ids.count(3) == meta["splits"][split]["documents"]
        total_docs += meta["splits"][split]["documents"]
    assert total_docs == 240
    lock_before = (repo / "dvc.lock").read_text()

    # Nothing changed: nothing runs, and dvc.lock is untouched.
    assert _repro(repo) == []
    assert (repo / "dvc.lock").read_text() == lock_before

    # Only the vocabulary size changed: only vocab and tokenize run again.
    params = (repo / "params.yaml").read_text().replace("vocab_size: 400", "vocab_size: 450")
    (repo / "params.yaml").write_text(params)
    assert _repro(repo) == ["vocab", "tokenize"]

    # Editing the corpus re-runs the pipeline from ingest.
    (repo / "corpus" / "doc0000.txt").write_text("A brand new first document about rivers.\n")
    assert _repro(repo)[0] == "ingest"
