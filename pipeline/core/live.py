"""dvclive logs for the training stages (pretrain, rlhf), resumable and reproducible.

A resumed run must leave the same files as an uninterrupted one: rows logged after the
snapshot being resumed are dropped (a step must not appear twice), and the summary
(``metrics.json``) is rebuilt at the end from the last row of every plot file, with
sorted keys. dvclive's own summary holds only what this process logged, in the order it
was first logged, so a resumed run (or one that found its run finished and logged
nothing) would get another summary.

Files that are rewritten (the trimmed plot files, the summary) are written atomically, so
a kill never cuts a log that a resume needs; dvclive itself only appends rows, and a row
a kill cut short is dropped on resume.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json, write_json, write_text


def start_live(live_dir: Path, resumed_from: int | None) -> Any:
    """A dvclive ``Live`` on ``live_dir``: emptied for a fresh run, trimmed for a resume."""
    from dvclive.plots import NumpyEncoder
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

        def make_summary(self) -> None:
            # dvclive rewrites the summary in place at every step; the same bytes, atomically.
            if self._step is not None:
                self.summary["step"] = self.step
            write_text(self.metrics_file,
                       json.dumps(self.summary, indent=4, cls=NumpyEncoder) + "\n")

    if resumed_from is None:
        clear_live(live_dir)
    else:
        truncate_live(live_dir, resumed_from)
        summary = Path(live_dir) / "metrics.json"
        try:  # dvclive reads it on resume; a kill may have cut it (rebuilt at the end)
            read_json(summary)
        except (OSError, GptpipeError):
            summary.unlink(missing_ok=True)
    # dvcyaml=None: dvc.yaml declares the plots itself; dvclive must not rewrite it.
    return _Live(str(live_dir), resume=resumed_from is not None, dvcyaml=None,
                 save_dvc_exp=False, report=None)


def clear_live(live_dir: Path) -> None:
    """Delete what dvclive writes in ``live_dir`` (its summary and the plot files under
    plots/metrics), and nothing else: the folder may hold a user's files."""
    live_dir = Path(live_dir)
    (live_dir / "metrics.json").unlink(missing_ok=True)
    plots = live_dir / "plots" / "metrics"
    for tsv in sorted(plots.rglob("*.tsv"), reverse=True):
        tsv.unlink()
    # Then the folders that held them, deepest first, while empty.
    for folder in sorted((d for d in plots.rglob("*") if d.is_dir()), reverse=True):
        _remove_if_empty(folder)
    for folder in (plots, live_dir / "plots"):
        _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or holding something else
        folder.rmdir()


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
        if "step" not in columns:  # a header cut by a kill: nothing in it to keep
            tsv.unlink()
            continue
        column = columns.index("step")
        kept = []
        for row in rows:
            cells = row.split("\t")
            if len(cells) == len(columns) and cells[column].isdigit() \
                    and int(cells[column]) <= step:
                kept.append(row)
        write_text(tsv, "\n".join([header, *kept]) + "\n")


def finish_live(live: Any) -> None:
    """End the log and rebuild its summary from the plot files (see the module doc)."""
    live.end()
    summary = summary_from_plots(Path(live.dir))
    if summary:
        write_json(live.metrics_file, summary)


def summary_from_plots(live_dir: Path) -> dict[str, Any]:
    """dvclive's summary layout: each metric's last value, nested by its ``/`` path, and
    ``step``, the last step logged. Empty when there is no plot file."""
    summary: dict[str, Any] = {}
    last_step = None
    folder = Path(live_dir) / "plots" / "metrics"
    for tsv in sorted(folder.rglob("*.tsv")):
        lines = tsv.read_text().splitlines()
        if len(lines) < 2:
            continue
        columns, cells = lines[0].split("\t"), lines[-1].split("\t")
        row = dict(zip(columns, cells, strict=False))
        name = tsv.relative_to(folder).with_suffix("").as_posix()
        value = row.get(name.rsplit("/", 1)[-1])
        if value is None or not row.get("step", "").isdigit():
            continue
        node = summary
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(value)
        last_step = max(last_step or 0, int(row["step"]))
    if last_step is not None:
        summary["step"] = last_step
    return summary
