"""The pretraining loop: AdamW or Muon, warmup + cosine or wsd, clipping, accumulation,
DDP.

:class:`Trainer` builds the model, optimizer and batches, then steps, evaluates every
``train.eval_every`` steps and keeps the weights of the lowest val loss. Everything about
keeping the run (resume, snapshots every ``train.checkpoint_every`` steps, stop signals,
several processes) is its :class:`pipeline.core.runs.Run`'s. A loss or gradient that is
not finite stops the run with one line naming the step, before the weights change: the
last good snapshot stays, and the next run resumes from it.

Testing hook: the environment variable ``GPTPIPE_FAULT_NAN_GRAD_AT_STEP=N``, read only
here, poisons one gradient with NaN at optimizer step N, as a numeric fault would
(bench/kill_loop.py and the tests use it; a real run never sets it).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.device import Runtime, together
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.machine import describe_machine
from pipeline.core.params import ModelParams, TrainParams
from pipeline.core.runs import Run
from pipeline.data.sources import SourceSpans, weighted_starts
from pipeline.lm.batching import (
    WindowSampler,
    batch_too_large,
    check_cpu_memory,
    eval_windows,
    is_out_of_memory,
)
from pipeline.lm.checkpoint import load_weights, save_model
from pipeline.lm.folder import ModelFolder
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.optim import adamw, muon_adamw
from pipeline.lm.pretrain_run import (
    budget_change,
    pretrain_run_id,
    schedule_of,
    settings_of,
    total_steps,
)
from pipeline.lm.schedule import lr_at, phases_problem

FAULT_NAN_GRAD = "GPTPIPE_FAULT_NAN_GRAD_AT_STEP"


class NonFiniteLoss(GptpipeError):
    pass


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, runtime: Runtime, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over (N, T + 1) windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch].to(runtime.device)
        with runtime.autocast():
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def _rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _optimizer(model: GPT, train: TrainParams, runtime: Runtime) -> torch.optim.Optimizer:
    """train.optimizer's: AdamW, or Muon for the hidden matrices with AdamW for the rest
    (its Newton-Schulz iterations in float32 unless the run computes in bfloat16)."""
    betas = (train.beta1, train.beta2)
    if train.optimizer == "adamw":
        return adamw(model, lr=train.lr, weight_decay=train.weight_decay, betas=betas,
                     device=runtime.device)
    ns_dtype = torch.bfloat16 if runtime.dtype == torch.bfloat16 else torch.float32
    return muon_adamw(model, model.hidden_matrices(), lr=train.lr,
                      weight_decay=train.weight_decay, betas=betas, muon_lr=train.muon_lr,
                      muon_momentum=train.muon_momentum,
                      muon_weight_decay=train.muon_weight_decay, ns_steps=train.muon_ns_steps,
                      device=runtime.device, ns_dtype=ns_dtype)


@dataclass
class StepLog:
    step: int
    train_loss: float
    lr: float
    tokens_per_second: float


class Trainer:
    """One pretraining run. ``inputs`` (name -> file or folder: the token shards, the
    tokenizer, a base model) identify the run with the params; ``state_dir`` is the run
    folder; ``init_from``, a model folder of this very shape to start from (continued
    pretraining), else random weights; ``shared_settings``, what every process of a
    distributed run must also agree on (the stage's other params that shape outputs)."""

    def __init__(self, model_params: ModelParams, train: TrainParams, runtime: Runtime,
                 train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int,
                 inputs: dict[str, Path], state_dir: Path, provenance: dict[str, Any],
                 init_from: ModelFolder | Path | None = None,
                 shared_settings: dict[str, Any] | None = None,
                 train_spans: SourceSpans | None = None) -> None:
        self.train, self.runtime, self.provenance = train, runtime, provenance
        # Up to the first collective, set-up can fail in one process only (its machine's
        # files, memory): through together(), it then stops them all.
        together(runtime, lambda: self._build(model_params, vocab_size, train_tokens,
                                              val_tokens, inputs, init_from, train_spans))
        machine = {**describe_machine(runtime.device, runtime.dtype), "compile": train.compile}
        self.run = Run("pretrain", state_dir, self.identity, self.total_steps, self.model,
                       runtime, settings=settings_of(train), machine=machine,
                       allow=budget_change(train, self.config.context, runtime.world_size),
                       shared=shared_settings)
        resumed = self.run.start(self.model, self.optimizer)
        self.resumed_from = None if resumed is None else self._restore(*resumed)
        self.network: nn.Module = torch.compile(self.model) if train.compile else self.model
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.network, device_ids=ids)
        fault = os.environ.get(FAULT_NAN_GRAD, "")
        self.fault_step = int(fault) if fault.isdigit() else None

    def _build(self, model_params: ModelParams, vocab_size: int, train_tokens: np.ndarray,
               val_tokens: np.ndarray, inputs: dict[str, Path],
               init_from: ModelFolder | Path | None, train_spans: SourceSpans | None) -> None:
        """This process's own set-up: the run's identity, model, optimizer, data
        (``train_spans``: where each source lies, for train.source_weights)."""
        train, runtime = self.train, self.runtime
        self.config = GPTConfig(vocab_size=vocab_size, **asdict(model_params))
        self.total_steps = total_steps(train, self.config.context, runtime.world_size)
        problem = phases_problem(warmup_steps=train.warmup_steps, total_steps=self.total_steps,
                                 shape=train.schedule, decay_fraction=train.decay_fraction)
        if problem:
            raise GptpipeError(f"train.schedule = {train.schedule!r}: {problem}; allowed: "
                               "fewer warmup steps, a smaller train.decay_fraction or a "
                               "larger budget")
        self.identity = pretrain_run_id(model_params, train, runtime.world_size, inputs)
        torch.manual_seed(train.seed)  # the model's init draws from the global generator
        self.model = GPT(self.config)
        if init_from is not None:
            load_weights(self.model, init_from)
        self.model.to(runtime.device)
        self.optimizer = _optimizer(self.model, train, runtime)
        by_source = (None if train_spans is None else weighted_starts(
            train_spans, train.source_weights, len(train_tokens) - self.config.context))
        self.sampler = WindowSampler(train_tokens, self.config.context, train.batch_size,
                                     train.seed + 1, runtime.rank, runtime.world_size,
                                     by_source)
        self.val_windows = eval_windows(val_tokens, self.config.context, train.eval_windows)
        # float16 needs its gradients scaled (GPUs without bfloat16); its state is resumed.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=(
            runtime.dtype == torch.float16 and runtime.device.type in ("cuda", "cpu")))
        self.step = 0
        self.tokens_per_step = (
            train.batch_size * train.grad_accum * runtime.world_size * self.config.context)
        if runtime.device.type == "cpu":
            check_cpu_memory(train.batch_size, self.config)

    @property
    def state_dir(self) -> Path:
        return self.run.path

    @property
    def best_step(self) -> int:
        return -1 if self.run.best.step is None else self.run.best.step

    @property
    def best_val_loss(self) -> float:
        return self.run.best.record.get("val_loss", math.inf)

    def _restore(self, rng: dict[str, torch.Tensor], info: dict[str, Any]) -> int:
        """The loop's own state from a snapshot; returns the step resumed from."""
        torch.set_rng_state(rng["torch"])
        if self.runtime.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        self.sampler.load_state_dict({"generator": rng["sampler"],
                                      "batches_drawn": info["batches_drawn"]})
        if self.scaler.is_enabled() and info.get("scaler"):
            self.scaler.load_state_dict(info["scaler"])
        self.step = int(info["step"])
        return self.step

    def save_state(self) -> None:
        """Snapshot at this step boundary: the generators and data position as they stand."""
        rng = {**_rng_state(self.runtime), "sampler": self.sampler.generator.get_state()}
        info = {"batches_drawn": self.sampler.batches_drawn, "scaler": self.scaler.state_dict()}
        self.run.save(self.step, self.model, self.optimizer, rng, info)

    # ------------------------------------------------------------------ training
    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        accum = self.train.grad_accum
        loss_sum = torch.zeros((), device=self.runtime.device)
        for micro in range(accum):
            # One copy of the (B, T + 1) windows, from pinned memory on a GPU, sliced there.
            window = self.sampler.next_windows(pin_memory=self.runtime.device.type == "cuda")
            window = window.to(self.runtime.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.runtime.distributed and micro < accum - 1:
                sync = self.network.no_sync()  # all-reduce gradients once per step
            with sync:
                with self.runtime.autocast():
                    _, loss = self.network(window[:, :-1], window[:, 1:])
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        mean = loss_sum / accum
        if self.runtime.distributed:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        value = mean.item()
        if not math.isfinite(value):
            self._stop_non_finite(f"the training loss is {value}")
        if self.fault_step == self.step + 1:  # the testing hook (module docstring)
            next(self.model.parameters()).grad.view(-1)[0] = math.nan
        self._check_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _check_gradients(self) -> None:
        """Clip (train.grad_clip) and stop before the update if the gradient norm is not
        finite. float16's scaler skips such steps itself, shrinking its scale."""
        if self.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        elif not self.scaler.is_enabled():
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        else:
            return
        if not self.scaler.is_enabled() and not math.isfinite(norm.item()):
            self._stop_non_finite(f"the gradient norm is {norm.item()}")

    def _stop_non_finite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        kept = ("no snapshot was saved yet" if self.run.saved_step is None else
                f"the last good snapshot (step {self.run.saved_step}) in {self.state_dir} "
                "is kept, and the next run resumes from it")
        raise NonFiniteLoss(f"pretrain: {what} at step {self.step + 1}; stopped before the "
                            f"weights changed; {kept}; try a lower train.lr, or "
                            "train.grad_clip > 0")

    def evaluate(self) -> float:
        return mean_loss(self.model, self.val_windows, self.runtime, self.train.batch_size)

    def fit(self, on_log: Callable[[StepLog], None], on_eval: Callable[[int, float], None],
            progress: Any = None) -> None:
        """Train to the budget; call on_log every log_every steps and on_eval after evals.

        A stop signal (Ctrl-C or SIGTERM) does not interrupt a step half-way: the step in
        hand finishes, a snapshot is saved and a GptpipeError says where. A second signal
        aborts at once.
        """
        with self.run.signals:
            self._loop(on_log, on_eval, progress)

    def _loop(self, on_log, on_eval, progress) -> None:
        train = self.train
        self.model.train()
        window_tokens, window_start = 0, time.perf_counter()
        schedule = schedule_of(train)
        while self.step < self.total_steps:
            lr = lr_at(self.step, **schedule, total_steps=self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups: muon_lr / lr
            loss = self._step_or_out_of_memory()
            self.step += 1
            window_tokens += self.tokens_per_step
            if progress is not None:
                progress.update(1)
            last = self.step == self.total_steps
            if self.step % train.log_every == 0 or last:
                if self.runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                on_log(StepLog(self.step, loss, lr, window_tokens / max(elapsed, 1e-9)))
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % train.eval_every == 0 or last:
                started = time.perf_counter()
                val_loss = self.evaluate()
                if val_loss < self.best_val_loss:
                    self.run.best.keep(self.step, val_loss=val_loss)
                on_eval(self.step, val_loss)
                window_start += time.perf_counter() - started  # eval time is not training
            self.run.end_step(self.step, due=self.step % train.checkpoint_every == 0 or last,
                              over=last, save=self.save_state)

    def _step_or_out_of_memory(self) -> float:
        try:
            return self._train_step()
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            raise batch_too_large(self.train.batch_size, self.config.context,
                                  self.runtime.device) from None

    def finish(self, out_dir: Path, tokenizer_path: Path) -> None:
        """Write ``out_dir/best`` and ``out_dir/last`` as self-contained model checkpoints
        (on every machine: each has the whole run)."""
        if not self.runtime.writes_files:
            return
        if self.run.best.step is None:
            raise GptpipeError(
                f"pretrain: no finite val loss was ever measured, so there is no best model "
                f"in {self.state_dir}; lower train.lr or set train.grad_clip > 0")
        with torch.random.fork_rng(devices=[]):  # building a GPT draws its initial weights
            best = GPT(self.config)
        best.load_state_dict(self.run.best.state_dict())
        with atomic_dir(out_dir) as tmp:
            save_model(tmp / "best", best, self.config, {
                **self.provenance, "step": self.run.best.step, "val_loss": self.best_val_loss,
            }, tokenizer_path)
            save_model(tmp / "last", self.model, self.config,
                       {**self.provenance, "step": self.step}, tokenizer_path)
