"""The pretrain stage's GPU path, run for real: bf16 autocast, TF32, torch.compile, resume.

Runs ``python -m pipeline.cli pretrain`` (the exact command of the dvc.yaml stage) on
already tokenized data, once per case, each in its own work folder, and prints a
Markdown table of wall time, tokens/s, achieved TFLOP/s and val bits per byte:

- ``default``: params.yaml as it is (the CPU-sized 4 x 256 model), on ``cuda``;
- ``default+compile``: the same with ``train.compile: true``;
- ``resume``: the ``default`` case stopped with Ctrl-C (SIGINT) once a snapshot past a
  third of the run exists, then run again: it must say "resuming from step N" and end
  with a val loss close to the uninterrupted run's (GPU kernels are not bit-exact, so
  the difference is printed rather than required to be zero);
- ``gpt2-shape``: 12 layers x 768 wide, 12 heads, context 1024, batch 16, compiled, a
  short run: does a GPT-2-small-sized step fit and how fast is it (the vocabulary is the
  tokenized data's, so the parameter count differs from GPT-2's 124M).

``--smallest`` checks that the script works without a GPU: every case on the CPU,
without torch.compile, at the tiny params' model and budget (``tests/tiny_params.yaml``).

Usage (from the repository root, after ``dvc repro tokenize``):

    python bench/bench_gpu.py                       # every case
    python bench/bench_gpu.py --cases default,resume --out bench/results-gpu.md
    python bench/bench_gpu.py --smallest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import REPO_ROOT as ROOT
from common import TINY_PARAMS, publish, set_params, work_folder

from pipeline.core.io import read_json

# --smallest: on the CPU, not compiled, the tiny model and budget.
SMALLEST = {"train.device": "cpu", "train.compile": False,
            **{key: value for key, value in TINY_PARAMS.items()
               if key.startswith(("model.", "train."))}}

CASES = {
    "default": {"train.device": "cuda"},
    "default+compile": {"train.device": "cuda", "train.compile": True},
    "resume": {"train.device": "cuda"},
    "gpt2-shape": {
        "train.device": "cuda", "train.compile": True, "model.n_layer": 12,
        "model.n_head": 12, "model.n_embd": 768, "model.context": 1024,
        "train.batch_size": 16, "train.lr": 6e-4, "train.min_lr": 6e-5,
        "train.warmup_steps": 10, "train.steps": 120, "train.eval_every": 120,
        "train.eval_windows": 32, "train.checkpoint_every": 120,
    },
}


def stage_command(work: Path, tokens: Path, tokenizer: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "pretrain", "--params", str(work / "params.yaml"),
        "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(work / "model"),
        "--checkpoint", str(work / "checkpoint"), "--live", str(work / "live"),
        "--metrics", str(work / "metrics.json"), "--speed", str(work / "speed.json"),
    ]


def run_stage(cmd: list[str], log: Path, stop_after_step: int | None = None,
              checkpoint: Path | None = None) -> tuple[int, float, str]:
    """Run the stage; with stop_after_step, send SIGINT once a snapshot that far exists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        if stop_after_step is not None:
            info = checkpoint / "snapshot" / "state.json"
            while proc.poll() is None:
                if info.exists():
                    try:
                        step = json.loads(info.read_text())["step"]
                    except (ValueError, KeyError):
                        step = 0
                    if step >= stop_after_step:
                        proc.send_signal(signal.SIGINT)
                        break
                time.sleep(0.05)
        rc = proc.wait()
    return rc, time.perf_counter() - started, log.read_text()


def run_case(case: str, work: Path, forced: dict, args: argparse.Namespace,
             notes: list[str]) -> tuple[str, dict | None]:
    """One case in ``work``: its table row and its metrics (None when it failed)."""
    work.mkdir()
    shutil.copyfile(ROOT / "params.yaml", work / "params.yaml")
    set_params(work / "params.yaml", {**CASES[case], **forced})
    cmd = stage_command(work, args.tokens, args.tokenizer)
    if case == "resume":
        steps = yaml.safe_load((work / "params.yaml").read_text())["train"]["steps"]
        rc, _, text = run_stage(cmd, work / "log.txt", steps // 3, work / "checkpoint")
        stopped = [line for line in text.splitlines() if "interrupted" in line]
        notes.append(f"resume: first run rc={rc}: {stopped[-1] if stopped else text[-300:]}")
        rc, wall, text = run_stage(cmd, work / "log2.txt")
        resumed = [line for line in text.splitlines() if "resuming from step" in line]
        notes.append(f"resume: second run: {resumed[0] if resumed else 'DID NOT RESUME'}")
    else:
        rc, wall, text = run_stage(cmd, work / "log.txt")
    print(text[-1500:], file=sys.stderr, flush=True)
    if rc != 0:
        return f"| {case} | failed (rc {rc}) | | | | |", None
    metrics = read_json(work / "metrics.json")
    speed = read_json(work / "speed.json")
    if speed.get("tokens_per_second") is None:
        # A resumed run that found its snapshot finished (the stop signal came after the
        # last step: a tiny run on a fast machine) trained no step, so it has no speed.
        return (f"| {case} | {metrics['parameters'] / 1e6:.1f}M | {wall:.1f} s | "
                f"no step trained | | {metrics['val_bpb']:.4f} |", metrics)
    tflops = speed["gflops_per_second"] / 1e3
    return (f"| {case} | {metrics['parameters'] / 1e6:.1f}M | {wall:.1f} s | "
            f"{speed['tokens_per_second']:,.0f} | {tflops:.1f} | {metrics['val_bpb']:.4f} |",
            metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/vocab/tokenizer.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where to make the scratch folder (default: the system temp)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override params.yaml for every case (e.g. a quick CPU smoke "
                        "run: --set train.device=cpu --set train.steps=30)")
    parser.add_argument("--smallest", action="store_true",
                        help="every case on the CPU, not compiled, at the tiny params: a "
                        "check that the script works, not a measurement")
    args = parser.parse_args()

    import torch  # after argparse, so --help is instant

    forced = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.smallest:
        forced = {**SMALLEST, **forced}
    unknown = [case for case in args.cases.split(",") if case not in CASES]
    if unknown:
        parser.error(f"--cases {unknown[0]}; allowed: {', '.join(CASES)}")
    if forced.get("train.device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA GPU visible")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)"
    scratch = work_folder("gptpipe-gpu-", args.work_dir)
    rows, notes, results = [], [], {}
    for case in args.cases.split(","):
        row, results[case] = run_case(case, scratch / case, forced, args, notes)
        rows.append(row)
    if results.get("resume") and results.get("default"):
        diff = results["resume"]["val_loss"] - results["default"]["val_loss"]
        notes.append(f"resume vs default: final val loss differs by {diff:+.5f} nats/token")
    publish("\n".join([
        f"GPU: {gpu}; torch {torch.__version__}; bf16 dense peak ~989 TFLOP/s (H100/H200 SXM)",
        "",
        "| case | parameters | stage wall | train tokens/s | TFLOP/s | val bits/byte |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *[f"- {n}" for n in notes],
    ]), args.out)


if __name__ == "__main__":
    main()
