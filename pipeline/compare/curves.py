"""The training and RL curves of the compared runs, drawn as PNG pictures for the
Markdown report: each curve dvclive logged (``dvclive/<stage>/plots/metrics/*.tsv``),
every run's on the same axes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from pipeline.compare.sources import RunSource
from pipeline.core.io import atomic_path


@dataclass(frozen=True)
class Curve:
    """One picture: a title, its y label, and the dvclive series drawn (path, column)."""

    name: str
    title: str
    y_label: str
    series: tuple[tuple[str, str, str], ...]  # (label, tsv path, column)


CURVES = (
    Curve("pretrain-loss", "Pretraining: train and val cross-entropy", "nats/token", (
        ("train", "dvclive/pretrain/plots/metrics/train/loss.tsv", "loss"),
        ("val", "dvclive/pretrain/plots/metrics/val/loss.tsv", "loss"))),
    Curve("rlhf-gold", "RLHF: gold score of held-out samples", "gold score", (
        ("gold", "dvclive/rlhf/plots/metrics/eval/gold_score.tsv", "gold_score"),)),
    Curve("rlhf-kl", "RLHF: KL to the starting policy", "nats/sequence", (
        ("KL", "dvclive/rlhf/plots/metrics/eval/kl.tsv", "kl"),)),
)


def read_series(raw: bytes | None, column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a dvclive TSV (``step`` and ``column``); empty when absent
    or unreadable."""
    if raw is None:
        return [], []
    lines = raw.decode("utf-8", "replace").splitlines()
    if not lines:
        return [], []
    header = lines[0].split("\t")
    if "step" not in header or column not in header:
        return [], []
    at_step, at_value = header.index("step"), header.index(column)
    steps, values = [], []
    for line in lines[1:]:
        cells = line.split("\t")
        try:
            steps.append(float(cells[at_step]))
            values.append(float(cells[at_value]))
        except (IndexError, ValueError):
            continue
    return steps, values


def draw(curve: Curve, sources: list[RunSource]) -> bytes | None:
    """The PNG of ``curve`` for every run that logged it (None: none did)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=100)
    drawn = 0
    for run, colour in zip(sources, ("tab:blue", "tab:orange", "tab:green", "tab:red"),
                           strict=False):
        for (label, path, column), style in zip(curve.series, ("-", "--", ":"), strict=False):
            steps, values = read_series(run.read(path), column)
            if steps:
                axes.plot(steps, values, style, color=colour, label=f"{run.label} {label}")
                drawn += 1
    if not drawn:
        pyplot.close(figure)
        return None
    axes.set_title(curve.title)
    axes.set_xlabel("step")
    axes.set_ylabel(curve.y_label)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def pictures(sources: list[RunSource]) -> dict[str, bytes]:
    """name -> PNG bytes of every curve some run logged."""
    found = {}
    for curve in CURVES:
        png = draw(curve, sources)
        if png is not None:
            found[curve.name] = png
    return found


def write_pictures(found: dict[str, bytes], markdown: Path) -> dict[str, str]:
    """Each picture beside the Markdown file as ``<stem>-<name>.png``; name -> file name
    (relative, as the Markdown links it)."""
    written = {}
    for name, png in found.items():
        target = markdown.with_name(f"{markdown.stem}-{name}.png")
        with atomic_path(target) as tmp:
            tmp.write_bytes(png)
        written[name] = target.name
    return written
