"""Training speed on CPU: tokens/s and achieved GFLOP/s against this machine's matmul peak.

What it measures, all in one process so the figures are comparable:

1. The float32 matmul peak: ``torch.mm`` on the shapes the models multiply, (B*T, C) x
   (C, 4C) and friends, plus large squares, each warmed up and then timed for a while;
   the best sustained GFLOP/s is "the peak".
2. For each model size (small: 4 layers x 128 wide, 4 heads, context 64, batch 12;
   large: 6 layers x 384 wide, 6 heads, context 256, batch 16), full float32 training
   steps (forward, cross-entropy, backward, grad clipping at 1.0, AdamW step,
   zero_grad: what ``pipeline.lm.training.Trainer`` does per step) of three models:

   - ``ours``: ``pipeline.lm.model.GPT`` with the project defaults (rotary, RMSNorm,
     SwiGLU, no biases);
   - ``ours-classic``: the same class configured like GPT-2 (learned positions,
     LayerNorm, GELU, biases), so that "ours vs reference" isolates the implementation
     from the architecture;
   - ``reference``: the classic PyTorch tutorial language model, ``nn.Embedding`` +
     learned positions + ``nn.TransformerEncoder(nn.TransformerEncoderLayer(d, nhead,
     dim_feedforward=4d, dropout=0, activation="gelu", batch_first=True,
     norm_first=True))`` + a final LayerNorm + a Linear decoder to the vocabulary, run
     with ``nn.Transformer.generate_square_subsequent_mask`` and ``is_causal=True``.
     The decoder is tied to the embedding by default, like ours (``--untied-reference``
     unties it, as the tutorial does).

   Every model gets the pretrain stage's optimizer, ``pipeline.lm.optim.adamw`` (AdamW,
   decay on matrices only, fused) with the default ``TrainParams``.

FLOPs are counted the same way for every model, ``GPT.flops_per_token()``'s formula:
6 * N + 12 * n_layer * n_embd * context per token, where N is every parameter except
the input embeddings (token and position tables) plus vocab * n_embd for the output
projection (whether tied or not: the matmul happens either way). GFLOP/s = FLOP/token *
tokens/s; "% peak" divides it by the measured matmul peak.

The models are timed in rounds (``--rounds``), in alternating order, so that a machine
whose speed drifts (turbo, a neighbour's load) penalizes all of them alike; ms/step is
the median over every timed step, and tokens/s follows from it. By default each model
runs for about ``--seconds`` (at least 5 steps) after ``--warmup`` untimed steps; in the
table, "vs reference" is the reference's ms/step over the model's (above 1: faster),
compiled models being compared with the compiled reference.

Usage (from the repository root):

    .venv/bin/python bench/bench_train.py            # full run: about 3 minutes on 2 cores
    .venv/bin/python bench/bench_train.py --compile  # also torch.compile'd: ~10 minutes
    .venv/bin/python bench/bench_train.py --out bench/results-train.md   # save the report
    .venv/bin/python bench/bench_train.py --sizes large --seconds 30 --threads 2
    .venv/bin/python bench/bench_train.py --sizes 2x32x2x16x4 --steps 3 --peak-seconds 0.2 \
        --vocab-size 256   # the smallest run: a check that the script works

``--sizes`` takes ``small``, ``large`` or a custom ``LAYERSxWIDTHxHEADSxCONTEXTxBATCH``.
``--out FILE`` writes the Markdown report there (``--append`` adds to the end instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_name, publish
from torch import nn

from pipeline.core.device import retain_freed_memory
from pipeline.core.params import TrainParams
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.optim import adamw

TRAIN = TrainParams()  # the pretrain stage's defaults: optimizer settings and grad clip


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    context: int
    batch: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.context

    def label(self) -> str:
        return (
            f"{self.name}: {self.n_layer}L x {self.n_embd}, {self.n_head} heads, "
            f"context {self.context}, batch {self.batch}"
        )


PRESETS = {
    "small": Size("small", n_layer=4, n_embd=128, n_head=4, context=64, batch=12),
    "large": Size("large", n_layer=6, n_embd=384, n_head=6, context=256, batch=16),
}


def parse_size(text: str) -> Size:
    if text in PRESETS:
        return PRESETS[text]
    try:
        layers, width, heads, context, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}; allowed: small, large or LAYERSxWIDTHxHEADSxCONTEXTxBATCH"
        ) from None
    if width % heads:
        raise argparse.ArgumentTypeError(f"size {text!r}: width must divide by heads")
    return Size(text, layers, width, heads, context, batch)


# ----------------------------------------------------------------------- reference
class ReferenceLM(nn.Module):
    """The classic PyTorch tutorial LM: embeddings + nn.TransformerEncoder + decoder."""

    def __init__(self, vocab: int, size: Size, tied: bool) -> None:
        super().__init__()
        d = size.n_embd
        self.n_layer, self.n_embd, self.context = size.n_layer, d, size.context
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(size.context, d)
        layer = nn.TransformerEncoderLayer(
            d, size.n_head, dim_feedforward=4 * d, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, size.n_layer, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.decoder = nn.Linear(d, vocab)
        if tied:
            self.decoder.weight = self.embed.weight
        self.tied = tied
        mask = nn.Transformer.generate_square_subsequent_mask(size.context)
        self.register_buffer("causal_mask", mask, persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        T = idx.shape[1]
        x = self.embed(idx) + self.pos(torch.arange(T, device=idx.device))
        x = self.encoder(x, mask=self.causal_mask[:T, :T], is_causal=True)
        logits = self.decoder(x)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self) -> float:
        """The same formula as GPT.flops_per_token: 6 N + 12 L C T."""
        total = sum(p.numel() for p in self.parameters())
        embeddings = self.embed.weight.numel() + self.pos.weight.numel()
        n = total - embeddings
        if self.tied:  # the decoder's matrix is the embedding: add its matmul back
            n += self.embed.weight.numel()
        return 6 * n + 12 * self.n_layer * self.n_embd * self.context


def ours_flops(model: GPT) -> float:
    return float(model.flops_per_token())


def reference_causal_mask_works(size: Size, vocab: int) -> None:
    """Check once that the reference is causal: a change at position t leaves logits < t."""
    torch.manual_seed(0)
    model = ReferenceLM(vocab, size, tied=True)
    idx = torch.randint(vocab, (1, size.context))
    changed = idx.clone()
    t = size.context // 2
    changed[0, t] = (changed[0, t] + 1) % vocab
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
    if not torch.allclose(a[:, :t], b[:, :t], atol=1e-5):
        raise SystemExit("reference model is not causal: the mask did not apply")


# --------------------------------------------------------------------------- peak
@dataclass
class PeakRow:
    shape: str
    gflops: float


def matmul_peak(sizes: list[Size], vocab: int, seconds: float) -> list[PeakRow]:
    """Best sustained float32 GFLOP/s of torch.mm on the models' shapes and big squares.

    Each shape is warmed up, then timed in bursts of about 0.1 s for ``seconds``; a
    burst's rate is sustained (many back-to-back calls), and the best burst counts.
    """
    shapes: dict[str, tuple[int, int, int]] = {}
    for size in sizes:
        m, c = size.tokens_per_step, size.n_embd
        shapes[f"{size.name} MLP up ({m}x{c}) @ ({c}x{4 * c})"] = (m, c, 4 * c)
        shapes[f"{size.name} MLP down ({m}x{4 * c}) @ ({4 * c}x{c})"] = (m, 4 * c, c)
        shapes[f"{size.name} head ({m}x{c}) @ ({c}x{vocab})"] = (m, c, vocab)
    for n in (1024, 2048):
        shapes[f"square {n}^3"] = (n, n, n)
    rows = []
    for label, (m, k, n) in shapes.items():
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        flop = 2.0 * m * k * n
        start = time.perf_counter()
        for _ in range(3):  # warm up: page the operands in, let the clock settle
            torch.mm(a, b, out=out)
        per_call = (time.perf_counter() - start) / 3
        reps = max(1, int(0.1 / max(per_call, 1e-6)))
        best = 0.0
        deadline = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            now = time.perf_counter()
            best = max(best, reps * flop / (now - start) / 1e9)
            if now >= deadline:
                break
        rows.append(PeakRow(label, best))
    return rows


# -------------------------------------------------------------------------- timing
@dataclass
class Candidate:
    name: str
    model: nn.Module
    network: nn.Module  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    flops_per_token: float
    params: int
    compiled: bool = False
    compile_s: float | None = None
    first_loss: float = math.nan
    times: list[float] = field(default_factory=list)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step, as Trainer does it in float32 on CPU."""
        _, loss = self.network(x, y)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), TRAIN.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    @property
    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.times)


