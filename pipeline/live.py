"""dvclive logs for the training stages (pretrain, rlhf), resumable and reproducible.

A resumed run must leave the same files as an uninterrupted one: rows logged after the
snapshot being resumed are dropped (a step must not appear twice), and the summary
(``metrics.json``) is rewritten with sorted keys at the end, because dvclive orders its
keys by first use, which a resume changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.io import write_json


def start_live(live_dir: Path, resumed_from: int | None) -> Any:
    """A dvclive ``Live`` on ``live_dir``: emptied for a fresh run, trimmed for a resume."""
    from scmrepo.exceptions import SCMError

    from dvclive import Live

    class _Live(Live):
        def _init_dvc(self) -> None:
            # dvclive reads the git revision to name experiments; a repository with no
            # commit yet has none, and gptpipe logs plots only, so carry on without it.
            try:
                super()._init_dvc()
            except SCMError:
                self._dvc_repo = None
                self._dvc_file = "dvc.yaml"

    if resumed_from is None:
        shutil.rmtree(live_dir, ignore_errors=True)
    else:
        truncate_live(live_dir, resumed_from)
    # dvcyaml=None: dvc.yaml declares the plots itself; dvclive must not rewrite it.
    return _Live(str(live_dir), resume=resumed_from is not None, dvcyaml=None,
                 save_dvc_exp=False, report=None)


def truncate_live(live_dir: Path, step: int) -> None:
    """Drop the rows logged after ``step``, so no step appears twice after a resume.

    A row a kill cut short cannot be trusted either (wrong number of cells): it goes too.
    """
    for tsv in (Path(live_dir) / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        columns = header.split("\t")
        column = columns.index("step")
        kept = []
        for row in rows:
            cells = row.split("\t")
            if len(cells) == len(columns) and cells[column].isdigit() \
                    and int(cells[column]) <= step:
                kept.append(row)
        tsv.write_text("\n".join([header, *kept]) + "\n")


def finish_live(live: Any) -> None:
    """End the log and rewrite its summary in a fixed key order (see the module doc)."""
    live.end()
    summary = Path(live.metrics_file)
    if summary.is_file():
        write_json(summary, json.loads(summary.read_text(encoding="utf-8")))
