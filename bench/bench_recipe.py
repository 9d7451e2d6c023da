"""The training recipe, chosen by measurement: each option alone and in combination, by seed.

Purpose. gptpipe's ``model`` and ``train`` sections hold the options of the modern recipes
(Muon, QK-norm, ReLU², an untied head, logit soft-capping, value embeddings, the wsd
schedule). This script trains named configurations (:data:`CONFIGS`: today's recipe, the
``baseline``, with some keys changed) on the project's own tokens and reports, for each,
the val bits per byte its training budget buys, its speed and its wall time.

Method, made to hold on a machine shared with other work (bench/README.md, "Recipe"):

1. **Speed, by CPU time.** ``--calibrate-steps`` steps of each configuration, one after
   the other in one child process that runs the trainer
   (``pipeline.lm.training.Trainer``) with ``--threads`` threads; the median CPU time
   (user + system, ``time.process_time``) of its steps after the first
   ``--warmup-steps``, divided by the threads, is its cost. ``--rounds`` rounds, and each
   configuration's median over them is kept: other processes stretch wall time, far less
   a process's own CPU time.
2. **Equal time.** With ``--equal time`` a configuration trains
   round(reference steps x reference cost / its cost) steps: what its speed fits in the
   time the reference (``--reference``, ``train.steps`` steps) takes. With ``--equal
   steps`` every configuration trains the reference's steps.
3. **Quality.** Each (configuration, seed) runs the pretrain stage's own command
   (``python -m pipeline.cli pretrain``, this checkout's code) with its params; its val
   bits per byte is the stage's (the best checkpoint on the whole val split). The CPU
   and wall time of the run are recorded beside it.

Every finished run is appended to ``--results`` (JSON lines) as it ends, and a run found
there is not run again: a campaign stopped half-way goes on where it stopped. The report
gives each configuration's mean over the seeds with its sample standard deviation.

Usage (from the repository root, after ``dvc repro tokenize``; one run is minutes)::

    .venv/bin/python bench/bench_recipe.py --configs baseline,muon,wsd --seeds 1337 \\
        --results bench/recipe.jsonl --out bench/results-recipe.md
    .venv/bin/python bench/bench_recipe.py --configs recipe --seeds 1337,7,42 --equal time
    .venv/bin/python bench/bench_recipe.py --smallest --repo path/to/a/tiny/project
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from common import REPO_ROOT as ROOT
from common import cpu_name, git_commit, md_table, publish, work_dir_and_out, work_folder

from pipeline.core.io import read_json

# Today's recipe (params.yaml before these options), spelled out so that a configuration
# means the same after the defaults change.
BASELINE: dict[str, Any] = {
    "model.mlp": "swiglu", "model.qk_norm": False, "model.tie_embeddings": True,
    "model.logit_softcap": 0.0, "model.value_embeddings": False,
    "train.optimizer": "adamw", "train.schedule": "cosine", "train.lr": 0.003,
    "train.min_lr": 0.0003, "train.warmup_steps": 50, "train.batch_size": 16,
    "train.steps": 900, "train.weight_decay": 0.1, "train.decay_fraction": 0.2,
    "train.muon_lr": 0.02, "train.muon_momentum": 0.95, "train.muon_weight_decay": 0.0,
    "train.muon_ns_steps": 5,
}
MUON = {"train.optimizer": "muon", "train.muon_lr": 0.02}
WSD = {"train.schedule": "wsd", "train.decay_fraction": 0.5}
# name -> the keys it changes in BASELINE.
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "muon": MUON,
    "muon-lr0.01": {**MUON, "train.muon_lr": 0.01},
    "muon-lr0.04": {**MUON, "train.muon_lr": 0.04},
    "wsd": WSD,
    "qk-norm": {"model.qk_norm": True},
    "relu2": {"model.mlp": "relu2"},
    "untied": {"model.tie_embeddings": False},
    "softcap": {"model.logit_softcap": 15.0},
    "value-embeddings": {"model.value_embeddings": True},
    "muon-wsd": {**MUON, **WSD},
    "muon-wsd-qk": {**MUON, **WSD, "model.qk_norm": True},
    "muon-wsd-qk-untied": {**MUON, **WSD, "model.qk_norm": True,
                           "model.tie_embeddings": False},
    "muon-b32": {**MUON, "train.batch_size": 32},
    "baseline-b32": {"train.batch_size": 32},
}
SMALLEST = {"configs": "baseline,muon-wsd-qk", "seeds": "3", "calibrate_steps": 3,
            "warmup_steps": 1, "rounds": 1, "threads": 1}


def params_for(repo: Path, name: str, seed: int, steps: int | None, threads: int,
               base: dict[str, Any]) -> dict[str, Any]:
    """The params mapping of configuration ``name``: the repository's params.yaml with
    ``base`` (BASELINE, or nothing for --smallest), the configuration's keys, the seed,
    the budget and the threads; one evaluation and one snapshot, at the end."""
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    changes = {**base, **CONFIGS[name], "train.seed": seed, "train.threads": threads}
    if steps is not None:
        changes["train.steps"] = steps
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    train = params["train"]
    train.update(eval_every=train["steps"], checkpoint_every=train["steps"],
                 device="cpu", tokens=0)
    init_from = Path(train["init_from"])
    if not init_from.is_absolute():
        train["init_from"] = str(repo / init_from)
    return params


# ------------------------------------------------------------------------------ speed


def child_speed(params_files: list[Path], tokens: Path, steps: int, warmup: int) -> None:
    """In the child process: for each params file in turn, train ``warmup + steps`` steps
    and print one JSON line with the median CPU and wall seconds of its last ``steps``
    steps. One process for all, so its start-up (imports, token data) is paid once."""
    from pipeline.core.device import setup_runtime
    from pipeline.core.params import load_params
    from pipeline.data.shards import read_meta, read_tokens
    from pipeline.lm.training import Trainer

    meta = read_meta(tokens)
    train_tokens, val_tokens = read_tokens(tokens / "train"), read_tokens(tokens / "val")
    runtime = None
    for params_file in params_files:
        params = load_params(params_file)
        runtime = runtime or setup_runtime("cpu", params.train.dtype, params.train.threads,
                                           60.0)
        stamps: list[tuple[float, float]] = []
        trainer = Trainer(params.model, params.train, runtime, train_tokens, val_tokens,
                          int(meta["vocab_size"]), {"tokens": tokens},
                          params_file.parent / "state", {})
        trainer.fit(lambda log, stamps=stamps: stamps.append((time.process_time(),
                                                              time.perf_counter())),
                    lambda step, loss: None)
        timed = list(zip(stamps[warmup:], stamps[warmup + 1:], strict=False))
        print(json.dumps({
            "params": str(params_file),
            "cpu_per_step": statistics.median(b[0] - a[0] for a, b in timed)
            / params.train.threads,
            "wall_per_step": statistics.median(b[1] - a[1] for a, b in timed),
            "tokens_per_step": trainer.tokens_per_step}), flush=True)


def calibrate(names: list[str], work: Path, repo: Path, args: dict) -> dict[str, dict]:
    """Each configuration's cost per step: the median over ``rounds`` rounds (those found in
    ``--results`` count), each round measuring the configurations one after the other."""
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for found in finished_runs(args["results"], "speed"):
        if found["config"] in samples and found["threads"] == args["threads"]:
            samples[found["config"]].append(found)
    total = args["calibrate_steps"] + args["warmup_steps"] + 1
    files: list[tuple[str, Path]] = []
    for round_ in range(args["rounds"]):
        for name in names:
            if len(samples[name]) > round_:
                continue
            folder = work / f"speed-{name}-{round_}"
            folder.mkdir(parents=True)
            params = params_for(repo, name, 1337, total, args["threads"], args["base"])
            params["train"]["warmup_steps"] = 0  # any schedule fits; speed is the same
            (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            files.append((name, folder / "params.yaml"))
    if not files:
        return _medians(samples)
    command = [sys.executable, __file__, "--repo", str(repo),
               "--calibrate-steps", str(args["calibrate_steps"]),
               "--warmup-steps", str(args["warmup_steps"])]
    for _, path in files:
        command += ["--child-speed", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env=_env(args["threads"]))
    for (name, _), line in zip(files, process.stdout, strict=False):
        measured = json.loads(line)
        measured.pop("params")
        samples[name].append({"kind": "speed", "config": name, "threads": args["threads"],
                              "changes": CONFIGS[name], **measured})
        record(args["results"], samples[name][-1])
        click.echo(f"[speed] {name}: {measured}", err=True)
    if process.wait():
        raise click.ClickException("the speed calibration failed (its error is above)")
    return _medians(samples)


def _medians(samples: dict[str, list[dict]]) -> dict[str, dict]:
    keys = ("cpu_per_step", "wall_per_step", "tokens_per_step")
    return {name: {key: statistics.median(s[key] for s in runs) for key in keys}
            for name, runs in samples.items()}


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


# ---------------------------------------------------------------------------- quality


def train_run(name: str, seed: int, steps: int, work: Path, repo: Path, args: dict) -> dict:
    """One pretrain stage run of configuration ``name``; its metrics and times."""
    folder = work / f"{name}-seed{seed}-steps{steps}"
    folder.mkdir(parents=True)
    params = params_for(repo, name, seed, steps, args["threads"], args["base"])
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "pipeline.cli", "pretrain", "--params",
               str(folder / "params.yaml"), "--tokens", str(repo / "data/tokens"),
               "--tokenizer", str(repo / "data/vocab/tokenizer.json"),
               "--out", str(folder / "models"), "--checkpoint", str(folder / "checkpoint"),
               "--live", str(folder / "live"), "--metrics", str(folder / "metrics.json"),
               "--speed", str(folder / "speed.json")]
    click.echo(f"[train] {name} seed {seed}, {steps} steps", err=True)
    started, before = time.perf_counter(), _children_cpu()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                            env=_env(args["threads"]))
    if result.returncode:
        raise click.ClickException(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
    metrics = read_json(folder / "metrics.json")
    return {"kind": "train", "config": name, "seed": seed, "steps": steps,
            "val_bpb": metrics["val_bpb"], "best_step": metrics["best_step"],
            "parameters": metrics["parameters"],
            "wall": round(time.perf_counter() - started, 1),
            "cpu": round(_children_cpu() - before, 1), "changes": CONFIGS[name]}


def _children_cpu() -> float:
    """User + system seconds of every finished child so far (runs go one at a time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def finished_runs(results: Path | None, kind: str = "train") -> list[dict]:
    """The records of ``kind`` (train, speed) in the results file."""
    if results is None or not results.is_file():
        return []
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [found for found in records if found.get("kind") == kind]


def record(results: Path | None, run: dict) -> None:
    if results is not None:
        with results.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(run, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- report


def summary(runs: list[dict]) -> tuple[float, float | None, int]:
    """(mean val bpb, sample standard deviation or None for one run, runs)."""
    values = [run["val_bpb"] for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), spread, len(values)


def report(names: list[str], speeds: dict[str, dict], runs: list[dict], args: dict) -> str:
    reference = speeds.get(args["reference"])
    rows = []
    for name in names:
        steps = args["steps_of"][name]
        done = [run for run in runs if run["config"] == name and run["steps"] == steps]
        if not done:
            continue
        mean, spread, count = summary(done)
        speed = speeds.get(name)
        per_cpu = relative = "-"
        if speed:
            per_cpu = f"{speed['tokens_per_step'] / speed['cpu_per_step']:,.0f}"
            relative = f"{reference['cpu_per_step'] / speed['cpu_per_step']:.3f}"
        changes = ", ".join(f"{k.split('.')[1]}={v}" for k, v in CONFIGS[name].items())
        rows.append([name, steps, f"{mean:.4f}", "-" if spread is None else f"{spread:.4f}",
                     count, per_cpu, relative, changes or "-"])
    header = [
        "# Recipe", "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_name()}, {os.cpu_count()} cores; {args['threads']} torch thread(s) "
        f"per run; Python {platform.python_version()}, torch {torch.__version__}",
        f"- gptpipe commit: {git_commit()}",
        f"- budget: equal {args['equal']} to {args['reference']} "
        f"({args['steps_of'].get(args['reference'])} steps); seeds {args['seeds']}", "",
    ]
    table = md_table(["config", "steps", "val bpb (mean)", "sd", "seeds", "tokens per CPU s",
                      "speed vs reference", "changes"], rows)
    return "\n".join(header) + "\n" + table + "\n"


@click.command()
@click.option("--configs", default="baseline,muon", show_default=True,
              help=f"Comma-separated names of {', '.join(CONFIGS)}.")
@click.option("--seeds", default="1337", show_default=True, help="Comma-separated seeds.")
@click.option("--equal", type=click.Choice(["steps", "time"]), default="steps",
              show_default=True, help="What the configurations share with the reference.")
@click.option("--reference", default="baseline", show_default=True)
@click.option("--steps", type=int, help="The reference's steps (default: its params').")
@click.option("--calibrate-steps", type=int, default=30, show_default=True)
@click.option("--warmup-steps", type=int, default=5, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=ROOT,
              help="The project whose data/tokens and params.yaml are used.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON lines of finished runs: appended to, and read to skip them.")
@click.option("--smallest", is_flag=True, help="Check that the script works (seconds).")
@click.option("--child-speed", "child_params", multiple=True, hidden=True,
              type=click.Path(dir_okay=False, path_type=Path))
@work_dir_and_out
def main(configs, seeds, equal, reference, steps, calibrate_steps, warmup_steps, rounds,
         threads, repo, results, smallest, child_params, work_dir, out) -> None:
    """Train named configurations, by seed, and report their val bits per byte."""
    if child_params:
        return child_speed(list(child_params), repo / "data/tokens", calibrate_steps,
                           warmup_steps)
    args = dict(configs=configs, seeds=seeds, calibrate_steps=calibrate_steps,
                warmup_steps=warmup_steps, rounds=rounds, threads=threads)
    if smallest:
        args.update(SMALLEST)
    names = args["configs"].split(",")
    unknown = [name for name in [*names, reference] if name not in CONFIGS]
    if unknown:
        raise click.ClickException(f"--configs: no configuration {unknown[0]!r}; allowed: "
                                   f"{', '.join(CONFIGS)}")
    args.update(equal=equal, reference=reference, base={} if smallest else BASELINE,
                results=results,
                seeds=[int(seed) for seed in args["seeds"].split(",")])
    work = work_folder("recipe-", work_dir)
    reference_steps = steps or params_for(repo, reference, 0, None, 1,
                                          args["base"])["train"]["steps"]
    wanted = [reference, *[name for name in names if name != reference]]
    speeds = calibrate(wanted, work, repo, args) if equal == "time" or smallest else {}
    steps_of = {name: reference_steps if equal == "steps" else max(1, round(
        reference_steps * speeds[reference]["cpu_per_step"] / speeds[name]["cpu_per_step"]))
        for name in wanted}
    args["steps_of"] = steps_of
    runs = finished_runs(results)
    for name in names:
        for seed in args["seeds"]:
            if any(r["config"] == name and r["seed"] == seed and r["steps"] == steps_of[name]
                   for r in runs):
                continue
            run = train_run(name, seed, steps_of[name], work, repo, args)
            record(results, run)
            runs.append(run)
    publish(report(names, speeds, runs, args), out)


if __name__ == "__main__":
    main()
