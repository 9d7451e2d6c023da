"""Continued pretraining: a small corpus from scratch against adapting a pretrained model.

The small corpus is a few hundred KB of English technical notes: the 79 topic pages of
the Python language reference that every Python installation ships for ``help()``
(``pydoc_data.topics``, about 465 KB), one ``.txt`` file per topic, read in blank-line
paragraphs (``data.txt_unit: paragraph``). Two scratch copies of this project (each its
own git + DVC repository) run ``dvc repro evaluate`` on it with the default params and
the same training budget (``train.steps``):

- **from scratch**: a bpe vocabulary learned on the small corpus, random weights;
- **adapted**: ``train.init_from`` = a model pretrained on the builtin corpus (``--base``,
  the default run's ``models/pretrain/best``) and ``vocab.kind: from_model``, its
  tokenizer reused.

It reports the small corpus's val and test bits per byte (tokenizer-independent, so the
two runs compare), the bigram baseline of each, train tokens and wall time.

``--smallest`` checks that the script works, in about a minute: both runs with the tiny
params (``tests/tiny_params.yaml``), the adapted one from the first run's model unless
``--base`` is given.

Usage (from the repository root, after ``dvc repro pretrain``; about 20 minutes on
2 cores, run alone)::

    .venv/bin/python bench/bench_adapt.py --out bench/results-adapt.md
    .venv/bin/python bench/bench_adapt.py --steps 20   # a short run
    .venv/bin/python bench/bench_adapt.py --smallest
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

import click
from common import REPO_ROOT, TINY_PARAMS, publish, run, scratch_repo, work_dir_and_out, work_folder

from pipeline.core.io import read_json

DEFAULT_BASE = REPO_ROOT / "models/pretrain/best"


def write_notes(folder: Path) -> tuple[int, int]:
    """The language reference's topics as .txt files; (files, bytes)."""
    import pydoc_data.topics

    folder.mkdir(parents=True)
    total = 0
    for name, text in sorted(pydoc_data.topics.topics.items()):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode("utf-8"))
    return len(pydoc_data.topics.topics), total


def one_run(name: str, work: Path, notes: Path, overrides: dict, base: Path | None) -> dict:
    repo = scratch_repo(work / name, {**overrides, "data.corpus": str(notes),
                                      "data.txt_unit": "paragraph"})
    if base is not None:
        shutil.copytree(base, repo / "base-model")
    click.echo(f"[{name}] dvc repro evaluate in {repo}", err=True)
    started = time.perf_counter()
    result = run(["dvc", "repro", "evaluate"], repo)
    seconds = time.perf_counter() - started
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    evaluate = read_json(repo / "metrics/evaluate.json")
    meta = read_json(repo / "data/tokens/meta.json")
    pretrain = read_json(repo / "metrics/pretrain.json")
    return {"name": name, "repo": repo, "seconds": seconds, "steps": pretrain["steps"],
            "train_tokens": meta["splits"]["train"]["tokens"],
            **{key: evaluate[key] for key in ("val.bpb", "val.bigram_bpb", "test.bpb",
                                              "test.bigram_bpb")}}


@click.command()
@click.option("--base", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help=f"The pretrained model to adapt  [default: {DEFAULT_BASE}, "
                                 "the default run's best]")
@click.option("--steps", type=int, default=None,
              help="train.steps for both runs (default: params.yaml's).")
@click.option("--smallest", is_flag=True,
              help="Tiny params, the first run's model as the base: a check that the script "
                   "works, not a measurement.")
@work_dir_and_out
def main(base: Path | None, steps: int | None, smallest: bool, work_dir: Path | None,
         out: Path | None) -> None:
    if base is None and not smallest:
        base = DEFAULT_BASE
        if not base.is_dir():
            raise click.ClickException(f"--base {base}: not found; run `dvc repro pretrain` "
                                       "first, or name a model folder")
    work = work_folder("gptpipe-adapt-", work_dir)
    files, size = write_notes(work / "notes")
    budget = (TINY_PARAMS if smallest else {}) | ({} if steps is None else {"train.steps": steps})
    scratch = one_run("from scratch", work, work / "notes", budget, None)
    adapted = {**budget, "train.init_from": "base-model", "vocab.kind": "from_model"}
    runs = [scratch, one_run("adapted", work, work / "notes", adapted,
                             base or scratch["repo"] / "models/pretrain/best")]
    lines = [
        f"Small corpus: {files} topic pages of the Python {platform.python_version()} "
        f"language reference ({size / 1024:,.0f} KB), in paragraphs; "
        f"{runs[0]['steps']} training steps each.", "",
        "| run | train tokens | val bpb (bigram) | test bpb (bigram) | minutes |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['name']} | {r['train_tokens']:,} | {r['val.bpb']:.4f} "
                     f"({r['val.bigram_bpb']:.4f}) | {r['test.bpb']:.4f} "
                     f"({r['test.bigram_bpb']:.4f}) | {r['seconds'] / 60:.1f} |")
    publish("\n".join(lines), out)
    click.echo(f"work directory: {work}", err=True)


if __name__ == "__main__":
    main()
