"""How long `dvc repro` takes: the whole default pipeline by stage, a no-op, and a re-run.

In a fresh `git clone` of this repository (its own empty DVC cache, so every stage runs),
with the current environment's `dvc` and `gptpipe` on PATH:

1. `dvc repro` from scratch, timing each stage from its "Running stage" line to the next
   (the last to the end);
2. a no-op `dvc repro` (nothing changed), ``--noop-runs`` times: the median is DVC's
   own overhead (goal: under 1.5 s);
3. a re-run after changing only a pretraining param (``--change``, by default
   ``train.lr``): which stages ran (pretrain and what depends on it, nothing before it)
   and how long each took.

Usage (from the repository root; the full default run takes about 20 minutes on 2 cores):

    .venv/bin/python bench/bench_repro.py --out bench/results-repro.md
    .venv/bin/python bench/bench_repro.py --set train.steps=20 --set rlhf.steps=2   # smoke run
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


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def timed_repro(repo: Path, log: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro`; return the total seconds and (stage, seconds) in run order."""
    starts: list[tuple[str, float]] = []
    began = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=environment())
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            match = STAGE_LINE.search(line)
            if match:
                starts.append((match.group(1), time.perf_counter()))
        if proc.wait() != 0:
            sys.exit(f"bench_repro: dvc repro failed; see {log}")
    ended = time.perf_counter()
    stages = []
    for index, (name, start) in enumerate(starts):
        stop = starts[index + 1][1] if index + 1 < len(starts) else ended
        stages.append((name, stop - start))
    return ended - began, stages


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
    repo = work / "gptpipe"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if overrides:
        set_params(repo, overrides)
    log = work / "repro.log"

    full_total, full_stages = timed_repro(repo, log)
    noop = []
    for _ in range(args.noop_runs):
        began = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, check=True, capture_output=True,
                       env=environment())
        noop.append(time.perf_counter() - began)
    key, value = args.change.split("=", 1)
    set_params(repo, {key: yaml.safe_load(value)})
    rerun_total, rerun_stages = timed_repro(repo, log)

    rerun = dict(rerun_stages)
    lines = [
        f"### dvc repro timings, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}",
        f"- overrides: {', '.join(args.set) or 'none (the default pipeline)'}; "
        f"re-run after changing {args.change}",
        "",
        "| stage | from scratch (s) | after the change (s) |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.1f} | "
          f"{f'{rerun[name]:.1f}' if name in rerun else 'not run'} |"
          for name, seconds in full_stages),
        f"| **total** | **{full_total:.1f}** | **{rerun_total:.1f}** |",
        "",
        f"No-op `dvc repro` (nothing changed), {len(noop)} runs: median "
        f"**{statistics.median(noop):.2f} s** (min {min(noop):.2f}, max {max(noop):.2f}).",
        f"Stages re-run after the change: {', '.join(n for n, _ in rerun_stages)}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
