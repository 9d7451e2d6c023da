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

Usage (from the repository root, after ``dvc repro tokenize``):

    python bench/bench_gpu.py                       # every case
    python bench/bench_gpu.py --cases default,resume --out bench/results-gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

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


def write_params(base: dict, overrides: dict, path: Path) -> None:
    params = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/vocab/tokenizer.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override params.yaml for every case (e.g. a quick CPU smoke "
                        "run: --set train.device=cpu --set train.steps=30)")
    args = parser.parse_args()

    import torch  # after argparse, so --help is instant

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    forced = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    write_params(base, forced, Path(tempfile.mkstemp(suffix=".yaml")[1]))  # validates keys
    for dotted, value in forced.items():
        section, key = dotted.split(".")
        base[section][key] = value
    if forced.get("train.device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA GPU visible")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)"
    peak_note = "bf16 dense peak ~989 TFLOP/s (H100/H200 SXM)"
    rows, notes = [], []
    scratch = Path(tempfile.mkdtemp(prefix="gptpipe-gpu-"))
    results: dict[str, dict] = {}
    for case in args.cases.split(","):
        work = scratch / case
        work.mkdir()
        write_params(base, {**CASES[case], **forced}, work / "params.yaml")
        cmd = stage_command(work, args.tokens, args.tokenizer)
        log = work / "log.txt"
        if case == "resume":
            steps = base["train"]["steps"]
            rc, _, text = run_stage(cmd, log, steps // 3, work / "checkpoint")
            stopped = [line for line in text.splitlines() if "interrupted at step" in line]
            notes.append(f"resume: first run rc={rc}: {stopped[-1] if stopped else text[-300:]}")
            rc, wall, text = run_stage(cmd, work / "log2.txt")
            resumed = [line for line in text.splitlines() if "resuming from step" in line]
            notes.append(f"resume: second run: {resumed[0] if resumed else 'DID NOT RESUME'}")
        else:
            rc, wall, text = run_stage(cmd, log)
        print(text[-1500:], flush=True)
        if rc != 0:
            rows.append(f"| {case} | failed (rc {rc}) | | | | |")
            continue
        metrics = json.loads((work / "metrics.json").read_text())
        speed = json.loads((work / "speed.json").read_text())
        results[case] = metrics
        tflops = speed["gflops_per_second"] / 1e3
        rows.append(
            f"| {case} | {metrics['parameters'] / 1e6:.1f}M | {wall:.1f} s | "
            f"{speed['tokens_per_second']:,.0f} | {tflops:.1f} | {metrics['val_bpb']:.4f} |"
        )
    if "resume" in results and "default" in results:
        diff = results["resume"]["val_loss"] - results["default"]["val_loss"]
        notes.append(f"resume vs default: final val loss differs by {diff:+.5f} nats/token")
    report = "\n".join([
        f"GPU: {gpu}; torch {torch.__version__}; {peak_note}",
        "",
        "| case | parameters | stage wall | train tokens/s | TFLOP/s | val bits/byte |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *[f"- {n}" for n in notes],
    ])
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
