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

Usage (from the repository root; about 30 minutes on 2 cores, run it alone)::

    .venv/bin/python bench/bench_cpu_bf16.py --out bench/results-bf16.md
    .venv/bin/python bench/bench_cpu_bf16.py --steps 40 --calibrate-steps 10   # smoke
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch
import yaml

from pipeline.core.device import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent


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
    command = [str(Path(sys.executable).parent / "gptpipe"), "pretrain",
               "--params", str(folder / "params.yaml"), "--tokens", str(repo / "data/tokens"),
               "--tokenizer", str(repo / "data/vocab/tokenizer.json"),
               "--out", str(folder / "models"), "--checkpoint", str(folder / "checkpoint"),
               "--live", str(folder / "live"), "--metrics", str(folder / "metrics.json"),
               "--speed", str(folder / "speed.json")]
    click.echo(f"[{name}] {overrides}", err=True)
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode:
        raise click.ClickException(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    metrics = json.loads((folder / "metrics.json").read_text())
    speed = json.loads((folder / "speed.json").read_text())
    return {"name": name, "steps": metrics["steps"], "val_bpb": metrics["val_bpb"],
            "tokens_per_second": speed["tokens_per_second"], "wall": speed["wall_seconds"]}


@click.command()
@click.option("--repo", type=click.Path(path_type=Path, exists=True), default=ROOT,
              show_default=True, help="The project whose data/tokens and params.yaml to use.")
@click.option("--steps", type=int, default=None, help="float32 steps (default: params.yaml's).")
@click.option("--calibrate-steps", type=int, default=40, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None)
def main(repo: Path, steps: int | None, calibrate_steps: int, work_dir: Path | None,
         out: Path | None) -> None:
    if not cpu_has_native_bf16():
        raise click.ClickException("this CPU has no native bfloat16: nothing to compare")
    work = Path(tempfile.mkdtemp(prefix="gptpipe-bf16-", dir=work_dir))
    steps = steps or yaml.safe_load((repo / "params.yaml").read_text())["train"]["steps"]
    calibration = {"float32": [], "bfloat16": []}
    short = {"steps": calibrate_steps, "eval_every": calibrate_steps,
             "checkpoint_every": calibrate_steps, "log_every": max(1, calibrate_steps // 4),
             "warmup_steps": 1}
    for round_ in range(2):
        for dtype in calibration:
            run = pretrain(work, f"calibrate-{dtype}-{round_}", {**short, "dtype": dtype}, repo)
            calibration[dtype].append(run["tokens_per_second"])
    speed = {dtype: sum(rates) / len(rates) for dtype, rates in calibration.items()}
    ratio = speed["bfloat16"] / speed["float32"]
    bf16_steps = round(steps * ratio)
    runs = [
        pretrain(work, "float32", {"steps": steps, "dtype": "float32"}, repo),
        pretrain(work, "bfloat16-equal-time", {"steps": bf16_steps, "dtype": "bfloat16"}, repo),
        pretrain(work, "bfloat16-equal-steps", {"steps": steps, "dtype": "bfloat16"}, repo),
    ]
    lines = [
        "### bfloat16 against float32 on this CPU (`bench/bench_cpu_bf16.py`)", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"native bfloat16: {cpu_has_native_bf16()}; torch {torch.__version__}",
        f"- calibration ({calibrate_steps} steps, twice each): float32 "
        f"{speed['float32']:,.0f} tokens/s, bfloat16 {speed['bfloat16']:,.0f} tokens/s: "
        f"**{ratio:.2f}x**",
        "", "| run | steps | val bits/byte | tokens/s | wall s |", "|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(f"| {run['name']} | {run['steps']} | {run['val_bpb']:.4f} | "
                     f"{run['tokens_per_second']:,.0f} | {run['wall']:.0f} |")
    text = "\n".join(lines) + "\n"
    click.echo(text)
    if out is not None:
        out.write_text(text)


if __name__ == "__main__":
    main()