def build(kind: str, size: Size, vocab: int, untied_reference: bool, seed: int):
    torch.manual_seed(seed)
    if kind == "reference":
        model = ReferenceLM(vocab, size, tied=not untied_reference)
        return model, model.flops_per_token()
    common = dict(
        vocab_size=vocab, context=size.context, n_layer=size.n_layer,
        n_head=size.n_head, n_embd=size.n_embd,
    )
    if kind == "ours":
        config = GPTConfig(**common)
    elif kind == "ours-classic":
        config = GPTConfig(
            **common, positions="learned", norm="layernorm", mlp="gelu", bias=True
        )
    else:
        raise ValueError(kind)
    model = GPT(config)
    return model, ours_flops(model)


def make_candidate(kind: str, size: Size, args: argparse.Namespace, compiled: bool):
    model, flops = build(kind, size, args.vocab_size, args.untied_reference, args.seed)
    model.train()
    optimizer = adamw(model, lr=TRAIN.lr, weight_decay=TRAIN.weight_decay,
                      betas=(TRAIN.beta1, TRAIN.beta2), device=torch.device("cpu"))
    network = torch.compile(model) if compiled else model
    name = f"{kind} (compiled)" if compiled else kind
    params = sum(p.numel() for p in model.parameters())
    return Candidate(name, model, network, optimizer, flops, params, compiled)


