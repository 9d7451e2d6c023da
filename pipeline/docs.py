"""The generated blocks of README.md and docs/*.md, written from what the runs and the code say.

A block sits between ``<!-- generated: NAME -->`` and ``<!-- end -->``; its text comes from
the committed metrics files (``metrics/*.json``), ``params.yaml``, the ``gptpipe`` command's
subcommands and the size limits in the code, never from a person's typing, so a change that
moves a metric or a limit cannot leave a page quoting the old figure:

    python -m pipeline.docs           # rewrite every block (``make docs``)
    python -m pipeline.docs --check   # list the blocks that are not what it would write; exit 1

``tests/test_docs.py`` runs the check, so a metric changed without ``make docs`` fails CI.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json, write_text

BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end -->)",
                   re.DOTALL)

# The params a user changes first, in the order the README lists them, and why.
FIRST_PARAMS = (
    ("data.corpus", "the text to learn from: a file, a folder, or a builtin `.corpus`"),
    ("data.text_field", "the JSONL/JSON field or CSV/Parquet column holding the text"),
    ("vocab.vocab_size", "tokens in the BPE vocabulary"),
    ("model.context", "tokens the model sees at once"),
    ("model.n_layer", "transformer blocks"),
    ("model.n_embd", "width of the model"),
    ("train.device", "`auto` (cuda > mps > cpu), `cpu`, `cuda`, `cuda:N`, `mps`"),
    ("train.steps", "the training budget in optimizer steps"),
    ("train.lr", "peak learning rate"),
    ("rlhf.reward", "what RL maximizes: `model`, `gold`, `likelihood` or "
                    "`python:<file.py>:<function>`"),
)


def _flat(data: dict, dotted: str):
    """``data[a][b]`` for ``a.b``, or the flat key ``a.b`` itself (evaluate's keys)."""
    if dotted in data:
        return data[dotted]
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise GptpipeError(f"{dotted}: not found; allowed: a key of the metrics file")
        data = data[part]
    return data


def _metrics(root: Path, name: str) -> dict:
    return read_json(root / "metrics" / name)


def _figure(metrics: dict, key: str, spec: str) -> str:
    """``metrics[key]`` formatted by ``spec``, with its standard error when the file holds
    one (``<key>_se``), so figures gain their uncertainty as soon as a run records it."""
    shown = format(_flat(metrics, key), spec)
    se = metrics.get(f"{key}_se")
    return shown if se is None else f"{shown} ± {format(se, spec)}"


def _fenced(lines: list[str], language: str = "text") -> str:
    return f"```{language}\n" + "\n".join(lines) + "\n```\n"


def summary(root: Path) -> str:
    """What ``make pipeline`` prints at its end, from the committed metrics files."""
    from pipeline.report import summary_lines

    return _fenced(summary_lines(root))


def first_params(root: Path) -> str:
    """The ten params a user changes first, with their values in ``params.yaml``."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    rows = ["| param | default | what it sets |", "|---|---|---|"]
    for dotted, meaning in FIRST_PARAMS:
        rows.append(f"| `{dotted}` | `{_flat(params, dotted)}` | {meaning} |")
    return "\n".join(rows) + "\n"


def limits(root: Path) -> str:
    """The limits on hostile input, read from the constants the readers enforce."""
    from pipeline.core import jsonfile
    from pipeline.data.corpus import limits as corpus

    mib = 2**20
    return "\n".join((
        f"- JSON nested deeper than {jsonfile.MAX_JSON_DEPTH} levels, integers longer than "
        f"{sys.int_info.default_max_str_digits} digits, a JSON file over "
        f"{jsonfile.MAX_JSON_BYTES // mib} MiB and a JSONL record over "
        f"{jsonfile.MAX_JSONL_LINE_BYTES // mib} MiB are refused in one line;",
        f"- a corpus document over {corpus.MAX_DOCUMENT_CHARS // mib} Mi characters, a corpus "
        f"line over {corpus.MAX_LINE_CHARS // mib} Mi characters and a whole-JSON corpus file "
        f"over {corpus.MAX_JSON_FILE_BYTES // mib} MiB decompressed (a gzip or zstd bomb stops "
        f"there) are refused in one line (`pipeline/data/corpus/limits.py`).",
    )) + "\n"


def commands(root: Path) -> str:
    """The subcommands of ``gptpipe``, with their one-line help."""
    from pipeline.cli import COMMANDS, short_help

    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `gptpipe {name}` | {short_help(name)} |" for name in COMMANDS]
    return "\n".join(rows) + "\n"


def evaluation(root: Path) -> str:
    """Bits per byte against the baselines, and the multiple-choice task, before and after
    RLHF, from evaluate's two metrics files."""
    rows = ["| model | test bpb | bigram | unigram | test ppl | next_sentence acc | acc_pmi "
            "| bigram acc_pmi | chance |", "|---|---|---|---|---|---|---|---|---|"]
    for label, name in (("pretrained", "evaluate.json"), ("after RLHF", "evaluate_rlhf.json")):
        m = _metrics(root, name)
        keys = ("test.bpb", "test.bigram_bpb", "test.unigram_bpb", "test.ppl",
                "next_sentence.acc", "next_sentence.acc_pmi", "next_sentence.bigram_acc_pmi",
                "next_sentence.chance")
        rows.append(f"| {label} | " + " | ".join(_figure(m, k, ".4g") for k in keys) + " |")
    return "\n".join(rows) + "\n"


def rlhf(root: Path) -> str:
    """The gold judge's score and bits per byte along pretrained -> SFT -> RL."""
    m = _metrics(root, "rlhf.json")
    return "\n".join((
        "| | pretrained | SFT (the start of RL) | after RL |", "|---|---|---|---|",
        f"| gold judge | {m['gold_pretrained']:.3f} | {m['gold_before']:.3f} "
        f"| {m['gold_after']:.3f} |",
        f"| val bits per byte | {m['val_bpb_pretrained']:.4f} | {m['val_bpb_before']:.4f} "
        f"| {m['val_bpb_after']:.4f} ({m['val_bpb_change_pct']:+.2f}%) |",
        f"| win rate against | | {m['win_rate_vs_start']:.3f} | {m['win_rate']:.3f} |",
        "",
        f"`{m['algo']}` on the `{m['reward']}` reward, best step {m['best_step']} of "
        f"{m['steps']}, KL to the SFT model {m['kl_best']:.3f} nats per sequence.",
    )) + "\n"


# Evaluate's keys that the before/after comparison shows, as `dvc metrics diff` lays them out.
COMPARED = ("test.bpb", "test.ppl", "test.acc", "next_sentence.acc", "next_sentence.acc_pmi")


def before_after(root: Path) -> str:
    """The pretrained and the RLHF-tuned model on the same keys, in the layout of
    ``dvc metrics diff`` (old, new, change)."""
    before, after = _metrics(root, "evaluate.json"), _metrics(root, "evaluate_rlhf.json")
    rows = [("Metric", "pretrained", "after RLHF", "Change")]
    for key in COMPARED:
        old, new = _flat(before, key), _flat(after, key)
        rows.append((key, _figure(before, key, ".6g"), _figure(after, key, ".6g"),
                     format(new - old, "+.6g")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return _fenced(["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                    for row in rows])


GENERATORS: dict[str, Callable[[Path], str]] = {
    "summary": summary, "first_params": first_params, "limits": limits,
    "commands": commands, "evaluation": evaluation, "rlhf": rlhf,
    "before_after": before_after,
}


def documents(root: Path) -> list[Path]:
    """The pages a person reads: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, root: Path, where: str) -> str:
    """``text`` with every generated block rewritten."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise GptpipeError(f"{where}: generated block {name!r} is unknown; allowed: "
                               f"{', '.join(GENERATORS)}")
        return match[1] + GENERATORS[name](root) + match[4]

    return BLOCK.sub(fill, text)


def stale_blocks(root: Path) -> list[str]:
    """The pages whose generated blocks differ from what :func:`render` writes now."""
    stale = []
    for page in documents(root):
        text = page.read_text(encoding="utf-8")
        if render(text, root, str(page.relative_to(root))) != text:
            stale.append(str(page.relative_to(root)))
    return stale


def write_blocks(root: Path) -> list[str]:
    """Rewrite the generated blocks of every page under ``root``; the pages changed."""
    changed = []
    for page in documents(root):
        text = page.read_text(encoding="utf-8")
        new = render(text, root, str(page.relative_to(root)))
        if new != text:
            write_text(page, new)
            changed.append(str(page.relative_to(root)))
    return changed


def main(argv: list[str] | None = None, root: Path = Path(".")) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        stale = stale_blocks(root)
        for page in stale:
            print(f"{page}: generated blocks are out of date; run `make docs`")
        return 1 if stale else 0
    if argv:
        raise GptpipeError(f"arguments {' '.join(argv)!r}; allowed: none, or --check")
    for page in write_blocks(root):
        print(f"{page}: generated blocks rewritten")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GptpipeError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
