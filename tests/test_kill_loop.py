"""bench/kill_loop.py in its smallest mode, as a user runs it: it must still recover a
killed pretraining, a NaN injected mid-run and a rank killed in a two-process run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_the_kill_loop_recovers_a_kill_a_nan_and_a_dead_rank(tmp_path):
    report = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench/kill_loop.py"), "--smallest", "--seed", "3",
         "--work-dir", str(tmp_path), "--out", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split(" | ") for line in report.read_text().splitlines()
            if line.startswith("| pretrain")]
    assert [row[0] for row in rows] == ["| pretrain", "| pretrain, NaN injected",
                                        "| pretrain, 2 processes, rank 1 killed"]
    for row in rows:
        assert row[3] == "yes", row  # recovered
        assert row[4].startswith("yes, "), row  # resumed from a snapshot
    assert "NaN gradient at step" in rows[1][1]
    assert "rank 1 killed after the snapshot of step" in rows[2][1]
