"""Pretraining speed against nanoGPT: the same shape, batch and precision, both timed.

Purpose. nanoGPT (karpathy/nanoGPT) is the usual yardstick for a small GPT's training
speed on one GPU. This script trains both, one after the other, on gptpipe's own token
data and reports steady-state time per iteration, tokens per second and model FLOPs
utilization (MFU) for each, and their ratio. No nanoGPT code is copied into gptpipe:
nanoGPT's own ``train.py`` runs as a subprocess in the checkout given with ``--nanogpt``.

Usage (from the repository root, after ``dvc repro tokenize``; defaults = GPT-2 small as
nanoGPT trains it: 12 layers x 768 wide, 12 heads, context 1024, micro-batch 12 x 40
accumulation steps = 491,520 tokens per iteration, bfloat16 autocast, compiled, on cuda):

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python bench/bench_vs_nanogpt.py --nanogpt /tmp/nanoGPT --out bench/results-nanogpt.md

    # a CPU smoke run of the whole path (seconds of training; MFU against a made-up peak)
    python bench/bench_vs_nanogpt.py --nanogpt /tmp/nanoGPT --device cpu --dtype float32 \\
        --no-compile --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --batch-size 4 \\
        --grad-accum 1 --iters 15 --warmup-iters 5 --peak-tflops 1 --cpu-threads 1

    # the smallest run, a check that the script works: a tiny shape on the CPU, 4
    # iterations; without --nanogpt only gptpipe runs and the report says nanoGPT did not
    python bench/bench_vs_nanogpt.py --smallest [--nanogpt /tmp/nanoGPT]

Other options: ``--timeout`` (seconds per side), ``--keep`` (keep the work folder: both
logs, gptpipe's params, dvclive log and model), ``--dataset-name``. On a CPU shared with
other work, ``--cpu-threads 1`` (OMP_NUM_THREADS for both runs, and ``train.threads``)
keeps a tiny model's many small multi-threaded ops from waiting on a descheduled thread,
which otherwise decides the timings (bench/README.md).

What runs:

1. The token data. ``--tokens`` is gptpipe's token folder (``meta.json`` and one folder
   per split). nanoGPT reads ``<nanogpt>/data/<dataset>/{train,val}.bin``: raw uint16
   token ids. Where a split folder holds ``tokens.bin`` (the same raw ids) it is
   symlinked there; otherwise the split's Parquet shards are written out as one ``.bin``
   file (gptpipe's own shard reader, so the ids are the ones gptpipe trains on). A
   ``meta.pkl`` holding ``vocab_size`` makes nanoGPT build the same vocabulary size.
   The dataset folder is ``<nanogpt>/data/gptpipe`` (``--dataset-name``).
2. nanoGPT: ``python train.py --dataset=gptpipe --n_layer=... --block_size=...
   --batch_size=... --gradient_accumulation_steps=... --dtype=... --compile=...
   --device=... --max_iters=ITERS-1`` (nanoGPT runs iterations 0 to max_iters inclusive)
   ``--eval_interval=10**9 --eval_iters=1`` (it still evaluates once, at iteration 0,
   which is a warm-up iteration) ``--log_interval=1 --always_save_checkpoint=False
   --bias=False --dropout=0.0`` and ``--out_dir`` in the work folder, from the nanoGPT
   folder. Its log lines ``iter N: loss X, time Yms, mfu Z%`` give each iteration's time.
3. gptpipe: ``python -m pipeline.cli pretrain`` (the command of the dvc.yaml stage, this
   checkout's code) with a params file in the work folder: the same shape, batch,
   accumulation, device, dtype and compile, ``train.steps`` = ITERS, the closest GPT-2
   configuration its ``model`` section allows (``positions: learned``, ``norm:
   layernorm``, ``mlp: gelu``, ``bias: false``, ``dropout: 0.0``), nanoGPT's optimizer
   settings (lr 6e-4, weight decay 0.1, betas 0.9/0.95, clip 1.0), one evaluation and
   one snapshot at the end only (both outside the timed steps) and ``train.log_every: 1``.
   Each step's tokens/s comes from its dvclive log (``tokens_per_second``, a CUDA
   synchronize before each reading); the stage's ``--speed`` JSON figure (every step but
   the first) is printed beside it as a cross-check.

What each figure means:

- **ms/iter**: the median time of one iteration (one optimizer step over
  batch_size x grad_accum sequences of block_size tokens: forward, backward, clip, AdamW,
  the next batch's loading), over the iterations after the first ``--warmup-iters``
  (torch.compile, CUDA kernel selection, nanoGPT's iteration-0 evaluation).
- **tokens/s** = batch_size x block_size x grad_accum / (ms/iter / 1000).
- **model FLOPs per token** = 6 N + 12 n_layer n_embd block_size (PaLM, appendix B; the
  formula of nanoGPT's ``estimate_mfu`` and of gptpipe's ``GPT.flops_per_token``), where N
  counts every parameter but the position table, the token embedding included (it is
  tied to the output layer, so its matmul is done): N = vocab n_embd + n_layer (12 n_embd^2
  + 2 n_embd) + n_embd for this bias-free LayerNorm GPT. It is the model's matmul work,
  whatever the implementation does (activation recomputation would not count).
- **TFLOP/s** = FLOPs per token x tokens/s / 1e12.
- **MFU** = TFLOP/s / the device's peak: the dense (no sparsity) bfloat16 tensor-core
  peak of the GPU by name from :data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``. With
  ``--dtype float32`` the MFU is still against the bfloat16 peak (as nanoGPT does). On a
  CPU, or a GPU not in the table, MFU is n/a unless ``--peak-tflops`` is given.
- **gptpipe / nanoGPT**: gptpipe's tokens/s over nanoGPT's (above 1: gptpipe is faster).

The learning rate schedules differ (nanoGPT warms up over 2000 iterations, gptpipe over
the run) and the losses are not compared: this measures speed only. Run it alone on the
machine; the two runs go one after the other on the same device.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml
from common import REPO_ROOT as ROOT
from common import cpu_name, git_commit, publish, work_folder

from pipeline.core.io import read_json

RANDOM_INIT = ROOT / "data" / "builtin" / "random.init"
# --smallest: the options it sets, a shape and budget of seconds on the CPU.
SMALLEST = {"device": "cpu", "dtype": "float32", "use_compile": False, "n_layer": 1,
            "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 2, "grad_accum": 1,
            "iters": 4, "warmup_iters": 1, "cpu_threads": 1}

# Dense (no structured sparsity) bfloat16 tensor-core peaks from NVIDIA's datasheets, in
# TFLOP/s, matched in order against torch.cuda.get_device_name() (lower case): the
# specific names first (an "H100 PCIe" must not match the H100 SXM row).
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"h100.*pcie", "H100 PCIe", 756.0),
    (r"h100.*nvl", "H100 NVL", 835.0),
    (r"h100", "H100 SXM", 989.0),
    (r"h200", "H200 / GH200", 989.0),
    (r"h800", "H800 SXM", 989.0),
    (r"b200", "B200", 2250.0),
    (r"a100", "A100", 312.0),
    (r"a800", "A800", 312.0),
    (r"l40s", "L40S", 362.0),
    (r"\bl40\b", "L40", 181.0),
    (r"\bl4\b", "L4", 121.0),
    (r"\ba10\b", "A10", 125.0),
    (r"rtx a6000", "RTX A6000", 155.0),
    (r"rtx 4090", "GeForce RTX 4090", 165.0),
)

NANOGPT_ITER_LINE = re.compile(
    r"^iter (?P<iter>\d+): loss (?P<loss>\S+), time (?P<ms>[\d.]+)ms, mfu (?P<mfu>-?[\d.]+)%",
    re.MULTILINE,
)
# nanoGPT's configure_optimizers prints its two parameter groups, position table included.
NANOGPT_GROUP_LINE = re.compile(r"^num (?:non-)?decayed parameter tensors: \d+, with "
                                r"(?P<count>[\d,]+) parameters", re.MULTILINE)


@dataclass(frozen=True)
class Shape:
    """The model and batch both runs share."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    grad_accum: int
    vocab_size: int

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def counted_params(self) -> int:
        """N of the FLOPs formula: every parameter but the position table (bias-free
        LayerNorm GPT-2 with a tied token embedding), as nanoGPT's get_num_params()."""
        per_layer = 12 * self.n_embd**2 + 2 * self.n_embd  # qkv, proj, mlp; two norm gains
        return self.vocab_size * self.n_embd + self.n_layer * per_layer + self.n_embd

    @property
    def total_params(self) -> int:
        """Every parameter, the position table included."""
        return self.counted_params + self.block_size * self.n_embd

    @property
    def flops_per_token(self) -> int:
        attention = 12 * self.n_layer * self.n_embd * self.block_size
        return 6 * self.counted_params + attention


