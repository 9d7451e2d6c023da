"""The "Comparing runs" walk-through of docs/comparing.md, done for real in a throwaway
git + DVC repo.

Run the pipeline and commit it; try another learning rate with `dvc exp run -S`; see it
in `dvc exp show`; apply and commit it; then compare the two commits with `dvc metrics
diff`, `dvc params diff` and `dvc plots diff` (an HTML page with both loss curves).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_dvc_repo, run_cmd
from test_pipeline_dvc import TINY

pytestmark = pytest.mark.slow


def _git_commit(repo, message: str) -> None:
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-q", "-m", message], repo)


@pytest.mark.timeout(900)  # whole tiny pipelines, several minutes on a busy machine
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


# ------------------------------------------------------------------- gptpipe compare

# Test documents enough to pair (at least 30 on each side): a fifth of 240 for each of
# val and test.
SPLIT = {"split.train": 0.6, "split.val": 0.2, "split.test": 0.2}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A tiny pipeline run and committed: the code alone first, then the run."""
    from conftest import synthetic_documents

    repo = make_dvc_repo(tmp_path_factory.mktemp("compare") / "repo", {**TINY, **SPLIT})
    (repo / "corpus").mkdir()
    for index, text in enumerate(synthetic_documents(240)):
        (repo / "corpus" / f"doc{index:04d}.txt").write_text(text + "\n", encoding="utf-8")
    _git_commit(repo, "the code, no run yet")
    run_cmd(["dvc", "repro"], repo)
    _git_commit(repo, "baseline run")
    return repo


def _experiments(repo) -> dict[str, dict]:
    """name -> params of every experiment `dvc exp show` lists."""
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo).stdout)
    return {run["name"]: run["data"]["params"]["params.yaml"]["data"]
            for rev in shown for exp in (rev.get("experiments") or []) for run in exp["revs"]}


def _rows(output: str) -> dict[str, str]:
    """metric -> its line of the compare table."""
    return {line.split()[0]: line for line in output.splitlines()
            if line.startswith(("evaluate", "reward.", "sft.", "rlhf."))}


@pytest.mark.timeout(900)  # whole tiny pipelines, several minutes on a busy machine
def test_compare_a_run_with_itself_and_with_an_experiment(baseline):
    repo = baseline
    rows = _rows(run_cmd(["gptpipe", "compare", "HEAD", "HEAD"], repo).stdout)
    # A run against itself: nothing differs, and the paired intervals have no width.
    for line in rows.values():
        assert "+0.0000" in line and "within noise" in line
    assert "[+0.0000, +0.0000]" in rows["evaluate.test.bpb"]
    assert "paired, " in rows["evaluate.test.bpb"]
    assert "paired" in rows["rlhf.win_rate"] and "paired" in rows["evaluate.next_sentence.acc"]

    # Ten times the training: bits per byte drop far beyond the noise of the test split.
    run_cmd(["dvc", "exp", "run", "-S", "train.steps=60"], repo)
    (name,) = [n for n, params in _experiments(repo).items()
               if params["train"]["steps"] == 60]
    markdown = repo.parent / "report.md"
    result = run_cmd(["gptpipe", "compare", "HEAD", name, "--md", str(markdown),
                      "--fail-on", "evaluate.test.bpb"], repo)
    rows = _rows(result.stdout)
    assert " better " in rows["evaluate.test.bpb"] and "paired" in rows["evaluate.test.bpb"]
    report = markdown.read_text()
    assert f"-> {name}" in report and "| evaluate.test.bpb |" in report
    assert "![pretrain-loss](report-pretrain-loss.png)" in report
    picture = repo.parent / "report-pretrain-loss.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The other way round the figure got worse: --fail-on fails, for CI.
    worse = run_cmd(["gptpipe", "compare", name, "HEAD", "--fail-on", "evaluate.test.bpb"],
                    repo, check=False)
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "evaluate.test.bpb got significantly worse" in worse.stderr
    # The workspace (where `dvc exp run` left the experiment) is the default new side.
    output = run_cmd(["gptpipe", "compare"], repo).stdout
    assert output.startswith("compare: HEAD (") and " better " in _rows(output)[
        "evaluate.test.bpb"]
    run_cmd(["git", "reset", "-q", "--hard"], repo)  # back to the baseline
    run_cmd(["dvc", "checkout", "-q", "--force"], repo)


@pytest.mark.timeout(900)  # whole tiny pipelines, several minutes on a busy machine
def test_compare_refuses_what_it_cannot_read_in_one_line(baseline):
    repo = baseline
    for args, message in (
            (["nosuch-rev"], "nosuch-rev: no commit, branch, tag or experiment"),
            (["HEAD~1", "HEAD"], "HEAD~1 ("),  # the commit before any run: no metrics
            (["--fail-on", "test.bpb"], "no such headline metric"),
            (["a", "b", "c"], "at most 2")):
        result = run_cmd(["gptpipe", "compare", *args, "--md", "bad.md"], repo, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr
        assert not (repo / "bad.md").exists()


@pytest.mark.timeout(900)  # whole tiny pipelines, several minutes on a busy machine
def test_replicates_queued_as_dvc_experiments(baseline):
    """The recipe: queue one experiment per seed, run the queue, aggregate the seeds."""
    import time

    repo = baseline
    for seed in (1, 2):
        run_cmd(["dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}"], repo)
    run_cmd(["dvc", "queue", "start"], repo)
    deadline = time.monotonic() + 1800
    while re.search(r"\b(Queued|Running)\b", run_cmd(["dvc", "queue", "status"], repo).stdout):
        assert time.monotonic() < deadline, "the queue did not finish"
        time.sleep(3)
    assert "Failed" not in run_cmd(["dvc", "queue", "status"], repo).stdout
    seeds = [n for n, params in _experiments(repo).items() if params["train"]["seed"] in (1, 2)]
    assert len(seeds) == 2
    result = run_cmd(["gptpipe", "compare", "--replicates", *seeds], repo)
    assert result.stdout.startswith("compare: 2 replicates: ")
    header, *lines = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert header.split()[:3] == ["metric", "runs", "mean"]
    row = next(line.split() for line in lines if line.startswith("evaluate.val.bpb "))
    assert row[1] == "2" and float(row[3]) >= 0 and float(row[4]) > 0
