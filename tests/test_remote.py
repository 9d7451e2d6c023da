"""Sharing runs through a DVC remote, and going back to an older commit's results.

A local directory stands in for S3 and friends: `dvc push` after a run; in a fresh
`git clone`, `dvc pull` restores every output, and `dvc repro` then runs nothing. And
`git checkout` of an older commit + `dvc checkout` restores that commit's model and
metrics exactly.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from conftest import make_dvc_repo, run_cmd
from test_pipeline_dvc import TINY

pytestmark = pytest.mark.slow

MODEL = "models/pretrain/best/model.safetensors"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_then_pull_in_a_fresh_clone_restores_everything(tmp_path, tiny_corpus):
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    tiny_corpus.rename(repo / "corpus")
    run_cmd(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo)
    run_cmd(["dvc", "repro"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", "run"], repo)
    run_cmd(["dvc", "push"], repo)

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / MODEL).exists()
    run_cmd(["dvc", "pull"], clone)
    for path in (MODEL, "models/rlhf/best/model.safetensors", "models/reward/gptpipe.json",
                 "data/tokens/meta.json", "evaluation/samples.json"):
        assert _digest(clone / path) == _digest(repo / path), path
    output = run_cmd(["dvc", "repro"], clone).stdout
    assert re.findall(r"Running stage '([^']+)'", output) == []
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status"], clone).stdout


def test_checkout_of_an_older_commit_restores_its_model_and_metrics(tmp_path, tiny_corpus):
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    tiny_corpus.rename(repo / "corpus")
    run_cmd(["dvc", "repro"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", "first"], repo)
    first_model = _digest(repo / MODEL)
    first_metrics = (repo / "metrics/evaluate.json").read_text()

    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.003", "lr: 0.001"))
    run_cmd(["dvc", "repro"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", "second"], repo)
    assert _digest(repo / MODEL) != first_model

    run_cmd(["git", "checkout", "-q", "HEAD~1"], repo)
    run_cmd(["dvc", "checkout"], repo)
    assert _digest(repo / MODEL) == first_model
    assert (repo / "metrics/evaluate.json").read_text() == first_metrics
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status"], repo).stdout
