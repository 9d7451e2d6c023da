"""bfloat16 against float32 on a CPU, at equal wall time, on the default pretraining run.

On a CPU with native bfloat16 (AVX512-BF16 or AMX; ``train.dtype: bfloat16`` is refused
elsewhere), bfloat16 autocast makes a step faster but each step a little less exact.
What matters is the model a fixed amount of time buys, so this script:

1. calibrates: ``--calibrate-steps`` steps of each dtype, steady-state tokens/s from
   ``pretrain_speed.json``, alternated twice (float32, bfloat16, float32, bfloat16) so
   that drift in the machine's speed falls on both;
2. runs the default pretraining (params.yaml as it is: float32, ``train.steps`` steps);
3. runs bfloat16 with the step count that takes the same training time (steps times the
   measured speed ratio; the LR schedule stretches with it, as a user would set it);
4. reports each run's val bits per byte (the stage's own final metric), steps, tokens/s
   and wall seconds; and, for reference, bfloat16 at float32's step count.

Every run is the real ``gptpipe pretrain`` command on the project's own tokens (run
``dvc repro tokenize`` first), one at a time, in a scratch folder.

``--smallest`` checks that the script works: 4 steps, calibrated on 2, on a ``--repo``
of the tiny params (``tests/tiny_params.yaml``); on a CPU without native bfloat16 its
bfloat16 runs are skipped with a line that says so (without it, the script refuses).

Usage (from the repository root; about 30 minutes on 2 cores, run it alone)::

    .venv/bin/python bench/bench_cpu_bf16.py --out bench/results-bf16.md
    .venv/bin/python bench/bench_cpu_bf16.py --steps 40 --calibrate-steps 10   # a short run
    .venv/bin/python bench/bench_cpu_bf16.py --smallest --repo path/to/a/tiny/project
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import click
import torch
import yaml
from common import BIN, publish, work_dir_and_out, work_folder
from common import REPO_ROOT as ROOT

from pipeline.core.device import cpu_has_native_bf16
from pipeline.core.io import read_json

SMALLEST_STEPS, SMALLEST_CALIBRATE_STEPS = 4, 2


def pretrain(work: Path, name: str, overrides: dict, repo: Path) -> dict:
    """One ``gptpipe pretrain`` run with params.yaml plus ``overrides`` (train section)."""
    folder = work / name
    folder.mkdir(parents=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(overrides)
    # The run's folder is its working directory: a relative base model is the project's.
    init_from = Path(params["train"]["init_from"])
    if not init_from.is_absolute():
        params["train"]["init_from"] = str(repo / init_from)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [str(BIN / "gptpipe"), "pretrain",
               "--params", str(folder / "params.yaml"), "--tokens", str(repo / "data/tokens"),
               "--tokenizer", str(repo / "data/vocab/tokenizer.json"),
               "--out", str(folder / "models"), "--checkpoint", str(folder / "checkpoint"),
               "--live", str(folder / "live"), "--metrics", str(folder / "metrics.json"),
               "--speed", str(folder / "speed.json")]
    click.echo(f"[{name}] {overrides}", err=True)
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode:
        raise click.ClickException(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    metrics = read_json(folder / "metrics.json")
    speed = read_json(folder / "speed.json")
    return {"name": name, "steps": metrics["steps"], "val_bpb": metrics["val_bpb"],
            "tokens_per_second": speed["tokens_per_second"], "wall": speed["wall_seconds"]}


def calibrate(work: Path, repo: Path, steps: int, native_bf16: bool) -> dict[str, float]:
    """Steady-state tokens/s of each dtype: ``steps`` steps each, alternated twice so that
    drift in the machine's speed falls on both."""
    dtypes = ("float32", "bfloat16") if native_bf16 else ("float32",)
    rates: dict[str, list[float]] = {dtype: [] for dtype in dtypes}
    short = {"steps": steps, "eval_every": steps, "checkpoint_every": steps,
             "log_every": max(1, steps // 4), "warmup_steps": 1}
    for round_ in range(2):
        for dtype, measured in rates.items():
            run = pretrain(work, f"calibrate-{dtype}-{round_}", {**short, "dtype": dtype}, repo)
            measured.append(run["tokens_per_second"])
    return {dtype: sum(measured) / len(measured) for dtype, measured in rates.items()}


@click.command()
@click.option("--repo", type=click.Path(path_type=Path, exists=True), default=ROOT,
              show_default=True, help="The project whose data/tokens and params.yaml to use.")
@click.option("--steps", type=int, default=None, help="float32 steps (default: params.yaml's).")
@click.option("--calibrate-steps", type=int, default=40, show_default=True)
@click.option("--smallest", is_flag=True,
              help=f"{SMALLEST_STEPS} steps, calibrated on {SMALLEST_CALIBRATE_STEPS}; "
                   "bfloat16 skipped where the CPU lacks it: a check that the script works, "
                   "not a measurement.")
@work_dir_and_out
def main(repo: Path, steps: int | None, calibrate_steps: int, smallest: bool,
         work_dir: Path | None, out: Path | None) -> None:
    native_bf16 = cpu_has_native_bf16()
    if not native_bf16 and not smallest:
        raise click.ClickException("this CPU has no native bfloat16: nothing to compare")
    if smallest:
        steps, calibrate_steps = SMALLEST_STEPS, SMALLEST_CALIBRATE_STEPS
    work = work_folder("gptpipe-bf16-", work_dir)
    steps = steps or yaml.safe_load((repo / "params.yaml").read_text())["train"]["steps"]
    speed = calibrate(work, repo, calibrate_steps, native_bf16)
    lines = [
        "### bfloat16 against float32 on this CPU (`bench/bench_cpu_bf16.py`)", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"native bfloat16: {native_bf16}; torch {torch.__version__}",
    ]
    runs = [pretrain(work, "float32", {"steps": steps, "dtype": "float32"}, repo)]
    if native_bf16:
        ratio = speed["bfloat16"] / speed["float32"]
        runs += [
            pretrain(work, "bfloat16-equal-time",
                     {"steps": max(1, round(steps * ratio)), "dtype": "bfloat16"}, repo),
            pretrain(work, "bfloat16-equal-steps", {"steps": steps, "dtype": "bfloat16"}, repo),
        ]
        lines.append(f"- calibration ({calibrate_steps} steps, twice each): float32 "
                     f"{speed['float32']:,.0f} tokens/s, bfloat16 {speed['bfloat16']:,.0f} "
                     f"tokens/s: **{ratio:.2f}x**")
    else:
        lines.append(f"- calibration ({calibrate_steps} steps, twice): float32 "
                     f"{speed['float32']:,.0f} tokens/s; bfloat16 runs skipped: this CPU has "
                     "no native bfloat16")
    lines += ["", "| run | steps | val bits/byte | tokens/s | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {run['name']} | {run['steps']} | {run['val_bpb']:.4f} | "
              f"{run['tokens_per_second']:,.0f} | {run['wall']:.0f} |" for run in runs]
    publish("\n".join(lines), out)


if __name__ == "__main__":
    main()