def batches(size: Size, vocab: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab, (count, size.batch, size.context + 1), generator=gen)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def time_size(size: Size, args: argparse.Namespace, log: Callable[[str], None]):
    kinds = ["ours", "ours-classic", "reference"]
    flavours = [False, True] if args.compile else [False]
    candidates = [make_candidate(k, size, args, c) for c in flavours for k in kinds]
    data = batches(size, args.vocab_size, 4, args.seed + 1)
    estimates = []
    for cand in candidates:
        start = time.perf_counter()
        cand.first_loss = cand.step(*data[0])
        first = time.perf_counter() - start
        warm = []
        for i in range(max(1, args.warmup)):
            start = time.perf_counter()
            cand.step(*data[(i + 1) % len(data)])
            warm.append(time.perf_counter() - start)
        if cand.compiled:
            cand.compile_s = first - min(warm)
        estimates.append(min(warm))
        if not math.isfinite(cand.first_loss):
            raise SystemExit(f"{cand.name}: non-finite loss {cand.first_loss} at step 1")
        log(f"  warmed up {cand.name}: {1e3 * min(warm):.1f} ms/step, first loss "
            f"{cand.first_loss:.2f} (ln vocab = {math.log(args.vocab_size):.2f})"
            + (f", compile {cand.compile_s:.1f} s" if cand.compiled else ""))
    if args.steps:
        steps = [args.steps] * len(candidates)
    else:
        steps = [max(5, round(args.seconds / t)) for t in estimates]
    rounds = max(1, args.rounds)
    for r in range(rounds):
        order = list(range(len(candidates)))
        if r % 2:
            order.reverse()
        for i in order:
            cand = candidates[i]
            share = steps[i] // rounds + (1 if r < steps[i] % rounds else 0)
            for j in range(share):
                x, y = data[j % len(data)]
                start = time.perf_counter()
                loss = cand.step(x, y)
                cand.times.append(time.perf_counter() - start)
                if not math.isfinite(loss):
                    raise SystemExit(f"{cand.name}: non-finite loss {loss}")
        log(f"  round {r + 1}/{rounds} done")
    return candidates


