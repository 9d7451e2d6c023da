"""pretrain: train the GPT on the tokenized train split, on CPU or GPU, resumably.

Reads:   data/tokens (train and val shards + meta.json), data/vocab/tokenizer.json, and
         train.init_from: a model folder to continue (its weights; its shape must be the
         model section's and its tokenizer the data's), or data/builtin/random.init
Params:  model (the network's shape), train (optimizer, budget, device, cadence, init_from,
         source_weights), data.sources (whether data/tokens/train/sources.parquet says
         where each source lies), evaluate.max_tokens (the most val tokens the final
         bits per byte score), evaluate.resamples and evaluate.resample_seed (their standard errors)
Writes:  models/pretrain/{best,last}/ (model.safetensors, gptpipe.json, tokenizer.json);
         checkpoints/pretrain/ (the resumable training state, a DVC `persist` output);
         dvclive/pretrain/ (per-step train loss, val loss, lr, tokens/s);
         metrics/pretrain.json (best val loss, val loss and bits per byte with their
         bootstrap standard errors over documents, tokens seen, ...; with several
         sources, each one's train tokens, weight and share of the training windows);
         metrics/pretrain_speed.json (wall time, tokens/s, GFLOP/s: these vary by machine;
         and the kernels that computed the run: device, architecture, precision, torch).

Runs unchanged under `torchrun` (DDP: nccl on GPU, gloo on CPU), on one machine or
several: the first process of each machine writes the outputs (one per shared folder).
A process that dies or freezes is named by the others, which stop within
train.peer_timeout seconds.

Re-running after a crash, a kill or Ctrl-C resumes from the snapshot in --checkpoint
(pipeline.core.runs says when, and what happens to a snapshot of other params: it is set
aside, never deleted). A finished run is written out without training when it was
trained on this machine and software with these params, since training it again would
give the same bits: that is what `dvc repro -f pretrain` does. To train it again anyway,
delete checkpoints/pretrain/snapshot first.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.core.device import Runtime, setup_runtime, teardown, together
from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_json
from pipeline.core.live import finish_live, start_live
from pipeline.core.machine import describe_machine, kernels_summary
from pipeline.core.params import Params
from pipeline.core.peers import COLLECTIVE_MARGIN_SECONDS, watched
from pipeline.core.progress import progress
from pipeline.core.runs import one_writer_per_folder
from pipeline.core.stage import say, stage_command
from pipeline.data.shards import made_with, read_meta, read_tokens, require_splits
from pipeline.data.sources import check_weight_names, read_spans, source_shares
from pipeline.data.tokenizer import TextTokenizer, load_tokenizer, require_tokenizer
from pipeline.lm.checkpoint import base_model, check_same_shape
from pipeline.lm.evaluation import score_split
from pipeline.lm.folder import ModelFolder
from pipeline.lm.model import GPTConfig
from pipeline.lm.training import StepLog, Trainer


def run(params: Params, *, tokens: Path, tokenizer: Path, out: Path, checkpoint: Path,
        live: Path, metrics: Path, speed: Path) -> dict:
    """Train (or resume, or only write out a finished run); write every output."""
    train = params.train
    if train.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        _check_gpus_for(train.nproc_per_node, train.device)
        _relaunch_under_torchrun(train.nproc_per_node)
        return {}
    torch.set_float32_matmul_precision("high")
    runtime = setup_runtime(train.device, train.dtype, train.threads,
                            train.peer_timeout + COLLECTIVE_MARGIN_SECONDS)
    try:
        with watched(runtime, "pretrain", train.peer_timeout):
            return _pretrain(params, runtime, tokens=tokens, tokenizer=tokenizer, out=out,
                             checkpoint=checkpoint, live=live, metrics=metrics, speed=speed)
    finally:
        teardown(runtime)


def _pretrain(params: Params, runtime: Runtime, *, tokens: Path, tokenizer: Path, out: Path,
              checkpoint: Path, live: Path, metrics: Path, speed: Path) -> dict:
    train = params.train
    # Each machine checks its own checkout; one that fails stops every process.
    meta, text_tokenizer, base, train_tokens, val_tokens, spans = together(
        runtime, lambda: _read_inputs(params, tokens, tokenizer))
    inputs = {"tokens": tokens, "tokenizer": tokenizer,
              **({"init_from": base.path} if base else {})}
    provenance = {"tokenizer_sha256": text_tokenizer.sha256, "vocab_kind": meta.get("kind"),
                  **({"init_from": str(base.path)} if base else {})}
    if runtime.is_main:
        say("pretrain", f"device {runtime.describe()}")
        if base is not None:
            say("pretrain", f"continuing {base.path}")
    runtime = one_writer_per_folder(runtime, checkpoint)
    trainer = Trainer(params.model, train, runtime, train_tokens, val_tokens,
                      int(meta["vocab_size"]), inputs, checkpoint, provenance, base,
                      shared_settings={"evaluate.max_tokens": params.evaluate.max_tokens},
                      train_spans=spans)
    val = meta["splits"]["val"]

    def score_val(model) -> dict:
        """The final val metrics: every token, or evaluate.max_tokens of them, with
        their bootstrap standard errors over documents (loss_se, bpb_se, ...)."""
        scores = score_split(model, val_tokens, val["bytes"], trainer.config.context,
                             train.batch_size, runtime.device, runtime.autocast,
                             params.evaluate.budget, text_tokenizer.byte_lengths(),
                             val.get("token_bytes"))
        return {**scores.metrics, **scores.errors(params.evaluate.resamples,
                                                  params.evaluate.resample_seed)}

    shares = source_shares(spans, train.source_weights, trainer.sampler.by_source)
    if shares and runtime.is_main:
        say("pretrain", "sources (share of the training windows): " + ", ".join(
            f"{name} {found['window_share']:.3f}" for name, found in shares.items()))
    return _train_and_report(trainer, score_val, tokenizer, out, live, metrics, speed,
                             shares)


def _read_inputs(params: Params, tokens: Path, tokenizer: Path) -> tuple:
    """(meta, tokenizer, base model or None, train tokens, val tokens, the train
    split's source spans or None), each checked."""
    meta = read_meta(tokens)
    text_tokenizer = load_tokenizer(tokenizer)
    require_tokenizer(text_tokenizer, made_with(meta, tokens))
    require_splits(meta, tokens, "train", "val")
    base = _check_base_model(params, text_tokenizer, int(meta["vocab_size"]))
    spans = None
    if params.data.sources != "one":
        spans = read_spans(tokens / "train")
        if spans is None:
            raise GptpipeError(f"{tokens / 'train'}: no source spans, but data.sources = "
                               f"{params.data.sources!r}; run dvc repro tokenize")
        check_weight_names(params.train.source_weights, spans.sources(), str(tokens / "train"))
    return (meta, text_tokenizer, base, read_tokens(tokens / "train"),
            read_tokens(tokens / "val"), spans)


def _check_base_model(params: Params, tokenizer: TextTokenizer,
                      vocab_size: int) -> ModelFolder | None:
    """``train.init_from``'s model folder (opened once: the trainer loads its weights
    from it), once its tokenizer is the data's and its shape the model section's; None
    for random weights."""
    path = base_model(params.train.init_from)
    if path is None:
        return None
    base = ModelFolder.open(path)
    config, base_tokenizer = base.config, base.tokenizer()
    if base_tokenizer.sha256 != tokenizer.sha256:
        raise GptpipeError(
            f"train.init_from = {path}: its tokenizer is not the data's ({tokenizer.path}); "
            "set vocab.kind: from_model, so that the vocab stage copies the base model's "
            "tokenizer and the data is tokenized with it"
        )
    check_same_shape(path, config, GPTConfig(vocab_size=vocab_size, **asdict(params.model)))
    return base


def _train_and_report(trainer: Trainer, score_val, tokenizer_path: Path, out: Path,
                      live_dir: Path, metrics: Path, speed: Path,
                      shares: dict[str, dict[str, float]]) -> dict:
    runtime = trainer.runtime
    # Every machine's first process writes the outputs (see Runtime.writes_files).
    live = start_live(live_dir, trainer.resumed_from) if runtime.writes_files else None
    if runtime.is_main:
        n = trainer.model.num_parameters()
        say("pretrain", f"{n / 1e6:.2f}M parameters, {trainer.total_steps} steps of "
                        f"{trainer.tokens_per_step} tokens")
    bar = progress(total=trainer.total_steps, desc="pretrain", unit="step",
                   initial=trainer.step) if runtime.is_main else None
    started, start_step = time.perf_counter(), trainer.step
    # Steady-state throughput: every logged window except the one holding this run's first
    # step, whose time is dominated by warm-up (torch.compile, CUDA kernel selection).
    timed = {"tokens": 0.0, "seconds": 0.0, "last_step": start_step}

    def on_log(log: StepLog) -> None:
        window_tokens = (log.step - timed["last_step"]) * trainer.tokens_per_step
        if timed["last_step"] > start_step and log.tokens_per_second > 0:
            timed["tokens"] += window_tokens
            timed["seconds"] += window_tokens / log.tokens_per_second
        timed["last_step"] = log.step
        if live is None:
            return
        live.step = log.step
        live.log_metric("train/loss", log.train_loss)
        live.log_metric("lr", log.lr)
        live.log_metric("tokens_per_second", round(log.tokens_per_second, 1))
        if bar is not None:
            bar.set_postfix(loss=f"{log.train_loss:.3f}", tok_s=f"{log.tokens_per_second:,.0f}")

    def on_eval(step: int, val_loss: float) -> None:
        if live is None:
            return
        live.step = step
        live.log_metric("val/loss", val_loss)
        if bar is not None:
            bar.write(f"pretrain: step {step}: val loss {val_loss:.4f}")

    trainer.fit(on_log, on_eval, bar)
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    trainer.finish(out, tokenizer_path)
    if not runtime.writes_files:
        return {}
    finish_live(live)
    steady = timed["tokens"] / timed["seconds"] if timed["seconds"] > 0 else None
    return _write_metrics(trainer, score_val, out, metrics, speed, wall, start_step, steady,
                          shares)


def _write_metrics(trainer, score_val, out, metrics, speed, wall, start_step, steady,
                   shares) -> dict:
    runtime = trainer.runtime
    # The best checkpoint, scored on the val split (the periodic evals use a few windows).
    best = ModelFolder.open(out / "best").load_model(runtime.device)
    scores = score_val(best)
    val_loss, bits_per_byte = scores["loss"], scores["bpb"]
    steps_run = trainer.step - start_step
    tokens_run = steps_run * trainer.tokens_per_step
    # Evals and the first step's warm-up excluded when there were enough steps to tell.
    tokens_per_second = steady or (tokens_run / wall if wall > 0 else 0.0)
    result = {
        "best_val_loss": round(trainer.best_val_loss, 6),
        "best_step": trainer.best_step,
        "val_loss": round(val_loss, 6),
        "val_loss_se": round(scores["loss_se"], 6),
        "val_bpb": round(bits_per_byte, 6),
        "val_bpb_se": round(scores["bpb_se"], 6),
        "val_tokens_scored": scores["tokens"],
        "steps": trainer.step,
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "parameters": trainer.model.num_parameters(),
    }
    if shares:
        result["sources"] = shares
    write_json(metrics, result)
    trained = steps_run > 0  # else a finished snapshot was only written out: no speed
    write_json(speed, {
        "device": runtime.describe(),
        "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens_per_second, 1) if trained else None,
        "gflops_per_second": round(trainer.model.flops_per_token() * tokens_per_second / 1e9, 2)
        if trained else None,
        "world_size": runtime.world_size,
        # What decides the bits (gptpipe compare says when two runs' kernels differ).
        "kernels": kernels_summary(describe_machine(runtime.device, runtime.dtype)),
    })
    speed_note = f"{tokens_per_second:,.0f} tokens/s" if trained else "no step trained"
    say("pretrain", f"val loss {val_loss:.4f} nats/token, {bits_per_byte:.4f} bits/byte "
                    f"(best step {trainer.best_step}); {speed_note}")
    return result


def _check_gpus_for(nproc: int, device: str) -> None:
    """One DDP process per GPU: refuse, before launching, more processes than GPUs (NCCL
    cannot put two ranks on one GPU; each rank would fail with a long traceback)."""
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return  # CPU processes (gloo) share the cores
    if not torch.cuda.is_available():
        return  # auto: CPU processes; cuda: the device check says there is no GPU
    if device.startswith("cuda:"):
        raise GptpipeError(
            f"train.device = {device!r} names one GPU but train.nproc_per_node = {nproc}; "
            "allowed: train.device = cuda (process i uses GPU i) or auto"
        )
    count = torch.cuda.device_count()
    if nproc > count:
        raise GptpipeError(
            f"train.nproc_per_node = {nproc} but only {count} GPU(s) are visible; allowed: "
            f"1 .. {count} (one process per GPU), or train.device = cpu for CPU processes"
        )


def _relaunch_under_torchrun(nproc: int) -> None:
    """train.nproc_per_node > 1: run this same command as nproc DDP processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if "pretrain" not in sys.argv:
        raise GptpipeError(
            "train.nproc_per_node > 1 needs the stage started as `gptpipe pretrain ...`"
        )
    argv = sys.argv[sys.argv.index("pretrain"):]
    say("pretrain", f"launching {nproc} processes with torchrun")
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "pipeline.cli", *argv])
    except ChildFailedError as err:  # each worker said its own line; name the first to go
        raise GptpipeError(f"pretrain: {_first_failure(err, nproc)}") from None


def _first_failure(err, nproc: int) -> str:
    """Which torchrun worker failed first (``err``: torchrun's ChildFailedError), and how:
    a signal, or its exit status. SIGTERM is torchrun's own, sent to the survivors."""
    rank, failure = min(err.failures.items(), key=lambda item: (
        item[1].timestamp, item[1].exitcode == -signal.SIGTERM, item[0]))
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else
           f"exited with status {failure.exitcode}")
    return f"process {rank} of {nproc} {how}"


main = stage_command(
    "pretrain", run,
    tokens="", tokenizer="",
    out="The model folder to write (best/ and last/ model checkpoints).",
    checkpoint="", live="",
    metrics="The final metrics JSON (deterministic values: val loss, bits per byte, ...).",
    speed="The speed metrics JSON (wall time, tokens/s, GFLOP/s: these vary by machine).",
)
