"""Generation speed with and without the key/value cache: tokens/s and the speed-up.

What it measures: greedy decoding of ``--new-tokens`` tokens (default 256) from a lone
``<bos>``, never stopping at ``<eos>``, through ``pipeline.lm.sampling.generate_ids`` twice:

- ``kv-cache``: the prompt once, then one position per new token;
- ``no-cache``: the whole window recomputed for every new token.

Both runs must produce the same tokens (the script asserts it), so the table compares the
same work. Each mode is timed ``--repeats`` times in alternating order, after a short
untimed warm-up of each, and the median is reported. When the sequence outgrows the
model's context, both modes keep its last ``context // 2`` tokens (the cached one rebuilds
its cache from them), so with context 128 and 256 new tokens the window is cut three times
and the no-cache run never sees more than 128 tokens: a longer context (``--context 512``)
shows the cache's gain on long sequences.

The model: ``--model DIR`` (default ``models/pretrain/best``) when that checkpoint exists;
otherwise, or whenever ``--context`` is given, a randomly initialized GPT of the default
shape (vocab 8192, 4 layers x 256, 4 heads) with that context (default 128). Random
weights decode at the same speed as trained ones.

Usage (from the repository root):

    .venv/bin/python bench/bench_generate.py                     # trained model if present
    .venv/bin/python bench/bench_generate.py --context 512       # random model, context 512
    .venv/bin/python bench/bench_generate.py --device cuda --out bench/results-generate.md
    .venv/bin/python bench/bench_generate.py --new-tokens 16 --repeats 1 --context 32  # smallest

``--out FILE`` also writes the Markdown report there.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from common import publish

from pipeline.core.device import pick_device
from pipeline.data.tokenizer import BOS_ID
from pipeline.lm.checkpoint import load_model
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.sampling import SamplingConfig, generate_ids

DEFAULT_MODEL = Path("models/pretrain/best")
MODES = {"kv-cache": True, "no-cache": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="checkpoint directory (default: %(default)s, when present)")
    parser.add_argument("--context", type=int, default=None,
                        help="benchmark a random default-shaped GPT with this context instead")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, str]:
    """The model to time and a line describing it."""
    if args.context is None and args.model.is_dir():
        model, _ = load_model(args.model, device)
        return model, f"`{args.model}`"
    context = args.context or 128
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, context=context)).to(device)
    return model, "random init"


def synchronize(device: torch.device) -> None:
    # GPU kernels run asynchronously; time only work that has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_run(model: GPT, new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    device = next(model.parameters()).device
    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, stop_at_eos=False)
    generator = torch.Generator(device).manual_seed(0)  # unused by greedy decoding
    synchronize(device)
    start = time.perf_counter()
    tokens = list(generate_ids(model, [BOS_ID], config, generator, use_cache=use_cache))
    synchronize(device)
    return tokens, time.perf_counter() - start


def measure(model: GPT, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds per mode; raises if the two modes ever disagree on a token."""
    for use_cache in MODES.values():  # warm-up: allocator, kernels, caches
        timed_run(model, min(new_tokens, 8), use_cache)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    reference: list[int] | None = None
    for _ in range(repeats):
        for mode, use_cache in MODES.items():  # alternate, so drift hits both alike
            tokens, elapsed = timed_run(model, new_tokens, use_cache)
            if reference is None:
                reference = tokens
            if tokens != reference:  # same length: no run stops at <eos>
                pairs = zip(tokens, reference, strict=True)
                first = next(i for i, (a, b) in enumerate(pairs) if a != b)
                raise AssertionError(f"{mode} differs from kv-cache at new token {first}")
            seconds[mode].append(elapsed)
    return {mode: statistics.median(values) for mode, values in seconds.items()}


def report(args, model: GPT, source: str, device: torch.device, seconds: dict) -> str:
    c = model.config
    lines = [
        "## Generation with and without the KV cache",
        "",
        f"Model: {source}, {c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context "
        f"{c.context}, vocab {c.vocab_size} ({model.num_parameters() / 1e6:.1f}M parameters). "
        f"Device: {device} ({platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads). Greedy from `<bos>`, "
        f"median of {args.repeats}; both modes gave the same tokens.",
        "",
        "| mode | new tokens | seconds | tokens/s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    baseline = seconds["no-cache"]
    for mode, elapsed in seconds.items():
        lines.append(
            f"| {mode} | {args.new_tokens} | {elapsed:.3f} | {args.new_tokens / elapsed:,.1f} "
            f"| {baseline / elapsed:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, key="--device")
    model, source = build_model(args, device)
    seconds = measure(model, args.new_tokens, args.repeats)
    publish(report(args, model, source, device, seconds), args.out)


if __name__ == "__main__":
    main()