@dataclass
class SideResult:
    """One side's timings and what its own log said."""

    name: str
    iteration_ms: list[float]  # every logged iteration, in order
    timed_ms: list[float]  # those after the warm-up
    wall_seconds: float
    log: Path
    total_params: int | None = None  # as the run itself counted them
    notes: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.timed_ms)

    def tokens_per_second(self, shape: Shape) -> float:
        return shape.tokens_per_iter / (self.median_ms / 1000)


def fail(message: str) -> click.ClickException:
    return click.ClickException(message)


# ----------------------------------------------------------------------------- machine
def probe_machine(device: str, cpu_threads: int) -> dict[str, Any]:
    """torch version, the device's name and CUDA availability, read in a child process so
    this one holds no CUDA context while the two runs use the GPU."""
    code = (
        "import json, sys, torch\n"
        "device = sys.argv[1]\n"
        "info = {'torch': torch.__version__, 'cuda_version': torch.version.cuda,\n"
        "        'cuda_available': torch.cuda.is_available(),\n"
        "        'gpu_count': torch.cuda.device_count() if torch.cuda.is_available() else 0,\n"
        "        'threads': torch.get_num_threads(), 'gpu_name': None}\n"
        "if device.startswith('cuda') and info['cuda_available']:\n"
        "    index = int(device.split(':')[1]) if ':' in device else 0\n"
        "    if index < info['gpu_count']:\n"
        "        info['gpu_name'] = torch.cuda.get_device_name(index)\n"
        "print(json.dumps(info))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, device], capture_output=True,
                            text=True, env=child_env(cpu_threads, gptpipe_on_path=False))
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise fail(f"{sys.executable} could not import torch: {last}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    info["cpu"] = cpu_name()
    return info


def check_device(device: str, dtype: str, machine: dict[str, Any]) -> None:
    if device.startswith("cuda"):
        if not machine["cuda_available"]:
            raise fail(f"--device {device}: torch {machine['torch']} sees no CUDA GPU here; "
                       "allowed on this machine: --device cpu --dtype float32 --no-compile")
        if machine["gpu_name"] is None:
            raise fail(f"--device {device}: only {machine['gpu_count']} GPU(s) are visible")
    elif device == "cpu":
        if dtype != "float32":
            raise fail(f"--dtype {dtype} on cpu; allowed: float32 (gptpipe refuses reduced "
                       "precision on a CPU and nanoGPT ignores --dtype there)")
    else:
        raise fail(f"--device {device}; allowed: cuda, cuda:N or cpu")


def resolve_peak(device: str, machine: dict[str, Any],
                 given: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it came from)."""
    if given is not None:
        return given, "given with --peak-tflops"
    if not device.startswith("cuda"):
        return None, "n/a on a CPU (pass --peak-tflops)"
    name = (machine["gpu_name"] or "").lower()
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops, f"{label}, dense bfloat16 (datasheet)"
    return None, f"n/a: {machine['gpu_name']} is not in the peak table (pass --peak-tflops)"


# ----------------------------------------------------------------------------- data
def read_token_meta(tokens: Path) -> dict[str, Any]:
    meta_path = tokens / "meta.json"
    if not meta_path.is_file():
        raise fail(f"--tokens {tokens}: no meta.json; run `dvc repro tokenize` (or gptpipe "
                   "tokenize) first, or name the folder it wrote")
    meta = read_json(meta_path)
    if meta.get("dtype", "uint16") != "uint16":
        raise fail(f"{meta_path}: token ids are {meta.get('dtype')}; nanoGPT reads uint16 "
                   "only (a vocabulary of at most 65,536 tokens)")
    return meta


def split_token_count(tokens: Path, split: str) -> int:
    """How many tokens the split holds, from tokens.bin or the Parquet shards' footers;
    one line naming what is missing when there are neither."""
    folder = tokens / split
    flat = folder / "tokens.bin"
    if flat.is_file():
        return flat.stat().st_size // 2
    shards = sorted(folder.glob("shard-*.parquet"))
    if not shards:
        raise fail(f"{flat}: not found, and no shard-*.parquet beside it; run gptpipe "
                   "tokenize first (it writes train and val)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in shards)
    except (pa.ArrowInvalid, OSError) as err:
        raise fail(f"{folder}: a shard is not Parquet ({err}); re-run gptpipe tokenize") \
            from None


def write_split_bin(tokens: Path, split: str, target: Path) -> str:
    """``target`` = the split's raw uint16 ids: a symlink to tokens.bin, else the Parquet
    shards written out; returns how."""
    if target.is_symlink() or target.exists():
        target.unlink()
    flat = tokens / split / "tokens.bin"
    if flat.is_file():
        target.symlink_to(flat.resolve())
        return f"symlink to {flat}"
    import numpy as np

    from pipeline.core.errors import GptpipeError
    from pipeline.data.shards import iter_shards

    count = 0
    with target.open("wb") as out:
        try:
            for ids in iter_shards(tokens / split):
                np.ascontiguousarray(ids, dtype=np.uint16).tofile(out)
                count += ids.size
        except GptpipeError as err:
            raise fail(str(err)) from None
    return f"{count:,} ids written out from {tokens / split}/shard-*.parquet"


def prepare_nanogpt_dataset(nanogpt: Path, dataset: str, tokens: Path, shape: Shape) -> list[str]:
    folder = nanogpt / "data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    for split in ("train", "val"):
        how = write_split_bin(tokens, split, folder / f"{split}.bin")
        notes.append(f"{folder / (split + '.bin')}: {how}")
    with (folder / "meta.pkl").open("wb") as handle:
        pickle.dump({"vocab_size": shape.vocab_size}, handle)
    return notes


# ----------------------------------------------------------------------------- runs
def run_logged(command: list[str], cwd: Path, log: Path, env: dict[str, str],
               timeout: float, what: str) -> tuple[str, float]:
    """Run ``command`` with its output in ``log``; (output, wall seconds) or one line
    naming the failure, its last output line and the log."""
    started = time.perf_counter()
    with log.open("w") as out:
        try:
            result = subprocess.run(command, cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise fail(f"{what} ran past --timeout ({timeout:.0f} s); its output: {log}") \
                from None
    wall = time.perf_counter() - started
    output = log.read_text(errors="replace")
    if result.returncode:
        lines = [line for line in output.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise fail(f"{what} exited {result.returncode}: {last} (full output: {log})")
    return output, wall


def child_env(cpu_threads: int, gptpipe_on_path: bool) -> dict[str, str]:
    """The children's environment: unbuffered output, the CPU thread count if set, and
    this checkout first on gptpipe's path (nanoGPT's has no gptpipe on it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    if gptpipe_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_nanogpt(nanogpt: Path, dataset: str, shape: Shape, options: dict[str, Any],
                work: Path) -> SideResult:
    command = [
        sys.executable, "train.py", f"--dataset={dataset}",
        f"--n_layer={shape.n_layer}", f"--n_head={shape.n_head}", f"--n_embd={shape.n_embd}",
        f"--block_size={shape.block_size}", f"--batch_size={shape.batch_size}",
        f"--gradient_accumulation_steps={shape.grad_accum}",
        f"--dtype={options['dtype']}", f"--compile={options['compile']}",
        f"--device={options['device']}", f"--max_iters={options['iters'] - 1}",
        "--eval_interval=1000000000", "--eval_iters=1", "--log_interval=1",
        "--always_save_checkpoint=False", f"--out_dir={work / 'nanogpt-out'}",
        "--bias=False", "--dropout=0.0", "--wandb_log=False", "--init_from=scratch",
    ]
    log = work / "nanogpt.log"
    env = child_env(options["cpu_threads"], gptpipe_on_path=False)
    output, wall = run_logged(command, nanogpt, log, env, options["timeout"], "nanoGPT train.py")
    matches = list(NANOGPT_ITER_LINE.finditer(output))
    iterations = sorted((int(m["iter"]), float(m["ms"])) for m in matches)
    if len(iterations) != options["iters"]:
        raise fail(f"nanoGPT logged {len(iterations)} iteration lines, expected "
                   f"{options['iters']} ('iter N: loss X, time Yms, mfu Z%'); see {log}")
    groups = [int(m["count"].replace(",", "")) for m in NANOGPT_GROUP_LINE.finditer(output)]
    result = SideResult(
        "nanoGPT", [ms for _, ms in iterations],
        [ms for it, ms in iterations if it >= options["warmup_iters"]], wall, log,
        sum(groups) if len(groups) == 2 else None,
    )
    result.notes.append(f"its own last logged mfu (a running average, against an A100's "
                        f"312 TFLOP/s): {matches[-1]['mfu']}%")
    return result


def gptpipe_params(shape: Shape, options: dict[str, Any]) -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    iters = options["iters"]
    params["model"] = {
        "context": shape.block_size, "n_layer": shape.n_layer, "n_head": shape.n_head,
        "n_embd": shape.n_embd, "dropout": 0.0, "positions": "learned", "norm": "layernorm",
        "mlp": "gelu", "bias": False,
    }
    params["train"].update({
        "init_from": str(RANDOM_INIT), "device": options["device"], "dtype": options["dtype"],
        "compile": options["compile"], "threads": options["cpu_threads"], "nproc_per_node": 1,
        "batch_size": shape.batch_size, "grad_accum": shape.grad_accum, "steps": iters,
        "tokens": 0, "lr": 6e-4, "min_lr": 6e-5, "warmup_steps": iters, "weight_decay": 0.1,
        "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "eval_every": iters,
        "eval_windows": 8, "checkpoint_every": iters, "log_every": 1,
    })
    return params


def run_gptpipe(tokens: Path, tokenizer: Path, shape: Shape, options: dict[str, Any],
                work: Path) -> SideResult:
    folder = work / "gptpipe"
    folder.mkdir()
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(gptpipe_params(shape, options), sort_keys=False))
    command = [
        sys.executable, "-m", "pipeline.cli", "pretrain", "--params", str(params_path),
        "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(folder / "model"),
        "--checkpoint", str(folder / "checkpoint"), "--live", str(folder / "live"),
        "--metrics", str(folder / "metrics.json"), "--speed", str(folder / "speed.json"),
    ]
    log = work / "gptpipe.log"
    env = child_env(options["cpu_threads"], gptpipe_on_path=True)
    _, wall = run_logged(command, folder, log, env, options["timeout"], "gptpipe pretrain")
    steps = read_tokens_per_second(folder / "live" / "plots" / "metrics" / "tokens_per_second.tsv")
    if len(steps) != options["iters"]:
        raise fail(f"gptpipe logged tokens/s for {len(steps)} steps, expected {options['iters']}; "
                   f"see {folder / 'live'}")
    iteration_ms = [shape.tokens_per_iter / rate * 1000 for _, rate in steps]
    # Step s (1-based) is nanoGPT's iteration s - 1: drop the same first warmup_iters.
    timed = [ms for (step, _), ms in zip(steps, iteration_ms, strict=True)
             if step > options["warmup_iters"]]
    metrics = read_json(folder / "metrics.json")
    result = SideResult("gptpipe", iteration_ms, timed, wall, log, metrics.get("parameters"))
    speed = read_json(folder / "speed.json")
    result.notes.append(f"its --speed JSON (every step but the first, mean): "
                        f"{speed['tokens_per_second']:,.0f} tokens/s on {speed['device']}")
    return result


