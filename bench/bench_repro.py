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
   committed run are saved beside the report (the README's experiment excerpt).

Usage (from the repository root; about 30 minutes on 2 cores, with nothing else running):

    python3 bench/bench_repro.py --workdir /tmp/repro --out bench/results-repro.md
    python3 bench/bench_repro.py --set train.steps=20 --set rlhf.steps=2   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
SUMMARY_LINE = re.compile(r"^(Use `dvc push`|To track the changes|gptpipe: |Metrics:)")


def environment(repo: Path) -> dict[str, str]:
    """The clone's own .venv first on PATH (it exists once `make pipeline` made it)."""
    bin_dir = str(repo / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def timed(command: list[str], repo: Path, log: Path) -> tuple[float, float, list]:
    """Run ``command``; return (total s, s before the first stage, [(stage, s)])."""
    starts: list[tuple[str, float]] = []
    summary_at = None
    began = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=environment(repo))
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


def capture(command: list[str], repo: Path) -> str:
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env=environment(repo), check=True)
    return f"$ {' '.join(command)}\n{result.stdout}"


def set_params(repo: Path, overrides: dict[str, object]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if key not in params.get(section, {}):
            sys.exit(f"bench_repro: unknown param {dotted}")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override params.yaml in the clone (e.g. for a quick smoke run)")
    parser.add_argument("--change", default="train.lr=0.0025",
                        help="the pretraining param changed for the re-run")
    parser.add_argument("--noop-runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="clone here (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptpipe-repro-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "gptpipe"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if overrides:
        set_params(repo, overrides)
    log = work / "repro.log"

    full_total, setup, full_stages = timed(["make", "pipeline"], repo, log)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the default run"], cwd=repo, check=True)
    noop = []
    for _ in range(args.noop_runs):
        began = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, check=True, capture_output=True,
                       env=environment(repo))
        noop.append(time.perf_counter() - began)
    rerun_total, _, rerun_stages = timed(["dvc", "exp", "run", "-S", args.change], repo, log)
    excerpts = "\n".join(capture(c, repo) for c in (
        ["dvc", "params", "diff"], ["dvc", "metrics", "diff"],
        ["dvc", "exp", "show", "--md", "--drop", ".*", "--keep",
         "Experiment|train.lr|metrics/evaluate.json:test.bpb|gpt.heldout_accuracy|"
         "gold_after|win_rate"]))
    (work / "experiment.txt").write_text(excerpts)

    rerun = dict(rerun_stages)
    lines = [
        f"### dvc repro timings, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}",
        f"- overrides: {', '.join(args.set) or 'none (the default pipeline)'}; "
        f"re-run: `dvc exp run -S {args.change}`",
        "",
        "| stage | `make pipeline` on a fresh clone (s) | after the change (s) |",
        "|---|---:|---:|",
        f"| set-up (.venv, install) | {setup:.1f} | - |",
        *(f"| {name} | {seconds:.1f} | "
          f"{f'{rerun[name]:.1f}' if name in rerun else 'not run'} |"
          for name, seconds in full_stages),
        f"| **total** | **{full_total:.1f}** ({full_total / 60:.1f} min) | "
        f"**{rerun_total:.1f}** |",
        "",
        f"No-op `dvc repro` (nothing changed), {len(noop)} runs: median "
        f"**{statistics.median(noop):.2f} s** (min {min(noop):.2f}, max {max(noop):.2f}).",
        f"Stages re-run after the change: {', '.join(n for n, _ in rerun_stages)}.",
    ]
    report = "\n".join(lines)
    print(report)
    print(f"\nlog: {log}; experiment excerpts: {work / 'experiment.txt'}")
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
