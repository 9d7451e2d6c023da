"""The ``compare`` command: compare two runs' headline figures and say which
differences are larger than their noise (not a stage: it writes only its report).

    gptpipe compare                      # HEAD -> the workspace
    gptpipe compare main                 # main -> the workspace
    gptpipe compare HEAD~1 HEAD --md pr.md --fail-on evaluate.test.bpb
    gptpipe compare --replicates         # every experiment of HEAD, as seeds of one run

A run is what DVC knows: ``workspace``, a commit, a branch or tag, or an experiment's
name (``dvc exp show``). For every headline figure both runs report, it prints both
values, the difference, its 95% interval and a verdict (better, worse, within noise):
paired over the documents, items or prompts both runs scored (their per-item tables),
when they share them and, for evaluate's figures, the test split's fingerprint;
unpaired from each run's own interval otherwise, saying so.

--md writes the same as Markdown, with the training and RL curves of the runs as PNG
pictures beside it, ready for a pull request. --fail-on NAME (repeatable) exits 1 when
that figure got significantly worse, for CI. --replicates treats every run named (or
every experiment of HEAD) as a replicate of one configuration, such as seeds queued with
`dvc exp run --queue -S train.seed=N` and run with `dvc queue start`, and prints each
figure's mean and standard deviation across runs beside the runs' own standard errors.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.compare.curves import pictures, write_pictures
from pipeline.compare.differences import Difference, compare_headline
from pipeline.compare.headlines import (
    METRICS_FILES,
    SPLIT_FINGERPRINT,
    TOKENIZER_FINGERPRINT,
    headline,
    headlines_of,
)
from pipeline.compare.sources import WORKSPACE, RunSource, experiments_of, open_sources
from pipeline.compare.tables import (
    REPLICATE_COLUMNS,
    pair_header,
    pair_markdown,
    pair_rows,
    replicate_markdown,
    replicate_rows,
    spreads,
    text_table,
)
from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_text
from pipeline.core.stage import command_help


def run_metrics(source: RunSource) -> dict[str, dict]:
    """Every metrics file of a run (file -> flat metrics); one line when it has none."""
    found = {file: data for file in METRICS_FILES if (data := source.metrics(file))}
    if not found:
        raise GptpipeError(f"compare: {source.label} has no metrics ({', '.join(METRICS_FILES)});"
                           " allowed: a run that `dvc repro` or `dvc exp run` finished")
    return found


def compare_pair(old: RunSource, new: RunSource, fail_on: list[str]
                 ) -> tuple[list[Difference], list[str]]:
    """Every headline both runs report, compared; and the notes the report adds."""
    old_files, new_files = run_metrics(old), run_metrics(new)
    notes = []
    same_split = _same(old_files, new_files, SPLIT_FINGERPRINT)
    if not same_split:
        notes.append("the test splits differ (fingerprint.corpus or fingerprint.split): "
                     "evaluate's figures are compared unpaired")
    same_tokenizer = _same(old_files, new_files, (TOKENIZER_FINGERPRINT,))
    if not same_tokenizer:
        notes.append("the tokenizers differ: per-token figures (loss) are left out; bits "
                     "per byte compare")
    kernels = [_kernels(source) for source in (old, new)]
    if None not in kernels and kernels[0] != kernels[1]:
        notes.append(f"the models were computed by other kernels ({kernels[0]} there, "
                     f"{kernels[1]} here): their bits differ even for identical params. "
                     f"{KERNEL_DRIFT}")
    for name in fail_on:
        head = headline(name)
        for source, files in ((old, old_files), (new, new_files)):
            if head.key not in files.get(head.file, {}):
                raise GptpipeError(f"compare: --fail-on {name}: {source.label} has no "
                                   f"{head.key} in {head.file}")
    differences = []
    for head in headlines_of([old_files, new_files]):
        before, after = old_files.get(head.file, {}), new_files.get(head.file, {})
        if not _number(before.get(head.key)) or not _number(after.get(head.key)):
            continue
        if head.per_token and not same_tokenizer:
            continue
        differences.append(compare_headline(head, old, new, before, after, same_split))
    return differences, notes


# The measured size of the drift between kernels, for the note above (bench/README.md).
KERNEL_DRIFT = ("Measured: the default run computed by AVX-512 and by AVX2 kernels (x86-64 CPU, "
                "float32) differed by 0.0012 in val bits per byte, 0.14 of its standard "
                "error; GPU and Arm drift is not measured, so a difference about that size "
                "may be the kernels', not the change's")


def _kernels(source: RunSource) -> str | None:
    """The kernels a run's pretraining ran on (metrics/pretrain_speed.json), or None."""
    found = source.metrics("metrics/pretrain_speed.json")
    value = found.get("kernels") if found else None
    return value if isinstance(value, str) else None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(old: dict[str, dict], new: dict[str, dict], keys: tuple[str, ...]) -> bool:
    """Whether both runs' evaluate fingerprints agree on ``keys`` (False when either
    has none)."""
    before, after = old.get("metrics/evaluate.json"), new.get("metrics/evaluate.json")
    if not before or not after:
        return False
    return all(before.get(k) is not None and before.get(k) == after.get(k) for k in keys)