def read_tokens_per_second(tsv: Path) -> list[tuple[int, float]]:
    """(step, tokens/s) rows of gptpipe's dvclive log."""
    if not tsv.is_file():
        raise fail(f"{tsv}: gptpipe's per-step tokens/s log is missing")
    lines = tsv.read_text().splitlines()
    columns = lines[0].split("\t")
    step_at, rate_at = columns.index("step"), columns.index("tokens_per_second")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return sorted((int(row[step_at]), float(row[rate_at])) for row in rows)


# ----------------------------------------------------------------------------- report
def describe_mfu(tflops: float, peak: float | None) -> str:
    return f"{100 * tflops / peak:.1f}%" if peak else "n/a"


def build_report(shape: Shape, options: dict[str, Any], machine: dict[str, Any],
                 peak: float | None, peak_source: str, nanogpt_dir: Path | None,
                 sides: list[SideResult], data_notes: list[str]) -> str:
    device = options["device"]
    device_name = machine["gpu_name"] if device.startswith("cuda") else machine["cpu"]
    torch_line = machine["torch"] + (f", CUDA {machine['cuda_version']}"
                                     if machine["cuda_version"] else "")
    threads = "" if device.startswith("cuda") else f" ({machine['threads']} torch thread(s))"
    lines = [
        "# Pretraining speed: gptpipe vs nanoGPT",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: {device} = {device_name}{threads}; host CPU: {machine['cpu']}",
        f"- torch {torch_line}; Python {platform.python_version()}",
        f"- gptpipe commit {git_commit(ROOT)}; nanoGPT "
        + (f"{nanogpt_dir} at {git_commit(nanogpt_dir)}" if nanogpt_dir else
           "not run: no --nanogpt checkout given"),
        f"- shape: {shape.n_layer} layers x {shape.n_embd} wide, {shape.n_head} heads, "
        f"context {shape.block_size}, vocabulary {shape.vocab_size:,} (the token data's)",
        f"- batch: {shape.batch_size} sequences x {shape.grad_accum} accumulation step(s) = "
        f"{shape.tokens_per_iter:,} tokens per iteration",
        f"- precision: {options['dtype']}"
        f"{' autocast' if options['dtype'] != 'float32' else ''}; "
        f"torch.compile: {'on' if options['compile'] else 'off'}",
        f"- iterations: {options['iters']} per side, the first {options['warmup_iters']} "
        f"dropped; ms/iter is the median of the other {options['iters'] - options['warmup_iters']}",
        f"- model FLOPs per token = 6 N + 12 n_layer n_embd block_size = "
        f"6 x {shape.counted_params:,} + 12 x {shape.n_layer} x {shape.n_embd} x "
        f"{shape.block_size} = {shape.flops_per_token / 1e6:,.2f} MFLOP (N: every parameter "
        "but the position table; PaLM appendix B, as nanoGPT's estimate_mfu)",
        f"- peak: {f'{peak:g} TFLOP/s' if peak else 'none'} ({peak_source}); "
        "MFU = FLOPs per token x tokens/s / peak",
        "",
        "| side | ms/iter (median) | min-max ms | tokens/s | TFLOP/s | MFU | run wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rates = {}
    for side in sides:
        rate = side.tokens_per_second(shape)
        rates[side.name] = rate
        tflops = shape.flops_per_token * rate / 1e12
        lines.append(
            f"| {side.name} | {side.median_ms:,.1f} | {min(side.timed_ms):,.1f}-"
            f"{max(side.timed_ms):,.1f} | {rate:,.0f} | {tflops:,.3g} | "
            f"{describe_mfu(tflops, peak)} | {side.wall_seconds:,.1f} |"
        )
    if "nanoGPT" in rates and "gptpipe" in rates:
        ratio = rates["gptpipe"] / rates["nanoGPT"]
        lines += ["", f"**gptpipe / nanoGPT tokens/s: {ratio:.3f}x** "
                      f"({'gptpipe faster' if ratio > 1 else 'nanoGPT faster'})"]
    lines += ["", "Notes:", ""]
    counts = ", ".join(
        f"{side.name} {side.total_params:,}" if side.total_params is not None
        else f"{side.name} not read" for side in sides
    )
    same = all(side.total_params == shape.total_params for side in sides)
    lines.append(f"- parameters, position table included: {counts} (nanoGPT: its optimizer's "
                 f"two groups; gptpipe: its metrics JSON); the formula's N + block_size n_embd "
                 f"= {shape.total_params:,}: {'all equal' if same else 'NOT ALL EQUAL'}")
    for side in sides:
        lines += [f"- {side.name}: {note}" for note in side.notes]
    lines += [f"- data: {note}" for note in data_notes]
    lines += [
        "- gptpipe model params: positions learned, norm layernorm, mlp gelu, bias false, "
        "dropout 0.0 (the closest GPT-2 configuration it has). Remaining differences: gptpipe's "
        "GELU is the tanh approximation (nanoGPT's is exact); nanoGPT samples batches from a "
        "re-opened np.memmap (pinned on CUDA), gptpipe from its WindowSampler; gptpipe fuses "
        "AdamW on CPU too (nanoGPT only on CUDA); gptpipe's step time leaves out its logging "
        "call (a dvclive row), nanoGPT's includes its print; TF32 matmuls are on in both.",
        f"- logs: {', '.join(str(side.log) for side in sides)}"
        + (" (kept)" if options["keep"] else " (deleted with the work folder)"),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nanogpt", "nanogpt_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A checkout of karpathy/nanoGPT (its train.py is run from there); "
                   "required but with --smallest.")
@click.option("--tokens", default=Path("data/tokens"), show_default=True,
              type=click.Path(path_type=Path), help="gptpipe's token folder.")
@click.option("--tokenizer", default=Path("data/vocab/tokenizer.json"), show_default=True,
              type=click.Path(path_type=Path), help="The tokenizer the tokens were made with.")
@click.option("--n-layer", default=12, show_default=True, type=click.IntRange(min=1))
@click.option("--n-head", default=12, show_default=True, type=click.IntRange(min=1))
@click.option("--n-embd", default=768, show_default=True, type=click.IntRange(min=1))
@click.option("--block-size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Context in tokens.")
@click.option("--batch-size", default=12, show_default=True, type=click.IntRange(min=1),
              help="Sequences per micro-batch.")
@click.option("--grad-accum", default=40, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--compile/--no-compile", "use_compile", default=True, show_default=True)
@click.option("--iters", default=50, show_default=True, type=click.IntRange(min=2),
              help="Optimizer steps per side.")
@click.option("--warmup-iters", default=10, show_default=True, type=click.IntRange(min=0),
              help="First iterations left out of the steady-state median.")
@click.option("--cpu-threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="--device cpu: torch threads of both runs (OMP_NUM_THREADS and "
                   "train.threads); 0: torch's default.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The device's peak TFLOP/s for MFU (default: the GPU table; none on CPU).")
@click.option("--dataset-name", default="gptpipe", show_default=True,
              help="nanoGPT dataset folder to write: <nanogpt>/data/<name>.")
@click.option("--timeout", default=3600.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds each side may run.")
@click.option("--smallest", is_flag=True,
              help="A tiny shape on the CPU for 4 iterations (it sets the shape, batch, "
                   "device, dtype, compile and iteration options): a check that the script "
                   "works, not a measurement.")
@click.option("--keep", is_flag=True, help="Keep the work folder (logs, params, models).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Markdown report to this file.")
def main(**options: Any) -> None:
    """Time pretraining in nanoGPT and in gptpipe at the same shape; print a Markdown report."""
    if options["smallest"]:
        options.update(SMALLEST)
    elif options["nanogpt_dir"] is None:
        raise click.UsageError("--nanogpt is required (a checkout of karpathy/nanoGPT), "
                               "except with --smallest")
    nanogpt_dir = options["nanogpt_dir"] and options["nanogpt_dir"].resolve()
    tokens, tokenizer = options["tokens"].resolve(), options["tokenizer"].resolve()
    check_options(options, nanogpt_dir, tokenizer)
    meta = read_token_meta(tokens)
    for split in ("train", "val"):
        count = split_token_count(tokens, split)
        if count < options["block_size"] + 2:
            raise fail(f"{tokens / split}: {count:,} tokens, too few for --block-size "
                       f"{options['block_size']} (at least {options['block_size'] + 2})")
    device = options["device"]
    if device != "cpu":
        options["cpu_threads"] = 0
    machine = probe_machine(device, options["cpu_threads"])
    check_device(device, options["dtype"], machine)
    peak, peak_source = resolve_peak(device, machine, options["peak_tflops"])
    shape = Shape(options["n_layer"], options["n_head"], options["n_embd"],
                  options["block_size"], options["batch_size"], options["grad_accum"],
                  int(meta["vocab_size"]))
    options["compile"] = options["use_compile"]
    work = work_folder("bench-vs-nanogpt-")
    click.echo(f"work folder: {work}", err=True)
    try:
        sides, data_notes = run_sides(nanogpt_dir, tokens, tokenizer, shape, options, work)
    except click.ClickException:
        click.echo(f"work folder kept: {work}", err=True)
        raise
    report = build_report(shape, options, machine, peak, peak_source, nanogpt_dir, sides,
                          data_notes)
    if not options["keep"]:
        shutil.rmtree(work, ignore_errors=True)
    publish(report, options["out"])


def check_options(options: dict[str, Any], nanogpt_dir: Path | None, tokenizer: Path) -> None:
    """One line for an option that cannot work, before anything runs."""
    missing = [name for name in ("train.py", "model.py", "configurator.py")
               if nanogpt_dir and not (nanogpt_dir / name).is_file()]
    if missing:
        raise fail(f"--nanogpt {nanogpt_dir}: no {missing[0]} there; allowed: a checkout of "
                   "https://github.com/karpathy/nanoGPT")
    if options["warmup_iters"] >= options["iters"]:
        raise fail(f"--warmup-iters {options['warmup_iters']} leaves no timed iteration of "
                   f"--iters {options['iters']}")
    if options["n_embd"] % options["n_head"]:
        raise fail(f"--n-embd {options['n_embd']} is not a multiple of --n-head "
                   f"{options['n_head']}")
    if not tokenizer.is_file():
        raise fail(f"--tokenizer {tokenizer}: not found; the tokenizer.json gptpipe vocab "
                   "wrote for these tokens")


def run_sides(nanogpt_dir: Path | None, tokens: Path, tokenizer: Path, shape: Shape,
              options: dict[str, Any], work: Path) -> tuple[list[SideResult], list[str]]:
    """nanoGPT (when there is a checkout), then gptpipe; (their results, data notes)."""
    sides = []
    # Without a checkout, nanoGPT's data is still written (in the work folder): that code
    # is this script's own.
    data_notes = prepare_nanogpt_dataset(nanogpt_dir or work / "nanoGPT-not-run",
                                         options["dataset_name"], tokens, shape)
    if nanogpt_dir is None:
        click.echo("no --nanogpt checkout: nanoGPT is not run", err=True)
    else:
        click.echo("running nanoGPT train.py ...", err=True)
        sides.append(run_nanogpt(nanogpt_dir, options["dataset_name"], shape, options, work))
        click.echo(f"nanoGPT: {sides[-1].median_ms:,.1f} ms/iter", err=True)
    click.echo("running gptpipe pretrain ...", err=True)
    sides.append(run_gptpipe(tokens, tokenizer, shape, options, work))
    return sides, data_notes


if __name__ == "__main__":
    main()
