"""The pretraining loop: AdamW, warmup + cosine, clipping, accumulation, DDP, resume.

``Trainer`` owns one run. It resumes from the training-state directory when that holds
an unfinished snapshot of the same run (same params, same data), saves a snapshot every
``train.checkpoint_every`` steps, evaluates every ``train.eval_every`` steps, keeps the
best weights by val loss, and stops with a clear error on a non-finite loss without
overwriting the last good snapshot. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.batching import WindowSampler, eval_windows
from pipeline.checkpoint import (
    load_training_state,
    read_training_info,
    save_model,
    save_training_state,
)
from pipeline.device import Runtime
from pipeline.errors import GptpipeError
from pipeline.io import atomic_dir, source_digest
from pipeline.model import GPT, GPTConfig
from pipeline.params import ModelParams, TrainParams
from pipeline.schedule import lr_at

# Inside the training-state directory: the resumable snapshot, and the best weights so
# far (apart, so that replacing one never touches the other).
SNAPSHOT_DIR = "snapshot"
BEST_DIR = "best"


class NonFiniteLoss(GptpipeError):
    pass


def make_optimizer(model: nn.Module, train: TrainParams, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only; norms and biases are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel runs on CUDA and CPU (on CPU, about 2x faster than the loop of
    # per-tensor ops); MPS falls back to the default implementation.
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2),
        fused=device.type in ("cuda", "cpu"),
    )


def total_steps(train: TrainParams, context: int, world_size: int) -> int:
    """The step budget: train.steps, or enough steps to see train.tokens tokens."""
    if train.tokens > 0:
        per_step = train.batch_size * train.grad_accum * world_size * context
        return max(1, math.ceil(train.tokens / per_step))
    return train.steps


CADENCE_PARAMS = frozenset({"eval_every", "eval_windows", "checkpoint_every", "log_every",
                            "compile"})


def run_fingerprint(model: ModelParams, train: TrainParams, data: dict, world: int,
                    with_cadence: bool = False) -> str:
    """What a snapshot must share with this run to be resumed (params, data, code).

    Cadence params are left out, so a run stopped half-way may go on with another eval or
    snapshot cadence. A finished snapshot stands for the whole run's outputs (best model,
    logs), so reusing it needs every param equal: ``with_cadence=True``.
    """
    body = {
        "model": asdict(model),
        "train": {k: v for k, v in asdict(train).items()
                  if with_cadence or k not in CADENCE_PARAMS},
        "data": data,
        "world_size": world,
        "code": source_digest(),  # another gptpipe version: another run (io.source_digest)
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def _set_rng_state(state: dict[str, torch.Tensor], runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "can't allocate memory" in text or "out of memory" in text


@dataclass
class StepLog:
    step: int
    train_loss: float
    lr: float
    tokens_per_second: float


class Trainer:
    def __init__(
        self,
        model_params: ModelParams,
        train: TrainParams,
        runtime: Runtime,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        vocab_size: int,
        data_fingerprint: dict[str, Any],
        state_dir: Path,
        provenance: dict[str, Any],
    ) -> None:
        self.train = train
        self.runtime = runtime
        self.state_dir = Path(state_dir)
        self.provenance = provenance
        self.config = GPTConfig(vocab_size=vocab_size, **asdict(model_params))
        self.total_steps = total_steps(train, self.config.context, runtime.world_size)
        self.fingerprint = run_fingerprint(
            model_params, train, data_fingerprint, runtime.world_size
        )
        self.full_fingerprint = run_fingerprint(
            model_params, train, data_fingerprint, runtime.world_size, with_cadence=True
        )
        # Model init draws from the global generator: seed it from params.
        torch.manual_seed(train.seed)
        self.model = GPT(self.config).to(runtime.device)
        self.optimizer = make_optimizer(self.model, train, runtime.device)
        self.sampler = WindowSampler(
            train_tokens, self.config.context, train.batch_size, train.seed + 1,
            runtime.rank, runtime.world_size,
        )
        self.val_tokens = val_tokens
        self.val_windows = eval_windows(val_tokens, self.config.context, train.eval_windows)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=runtime.device.type == "cuda" and runtime.dtype == torch.float16
        )
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step = -1
        self.tokens_per_step = (
            train.batch_size * train.grad_accum * runtime.world_size * self.config.context
        )
        self.resumed_from: int | None = None
        self._check_memory()
        self._maybe_resume()
        self.network: nn.Module = self.model
        if train.compile:
            self.network = torch.compile(self.model)
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.network, device_ids=ids)

    def _check_memory(self) -> None:
        """Refuse, before training, a CPU batch whose activations cannot fit in RAM.

        On a CPU an oversized batch is not an exception: the kernel's OOM killer ends the
        process. So estimate instead: per token, about 20 * n_embd floats per layer are
        kept for the backward pass, plus 3 * vocab_size floats for the logits, their
        log-softmax and gradient (a measured upper bound for these models, rounded up).
        GPUs raise a catchable out-of-memory error, handled in fit().
        """
        if self.runtime.device.type != "cpu":
            return
        c = self.config
        per_token = 4 * (20 * c.n_layer * c.n_embd + 3 * c.vocab_size)
        needed = self.train.batch_size * c.context * per_token
        available = psutil.virtual_memory().available
        if needed > available:
            raise GptpipeError(
                f"train.batch_size = {self.train.batch_size} sequences of model.context = "
                f"{c.context} tokens need about {needed / 2**30:.1f} GiB of activations; "
                f"this machine has {available / 2**30:.1f} GiB free, so they do not fit in cpu "
                "memory; allowed: a smaller train.batch_size (raise train.grad_accum to keep "
                "the same tokens per step)"
            )

    # ------------------------------------------------------------------ resume
    def _maybe_resume(self) -> None:
        info = read_training_info(self.state_dir / SNAPSHOT_DIR)
        reason = None
        if info is None:
            pass
        elif info.get("fingerprint") != self.fingerprint:
            reason = "the checkpoint folder holds a snapshot of a different run"
        elif (info.get("step", 0) >= self.total_steps
              and info.get("full_fingerprint") != self.full_fingerprint):
            reason = ("the checkpoint folder holds a run finished with another eval, log or "
                      "snapshot cadence")
        if info is None or reason:
            if reason:
                self._say(f"{reason}: starting afresh")
            if self.runtime.is_main and self.state_dir.exists():
                shutil.rmtree(self.state_dir)  # never mix another run's best weights in
            self._barrier()
            return
        rng, info = load_training_state(
            self.state_dir / SNAPSHOT_DIR, self.model, self.optimizer
        )
        _set_rng_state(rng, self.runtime)
        self.sampler.load_state_dict(
            {"generator": rng["sampler"], "batches_drawn": info["batches_drawn"]}
        )
        self.step = int(info["step"])
        self.best_val_loss = float(info["best_val_loss"])
        self.best_step = int(info["best_step"])
        self.resumed_from = self.step
        if self.step >= self.total_steps:  # killed after the last snapshot: no step left
            self._say(f"the checkpoint folder holds this run, finished at step {self.step}: "
                      "writing its outputs")
        else:
            self._say(f"resuming from step {self.step} of {self.total_steps}")

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"pretrain: {message}", flush=True)

    def save_state(self, rng: dict[str, torch.Tensor], sampler_state: dict) -> None:
        """Snapshot (rank 0 only); rng and sampler state are those at the step's start."""
        if self.runtime.is_main:
            info = {
                "step": self.step,
                "total_steps": self.total_steps,
                "best_val_loss": self.best_val_loss,
                "best_step": self.best_step,
                "batches_drawn": sampler_state["batches_drawn"],
                "fingerprint": self.fingerprint,
                "full_fingerprint": self.full_fingerprint,
            }
            save_training_state(
                self.state_dir / SNAPSHOT_DIR, self.model, self.optimizer,
                {**rng, "sampler": sampler_state["generator"]}, info,
            )
        self._barrier()

    def _barrier(self) -> None:
        if self.runtime.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ training
    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        accum = self.train.grad_accum
        loss_sum = torch.zeros((), device=self.runtime.device)
        for micro in range(accum):
            x, y = self.sampler.next_batch()
            x = x.to(self.runtime.device, non_blocking=True)
            y = y.to(self.runtime.device, non_blocking=True)
            last = micro == accum - 1
            sync = contextlib.nullcontext()
            if self.runtime.distributed and not last:
                sync = self.network.no_sync()  # all-reduce gradients once per step
            with sync:
                with self.runtime.autocast():
                    _, loss = self.network(x, y)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        mean = loss_sum / accum
        if self.runtime.distributed:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        value = mean.item()
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(
                f"pretrain: the training loss is {value} at step {self.step + 1}; "
                f"stopped, and the last good checkpoint in {self.state_dir} is kept; "
                "allowed: a finite loss (try a lower train.lr or train.grad_clip > 0)"
            )
        if self.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def evaluate(self) -> float:
        return mean_loss(self.model, self.val_windows, self.runtime, self.train.batch_size)

    def _keep_if_best(self, val_loss: float) -> None:
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step = val_loss, self.step
            if self.runtime.is_main:
                save_model(self.state_dir / BEST_DIR, self.model, self.config,
                           {**self.provenance, "step": self.step, "val_loss": val_loss})

    def _interrupt_requested(self) -> bool:
        if not self.runtime.distributed:
            return self._interrupted
        flag = torch.tensor(float(self._interrupted), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def fit(self, on_log: Callable[[StepLog], None], on_eval: Callable[[int, float], None],
            progress: Any = None) -> None:
        """Train to the budget; call on_log every log_every steps and on_eval after evals.

        Ctrl-C (SIGINT) does not interrupt a step half-way: the step in hand finishes,
        a snapshot is saved and a GptpipeError says where. A second Ctrl-C aborts at once.
        """
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            self._loop(on_log, on_eval, progress)
            return

        def request_stop(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            self._loop(on_log, on_eval, progress)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self, on_log, on_eval, progress) -> None:
        train = self.train
        self.model.train()
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            lr = lr_at(self.step, lr=train.lr, min_lr=train.min_lr,
                       warmup_steps=train.warmup_steps, total_steps=self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            try:
                loss = self._train_step()
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_out_of_memory(err):
                    raise
                raise GptpipeError(
                    f"train.batch_size = {train.batch_size} sequences of model.context = "
                    f"{self.config.context} tokens do not fit in {self.runtime.device} memory; "
                    "allowed: a smaller train.batch_size (raise train.grad_accum to keep the "
                    "same tokens per step)"
                ) from None
            self.step += 1
            window_tokens += self.tokens_per_step
            if progress is not None:
                progress.update(1)
            if self.step % train.log_every == 0 or self.step == self.total_steps:
                if self.runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                on_log(StepLog(self.step, loss, lr, window_tokens / max(elapsed, 1e-9)))
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % train.eval_every == 0 or self.step == self.total_steps:
                started = time.perf_counter()
                val_loss = self.evaluate()
                self._keep_if_best(val_loss)
                on_eval(self.step, val_loss)
                window_start += time.perf_counter() - started  # eval time is not training
            if self.step % train.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_state(_rng_state(self.runtime), self.sampler.state_dict())
            elif self._interrupt_requested():
                # Ctrl-C: finish the step in hand, snapshot at this step boundary, stop.
                self.save_state(_rng_state(self.runtime), self.sampler.state_dict())
                raise GptpipeError(
                    f"pretrain: interrupted at step {self.step}; a checkpoint was saved in "
                    f"{self.state_dir}; run dvc repro again to resume"
                )

    def finish(self, out_dir: Path, tokenizer_path: Path) -> None:
        """Write ``out_dir/best`` and ``out_dir/last`` as self-contained model checkpoints."""
        if not self.runtime.is_main:
            return
        if not (self.state_dir / BEST_DIR).is_dir():
            raise GptpipeError(
                f"pretrain: no finite val loss was ever measured, so there is no best model "
                f"in {self.state_dir}; allowed: a run whose val loss is finite"
            )
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(self.state_dir / BEST_DIR, tmp / "best")
            shutil.copyfile(tokenizer_path, tmp / "best" / "tokenizer.json")
            save_model(tmp / "last", self.model, self.config,
                       {**self.provenance, "step": self.step}, tokenizer_path)