# ------------------------------------------------------------------------- report
def report(args, sizes, peak_rows, results) -> str:
    peak = max(r.gflops for r in peak_rows)
    lines = [
        f"### Training speed, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- CPU: {cpu_name()} ({torch.get_num_threads()} torch threads); "
        f"torch {torch.__version__}; float32; vocab {args.vocab_size}",
        f"- reference decoder: {'untied' if args.untied_reference else 'tied'} "
        "to the embedding; every model: the pretrain stage's AdamW "
        f"(pipeline.lm.optim.adamw), grad clip {TRAIN.grad_clip}",
        "- CPU allocator: " + ("freed memory retained (pipeline.core.device.retain_freed_memory, "
                               "as in the pretrain stage), for every model" if args.retained
                               else "glibc defaults"),
        f"- command: `{' '.join(['python', *sys.argv])}`",
        "",
        f"fp32 matmul peak (torch.mm, best sustained): **{peak:.1f} GFLOP/s**",
        "",
        "| matmul | GFLOP/s |",
        "|---|---:|",
        *(f"| {r.shape} | {r.gflops:.1f} |" for r in peak_rows),
        "",
        "| size | model | params (M) | MFLOP/token | steps | ms/step | tokens/s | GFLOP/s "
        "| % of peak | vs reference | compile (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for size, cands in zip(sizes, results, strict=True):
        ref = {c.compiled: c for c in cands if c.name.startswith("reference")}
        for c in cands:
            tps = size.tokens_per_step / (c.ms_per_step / 1e3)
            gflops = c.flops_per_token * tps / 1e9
            ratio = ref[c.compiled].ms_per_step / c.ms_per_step
            compile_s = f"{c.compile_s:.0f}" if c.compile_s is not None else "-"
            lines.append(
                f"| {size.name} | {c.name} | {c.params / 1e6:.2f} "
                f"| {c.flops_per_token / 1e6:.1f} | {len(c.times)} | {c.ms_per_step:.1f} "
                f"| {tps:,.0f} | {gflops:.1f} | {100 * gflops / peak:.0f}% "
                f"| {ratio:.2f}x | {compile_s} |"
            )
        for c in cands:
            if c.name.split(" ")[0] != "ours":
                continue
            r = ref[c.compiled]
            ratio = r.ms_per_step / c.ms_per_step
            gflops = c.flops_per_token * size.tokens_per_step / (c.ms_per_step / 1e3) / 1e9
            verdict = "faster than" if ratio > 1 else "NOT faster than"
            verdicts.append(
                f"{size.name}, {c.name}: {verdict} the reference ({ratio:.2f}x); "
                f"{100 * gflops / peak:.0f}% of the matmul peak"
            )
    lines += ["", *(f"- {v}" for v in verdicts), ""]
    return "\n".join(lines)


OPTIONS = {  # flag: (type, default, meaning)
    "--sizes": (str, "small,large", "comma-separated: small, large, or LxCxHxTxB"),
    "--vocab-size": (int, 8192, "vocabulary of every model (the BPE default)"),
    "--steps": (int, 0, "timed steps per model (0: enough for --seconds)"),
    "--seconds": (float, 15.0, "timed seconds per model and size when --steps is 0"),
    "--warmup": (int, 3, "untimed steps per model"),
    "--rounds": (int, 2, "split the timed steps into rounds of alternating order"),
    "--peak-seconds": (float, 2.0, "timing per matmul shape for the peak"),
    "--threads": (int, 0, "torch threads (0: torch's default, every core)"),
    "--seed": (int, 0, "seed of the models' weights and of the batches"),
}
SWITCHES = {
    "--compile": "also time torch.compile'd models (compile time reported apart)",
    "--untied-reference": "untie the reference's decoder from its embedding (as the tutorial)",
    "--glibc-default-malloc": "keep glibc's default allocator settings (the stage changes them "
                              "with pipeline.core.device.retain_freed_memory; so does this, "
                              "by default)",
    "--append": "append to --out instead",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for what is measured and how.",
    )
    for flag, (kind, default, meaning) in OPTIONS.items():
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{meaning} (default {default})")
    parser.add_argument("--out", type=Path, help="write the Markdown report to this file")
    for flag, meaning in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=meaning)
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.retained = False if args.glibc_default_malloc else retain_freed_memory()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}")
    reference_causal_mask_works(sizes[0], args.vocab_size)
    log("measuring the fp32 matmul peak ...")
    peak_rows = matmul_peak(sizes, args.vocab_size, args.peak_seconds)
    log(f"  peak {max(r.gflops for r in peak_rows):.1f} GFLOP/s")
    results = []
    for size in sizes:
        log(f"timing {size.label()} ...")
        results.append(time_size(size, args, log))
    text = report(args, sizes, peak_rows, results)
    if args.append and args.out:
        print(text)
        with args.out.open("a") as fh:
            fh.write("\n" + text)
    else:
        publish(text, args.out)


if __name__ == "__main__":
    main()
