"""The "Comparing runs" walk-through of docs/comparing.md, done for real in a throwaway
git + DVC repo.

Run the pipeline and commit it; try another learning rate with `dvc exp run -S`; see it
in `dvc exp show`; apply and commit it; then compare the two commits with `dvc metrics
diff`, `dvc params diff` and `dvc plots diff` (an HTML page with both loss curves).
"""

from __future__ import annotations

import json

import pytest
from conftest import make_dvc_repo, run_cmd
from test_pipeline_dvc import TINY

pytestmark = pytest.mark.slow


def _git_commit(repo, message: str) -> None:
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", message], repo)


def test_experiment_then_compare_two_commits(tmp_path, tiny_corpus):
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    tiny_corpus.rename(repo / "corpus")
    run_cmd(["dvc", "repro"], repo)
    _git_commit(repo, "baseline run")

    # An experiment with another learning rate: only pretrain and evaluate re-run.
    output = run_cmd(["dvc", "exp", "run", "-S", "train.lr=0.01"], repo).stdout
    assert "Running stage 'pretrain'" in output and "Running stage 'ingest'" not in output
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    assert len(experiments) == 1
    (run,) = experiments[0]["revs"]
    assert run["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.01
    exp_metrics = run["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert exp_metrics["val.bpb"] > 0

    # Keep it: apply the experiment to the workspace and commit it as the second run.
    run_cmd(["dvc", "exp", "apply", run["name"]], repo)
    _git_commit(repo, "learning rate 0.01")

    params = json.loads(run_cmd(["dvc", "params", "diff", "HEAD~1", "HEAD", "--json"],
                                repo).stdout)
    lr = params["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"]) == (0.003, 0.01)
    assert list(params["params.yaml"]) == ["train.lr"]  # nothing else differs

    metrics = json.loads(run_cmd(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"],
                                 repo).stdout)
    evaluated = metrics["metrics/evaluate.json"]
    assert evaluated["val.bpb"]["new"] == exp_metrics["val.bpb"]
    assert evaluated["val.bpb"]["old"] != evaluated["val.bpb"]["new"]
    assert "diff" in evaluated["test.ppl"]
    # Same corpus, split and tokenizer: the runs are comparable on perplexity too.
    assert "fingerprint.tokenizer" not in evaluated

    # Both loss curves on one HTML page.
    run_cmd(["dvc", "plots", "diff", "HEAD~1", "HEAD", "-o", "compare"], repo)
    page = (repo / "compare" / "index.html").read_text()
    assert "Pretraining: train and val cross-entropy" in page
    assert "HEAD~1" in page and "HEAD" in page
    assert page.count("train/loss.tsv") >= 1 and "val/loss.tsv" in page
