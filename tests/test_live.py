"""The training logs in dvclive's layout: the files it writes, and what it rewrites
written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

from pipeline.core.live import finish_live, start_live, truncate_live

# Trim a log to step 50 in a process that may write at most argv[2] bytes to any file
# (RLIMIT_FSIZE: a full disk or a quota, for real): the write fails part of the way.
_TRIM_WITH_LITTLE_ROOM = """
import resource, sys
from pathlib import Path
from pipeline.core.live import truncate_live

limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
truncate_live(Path(sys.argv[1]), 50)
"""


def _plot(live: Path, steps: range) -> Path:
    tsv = live / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n" + "".join(f"{s}\t{1 / (s + 1):.6f}\n" for s in steps))
    return tsv


def test_trimming_a_plot_file_keeps_it_whole_when_the_write_fails(tmp_path):
    tsv = _plot(tmp_path, range(100))
    before = tsv.read_bytes()
    result = subprocess.run([sys.executable, "-c", _TRIM_WITH_LITTLE_ROOM, str(tmp_path),
                             "100"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert tsv.read_bytes() == before  # not cut to the 100 bytes that fitted
    assert sorted(p.name for p in tsv.parent.iterdir()) == ["loss.tsv"]
    # With room, the same trim keeps the rows up to step 50.
    truncate_live(tmp_path, 50)
    assert tsv.read_text().splitlines()[-1].startswith("50\t")
    assert len(tsv.read_text().splitlines()) == 1 + 51


def test_the_log_is_dvclives_layout_and_its_summary_is_rebuilt_sorted(tmp_path):
    live = start_live(tmp_path / "live", resumed_from=None)
    for step in (1, 2):
        live.step = step
        live.log_metric("train/loss", 2.5 / step)
        live.log_metric("lr", 0.1)
    plots = tmp_path / "live" / "plots" / "metrics"
    # dvclive's rows: a header naming the step and the metric, then one row per step.
    assert (plots / "train" / "loss.tsv").read_text() == "step\tloss\n1\t2.5\n2\t1.25\n"
    assert (plots / "lr.tsv").read_text() == "step\tlr\n1\t0.1\n2\t0.1\n"
    finish_live(live)
    summary = tmp_path / "live" / "metrics.json"
    assert json.loads(summary.read_text()) == {"lr": 0.1, "step": 2, "train": {"loss": 1.25}}
    assert list(json.loads(summary.read_text())) == ["lr", "step", "train"]
    assert not [p for p in summary.parent.iterdir() if ".tmp-" in p.name]


def test_a_fresh_log_deletes_only_what_a_log_wrote_and_a_resume_keeps_its_rows(tmp_path):
    live_dir = tmp_path / "live"
    live = start_live(live_dir, resumed_from=None)
    for step in (1, 2, 3):
        live.step = step
        live.log_metric("val/loss", float(step))
    finish_live(live)
    (live_dir / "notes.txt").write_text("mine")
    # A resume from step 2 drops step 3's row and appends after step 2.
    live = start_live(live_dir, resumed_from=2)
    live.step = 3
    live.log_metric("val/loss", 30.0)
    finish_live(live)
    assert (live_dir / "plots/metrics/val/loss.tsv").read_text() == (
        "step\tloss\n1\t1.0\n2\t2.0\n3\t30.0\n")
    # A fresh run empties the log, and leaves the user's file.
    start_live(live_dir, resumed_from=None)
    assert not (live_dir / "plots").exists() and not (live_dir / "metrics.json").exists()
    assert (live_dir / "notes.txt").read_text() == "mine"
