"""Two `dvc repro` runs from scratch, in two repositories, give the same outputs bit for bit.

Only the files listed in NOT_BIT_IDENTICAL may differ: they hold wall times and tokens/s,
and no stage reads them. docs/reproducibility.md lists the same files.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import make_dvc_repo, run_cmd
from test_pipeline_dvc import TINY

pytestmark = pytest.mark.slow

NOT_BIT_IDENTICAL = {
    "metrics/pretrain_speed.json",  # wall time, tokens/s, GFLOP/s
    "dvclive/pretrain/metrics.json",  # dvclive's summary holds the last tokens/s
    "dvclive/pretrain/plots/metrics",  # ... and its tokens_per_second.tsv
}


def _outputs(repo) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def test_two_runs_from_scratch_give_identical_outputs(tmp_path, tiny_corpus):
    repos = []
    for name in ("first", "second"):
        repo = make_dvc_repo(tmp_path / name, TINY)
        corpus = repo / "corpus"
        corpus.mkdir()
        for doc in sorted(tiny_corpus.iterdir()):
            (corpus / doc.name).write_bytes(doc.read_bytes())
        run_cmd(["dvc", "repro"], repo)
        repos.append(repo)
    first, second = (_outputs(repo) for repo in repos)
    assert first.keys() == second.keys()
    assert first.keys() >= NOT_BIT_IDENTICAL
    compared = sorted(set(first) - NOT_BIT_IDENTICAL)
    # Every model, token shard, metric and sample file of every stage is among them.
    for path in ("data/tokens", "models/pretrain", "models/reward", "models/rlhf",
                 "metrics/evaluate.json", "metrics/rlhf.json", "evaluation/samples.json",
                 "data/preferences"):
        assert path in compared
    differing = [path for path in compared if first[path] != second[path]]
    assert not differing, f"outputs differ between two identical runs: {differing}"
