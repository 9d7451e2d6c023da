"""The training stages' logs (pretrain, rlhf) in dvclive's layout, resumable and
reproducible.

A resumed run must leave the same files as an uninterrupted one: rows logged after the
snapshot being resumed are dropped (a step must not appear twice), and the summary
(``metrics.json``) is rebuilt at the end from the last row of every plot file, with
sorted keys, so a resumed run (or one that found its run finished and logged nothing)
gets the summary of an uninterrupted one.

Files that are rewritten (the trimmed plot files, the summary) are written atomically, so
a kill never cuts a log that a resume needs; logging only appends rows, and a row a
kill cut short is dropped on resume.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.core.io import write_json, write_text


class LiveLog:
    """dvclive's file layout, written by gptpipe: every ``log_metric(name, value)``
    appends the row ``step<TAB>value`` to ``plots/metrics/<name>.tsv`` (a ``/`` in the
    name is a subfolder; the header ``step<TAB><last part of name>``), which ``dvc plots``
    and Studio read as dvclive's own; :func:`finish_live` writes ``metrics.json``.

    Not dvclive's ``Live``: it looks up the git revision when it starts and fails in a
    repository without a commit (the set-up of ``make pipeline`` and of the tests), its
    public API has no way to skip that lookup, and it may even ``dvc init`` a git
    repository it finds without DVC. Appending rows and writing one summary is all the
    training stages need of it."""

    def __init__(self, directory: Path) -> None:
        self.dir = str(directory)
        self.metrics_file = Path(directory) / "metrics.json"
        self.step = 0

    def log_metric(self, name: str, value: float) -> None:
        path = Path(self.dir) / "plots" / "metrics" / f"{name}.tsv"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as out:
                out.write(f"step\t{name.rsplit('/', 1)[-1]}\n")
        with path.open("a", encoding="utf-8") as out:
            out.write(f"{self.step}\t{value}\n")


def start_live(live_dir: Path, resumed_from: int | None) -> LiveLog:
    """The training log in ``live_dir``: emptied for a fresh run, trimmed for a resume."""
    if resumed_from is None:
        clear_live(live_dir)
    else:
        truncate_live(live_dir, resumed_from)
    Path(live_dir).mkdir(parents=True, exist_ok=True)
    return LiveLog(Path(live_dir))


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


def finish_live(live: LiveLog) -> None:
    """Write the log's summary, rebuilt from the plot files (see the module doc)."""
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