def _pair_report(names: list[str], root: Path, markdown: Path | None,
                 fail_on: list[str]) -> int:
    old, new = open_sources(names, root)
    differences, notes = compare_pair(old, new, fail_on)
    rows = pair_rows(differences)
    click.echo(f"compare: {old.label} -> {new.label}")
    click.echo(text_table(pair_header(old.label, new.label), rows))
    for note in notes:
        click.echo(f"compare: {note}")
    if markdown is not None:
        files = write_pictures(pictures([old, new]), markdown)
        write_text(markdown, pair_markdown(old.label, new.label, rows, notes, files))
        click.echo(f"compare: wrote {markdown}")
    worse = [d.headline.name for d in differences
             if d.headline.name in fail_on and d.verdict == "worse"]
    for name in worse:
        click.echo(f"compare: {name} got significantly worse", err=True)
    return 1 if worse else 0


def _replicate_report(names: list[str], root: Path, markdown: Path | None) -> int:
    names = names or experiments_of(root)
    if len(names) < 2:
        raise GptpipeError("compare --replicates: fewer than 2 runs (found "
                           f"{len(names)}); allowed: 2 or more revisions or experiments, "
                           "or none to take every experiment of HEAD")
    sources = open_sources(names, root)
    runs = [run_metrics(source) for source in sources]
    rows = replicate_rows(spreads(runs))
    click.echo(f"compare: {len(sources)} replicates: " + ", ".join(s.label for s in sources))
    click.echo(text_table(list(REPLICATE_COLUMNS), rows))
    if markdown is not None:
        files = write_pictures(pictures(sources), markdown)
        write_text(markdown, replicate_markdown([s.label for s in sources], rows, files))
        click.echo(f"compare: wrote {markdown}")
    return 0


def compare(revisions: list[str], root: Path, markdown: Path | None = None,
            fail_on: tuple[str, ...] = (), replicates: bool = False) -> int:
    """The report for ``revisions`` (see the module docstring); the exit status: 1 when
    a --fail-on figure got significantly worse, else 0."""
    for name in fail_on:
        headline(name)  # an unknown name stops before anything is read
    if replicates:
        return _replicate_report(list(revisions), root, markdown)
    if len(revisions) > 2:
        raise GptpipeError(f"compare: {len(revisions)} revisions; allowed: at most 2 (old "
                           "new), or --replicates for replicates of one configuration")
    names = {0: ["HEAD", WORKSPACE], 1: [*revisions, WORKSPACE]}.get(len(revisions),
                                                                    list(revisions))
    return _pair_report(names, root, markdown, list(fail_on))


_SHORT, _HELP = command_help("compare", __doc__)


@click.command("compare", help=_HELP, short_help=_SHORT)
@click.argument("revisions", nargs=-1)
@click.option("--md", "markdown", type=click.Path(path_type=Path), default=None,
              help="Also write the report as Markdown here, with PNG curves beside it.")
@click.option("--fail-on", multiple=True, metavar="NAME",
              help="Exit 1 when this figure (such as evaluate.test.bpb) got significantly "
                   "worse; repeatable.")
@click.option("--replicates", is_flag=True,
              help="The runs are replicates (seeds) of one configuration: report the "
                   "spread across them.")
def main(revisions: tuple[str, ...], markdown: Path | None, fail_on: tuple[str, ...],
         replicates: bool) -> None:
    status = compare(list(revisions), Path.cwd(), markdown, fail_on, replicates)
    raise SystemExit(status)
