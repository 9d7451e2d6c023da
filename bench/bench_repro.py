"""How long the pipeline takes: the first command on a fresh clone, a no-op, a re-run.

In a fresh `git clone` of this repository (no .venv, no data, an empty DVC cache):

1. `make pipeline`, the README's first command: creates .venv, installs gptpipe, runs
   `dvc repro` and prints the summary. Timed in total (the first-hour promise: at most
   20 minutes on 2 cores) and by stage, from each "Running stage" line to the next (the
   last to the start of the summary); set-up is the time before the first stage;
2. the run is committed, then a no-op `dvc repro` (nothing changed), ``--noop-runs``
   times: the median is DVC's own overhead (goal: under 1.5 s);
3. `dvc exp run -S <--change>` (default ``train.lr=0.0025``), a pretraining param only:
   which stages ran (pretrain and what depends on it, nothing before it) and how long
   each took; then `dvc params diff`, `dvc metrics diff` and `dvc exp show` against the
   committed run are saved beside the report (the experiment excerpt of docs/comparing.md).

``--smallest`` checks that the script works, in about a minute: the clone runs the tiny
params (``tests/tiny_params.yaml``) on 240 builtin articles, with this environment's
tools instead of a .venv of its own (``dvc repro`` and the summary, no install), one
no-op run, and ``--change evaluate.max_new_tokens=4`` unless another is given.

Usage (from the repository root; about 30 minutes on 2 cores, with nothing else running):

    python3 bench/bench_repro.py --workdir /tmp/repro --out bench/results-repro.md
    python3 bench/bench_repro.py --set train.steps=20 --set rlhf.steps=2   # a short run
    .venv/bin/python bench/bench_repro.py --smallest
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import BIN, REPO_ROOT, TINY_PARAMS, publish, set_params, work_folder, write_wiki_folder

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
SUMMARY_LINE = re.compile(r"^(Use `dvc push`|To track the changes|gptpipe: |Metrics:)")
# --smallest: what replaces `make pipeline` (the same steps, less the install), and the
# defaults it gives --change and --noop-runs.
SMALLEST_PIPELINE = "dvc repro && python -m pipeline.report"
SMALLEST_DEFAULTS = {"change": "evaluate.max_new_tokens=4", "noop_runs": 1}


def environment(tools: Path) -> dict[str, str]:
    """``tools`` (a bin folder) first on PATH, and no other environment's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": str(tools) + os.pathsep + env.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def timed(command: list[str], repo: Path, log: Path, tools: Path) -> tuple[float, float, list]:
    """Run ``command``; return (total s, s before the first stage, [(stage, s)])."""
    starts: list[tuple[str, float]] = []
    summary_at = None
    began = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=environment(tools))
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            match = STAGE_LINE.search(line)
            if match:
                starts.append((match.group(1), time.perf_counter()))
            elif SUMMARY_LINE.search(line) and summary_at is None:
                summary_at = time.perf_counter()
        if proc.wait() != 0:
            sys.exit(f"bench_repro: {' '.join(command)} failed; see {log}")
    ended = time.perf_counter()
    stages = []
    for index, (name, start) in enumerate(starts):
        stop = starts[index + 1][1] if index + 1 < len(starts) else (summary_at or ended)
        stages.append((name, stop - start))
    setup = (starts[0][1] if starts else ended) - began
    return ended - began, setup, stages


def capture(command: list[str], repo: Path, tools: Path) -> str:
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env=environment(tools), check=True)
    return f"$ {' '.join(command)}\n{result.stdout}"


def noop_seconds(repo: Path, runs: int, tools: Path) -> list[float]:
    """Wall seconds of ``runs`` no-op `dvc repro` runs."""
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, check=True, capture_output=True,
                       env=environment(tools))
        seconds.append(time.perf_counter() - began)
    return seconds


def save_excerpts(repo: Path, path: Path, tools: Path) -> None:
    """The experiment against the committed run, as docs/comparing.md quotes it."""
    path.write_text("\n".join(capture(c, repo, tools) for c in (
        ["dvc", "params", "diff"], ["dvc", "metrics", "diff"],
        ["dvc", "exp", "show", "--md", "--drop", ".*", "--keep",
         "Experiment|train.lr|metrics/evaluate.json:test.bpb|gpt.heldout_accuracy|"
         "gold_after|win_rate"])))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override params.yaml in the clone (e.g. for a quick smoke run)")
    parser.add_argument("--change", default=None,
                        help="the param changed for the re-run (default train.lr=0.0025)")
    parser.add_argument("--noop-runs", type=int, default=None, help="(default 5)")
    parser.add_argument("--workdir", type=Path, help="clone here (default: a temp folder)")
    parser.add_argument("--smallest", action="store_true",
                        help="tiny params and this environment's tools: a check that the "
                        "script works, not a measurement")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    defaults = SMALLEST_DEFAULTS if args.smallest else {"change": "train.lr=0.0025",
                                                        "noop_runs": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    work = args.workdir or work_folder("gptpipe-repro-")
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "gptpipe"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(repo)], check=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.smallest:
        overrides = {**TINY_PARAMS, **overrides}
        write_wiki_folder(repo / "corpus", 240)
    set_params(repo / "params.yaml", overrides)
    log = work / "repro.log"
    # The clone's own .venv, which `make pipeline` creates; --smallest has none.
    tools = BIN if args.smallest else repo / ".venv" / "bin"
    first = ["sh", "-c", SMALLEST_PIPELINE] if args.smallest else ["make", "pipeline"]

    full = timed(first, repo, log, tools)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the default run"], cwd=repo, check=True)
    noop = noop_seconds(repo, args.noop_runs, tools)
    rerun = timed(["dvc", "exp", "run", "-S", args.change], repo, log, tools)
    save_excerpts(repo, work / "experiment.txt", tools)

    publish(report(args, first, full, noop, rerun), args.out)
    print(f"\nlog: {log}; experiment excerpts: {work / 'experiment.txt'}")


def report(args: argparse.Namespace, first: list[str], full: tuple, noop: list[float],
           rerun: tuple) -> str:
    """The Markdown report; ``full`` and ``rerun`` are what :func:`timed` returned."""
    (full_total, setup, full_stages), (rerun_total, _, rerun_stages) = full, rerun
    again = dict(rerun_stages)
    overridden = "the tiny params (--smallest)" if args.smallest else "none (the default pipeline)"
    lines = [
        f"### dvc repro timings, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}",
        f"- overrides: {', '.join(args.set) or overridden}; "
        f"re-run: `dvc exp run -S {args.change}`",
        "",
        f"| stage | `{first[-1] if args.smallest else ' '.join(first)}` on a fresh clone (s) "
        "| after the change (s) |",
        "|---|---:|---:|",
        f"| set-up ({'none: this environment' if args.smallest else '.venv, install'}) | "
        f"{setup:.1f} | - |",
        *(f"| {name} | {seconds:.1f} | "
          f"{f'{again[name]:.1f}' if name in again else 'not run'} |"
          for name, seconds in full_stages),
        f"| **total** | **{full_total:.1f}** ({full_total / 60:.1f} min) | "
        f"**{rerun_total:.1f}** |",
        "",
        f"No-op `dvc repro` (nothing changed), {len(noop)} runs: median "
        f"**{statistics.median(noop):.2f} s** (min {min(noop):.2f}, max {max(noop):.2f}).",
        f"Stages re-run after the change: {', '.join(n for n, _ in rerun_stages)}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
