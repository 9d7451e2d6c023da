"""dvclive logs: what gptpipe rewrites in them is written atomically."""

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


def test_the_summary_is_dvclives_layout_then_rebuilt_sorted_at_the_end(tmp_path):
    live = start_live(tmp_path / "live", resumed_from=None)
    live.log_metric("train/loss", 2.5)
    live.log_metric("lr", 0.1)
    live.next_step()
    summary = tmp_path / "live" / "metrics.json"
    # Written at each step as dvclive writes it (its order, indent 4)...
    assert summary.read_text() == json.dumps(
        {"train": {"loss": 2.5}, "lr": 0.1, "step": 0}, indent=4) + "\n"
    assert not [p for p in summary.parent.iterdir() if ".tmp-" in p.name]
    finish_live(live)
    # ...and rebuilt from the plot files at the end, sorted.
    assert json.loads(summary.read_text()) == {"lr": 0.1, "step": 0, "train": {"loss": 2.5}}
    assert list(json.loads(summary.read_text())) == ["lr", "step", "train"]
