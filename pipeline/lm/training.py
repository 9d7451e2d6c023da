"""The pretraining loop: AdamW, warmup + cosine, clipping, accumulation, DDP.

``Trainer`` owns one run's steps, evaluations and best weights (by val loss); resuming,
snapshots and stop signals are the run folder's (:class:`pipeline.core.runs.RunFolder`).
It snapshots every ``train.checkpoint_every`` steps, evaluates every ``train.eval_every``
steps, and stops with a clear error on a non-finite loss without overwriting the last
good snapshot. The first process of each machine writes files (one per shared folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.device import Runtime, together
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.params import ModelParams, TrainParams
from pipeline.core.runs import (
    SNAPSHOT,
    STATE_JSON,
    STATE_TENSORS,
    RunFolder,
    StopSignals,
    apply_training_state,
    interrupted_error,
    run_fingerprint,
)
from pipeline.core.stage import say
from pipeline.lm.batching import WindowSampler, eval_windows
from pipeline.lm.checkpoint import load_weights, save_model
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.optim import adamw
from pipeline.lm.schedule import lr_at


class NonFiniteLoss(GptpipeError):
    pass


def total_steps(train: TrainParams, context: int, world_size: int) -> int:
    """The step budget: train.steps, or enough steps to see train.tokens tokens."""
    if train.tokens > 0:
        per_step = train.batch_size * train.grad_accum * world_size * context
        return max(1, math.ceil(train.tokens / per_step))
    return train.steps


# Params a run stopped half-way may change and still resume: they decide when things are
# measured and saved (and whether the graph is compiled), not what is trained.
CADENCE_PARAMS = frozenset({"eval_every", "eval_windows", "checkpoint_every", "log_every",
                            "compile"})


def fingerprints(model: ModelParams, train: TrainParams, world_size: int,
                 inputs: dict[str, Path]) -> tuple[str, str]:
    """(resume, finished): the run's fingerprints (:func:`pipeline.core.runs.run_fingerprint`)
    over the model and train params, the process count and the bytes of ``inputs`` (the
    token shards and the tokenizer). Cadence params are left out of the first, so a run
    stopped half-way may go on with another eval or snapshot cadence; a finished snapshot
    stands for the whole run's outputs (best model, logs), so reusing one needs them all."""
    train_params = asdict(train)
    steady = {k: v for k, v in train_params.items() if k not in CADENCE_PARAMS}
    base = {"model": asdict(model), "world_size": world_size}
    return (run_fingerprint({**base, "train": steady}, inputs),
            run_fingerprint({**base, "train": train_params}, inputs))


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


_WRITER_MARK = ".gptpipe-writer-"


def one_writer_per_folder(runtime: Runtime, folder: Path) -> Runtime:
    """``runtime`` with ``writes_files`` kept by one process per distinct ``folder``.

    Each machine's first process writes its own run folder, unless machines share it (a
    checkout on a network file system): then only the lowest-ranked of them writes, as
    two writers of one folder would replace each other's files. Found out by every
    writer leaving a mark in the folder, looking at whose marks it sees, and removing
    its own.
    """
    if not runtime.distributed:
        return runtime
    mark = folder / f"{_WRITER_MARK}{uuid.uuid4().hex}"

    def leave() -> None:
        if runtime.writes_files:
            folder.mkdir(parents=True, exist_ok=True)
            mark.touch()

    together(runtime, leave)
    seen = together(runtime, lambda: sorted(p.name for p in folder.glob(f"{_WRITER_MARK}*"))
                    if runtime.writes_files else [])
    marks: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(marks, mark.name if runtime.writes_files else None)
    together(runtime, lambda: mark.unlink(missing_ok=True))
    sharing = [rank for rank, name in enumerate(marks) if name is not None and name in seen]
    return replace(runtime, writes_files=runtime.writes_files and min(sharing) == runtime.rank)


class Trainer:
    """One pretraining run. ``inputs`` (name -> file or folder: the token shards, the
    tokenizer, a base model) are fingerprinted with the params; ``state_dir`` is the run
    folder; ``init_from``, a model folder of this very shape to start from (continued
    pretraining), else random weights."""

    def __init__(
        self,
        model_params: ModelParams,
        train: TrainParams,
        runtime: Runtime,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        vocab_size: int,
        inputs: dict[str, Path],
        state_dir: Path,
        provenance: dict[str, Any],
        init_from: Path | None = None,
        shared_settings: dict[str, Any] | None = None,
    ) -> None:
        self.train = train
        self.runtime = runtime
        self.provenance = provenance
        # What every process of a distributed run must share beside the run itself (the
        # stage's other params that shape its outputs), checked with the fingerprints.
        self.shared_settings = shared_settings or {}
        # Everything up to the first collective can fail in one process only (its
        # machine's files, memory): through together(), it then stops them all.
        together(runtime, lambda: self._build(model_params, train, runtime, train_tokens,
                                              val_tokens, vocab_size, inputs, state_dir,
                                              init_from))
        self._resume()
        self.network: nn.Module = self.model
        if train.compile:
            self.network = torch.compile(self.model)
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.network, device_ids=ids)

    def _build(self, model_params: ModelParams, train: TrainParams, runtime: Runtime,
               train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int,
               inputs: dict[str, Path], state_dir: Path, init_from: Path | None) -> None:
        """This process's own set-up: run folder, model, optimizer, data, memory check."""
        self.config = GPTConfig(vocab_size=vocab_size, **asdict(model_params))
        self.total_steps = total_steps(train, self.config.context, runtime.world_size)
        resume, finished = fingerprints(model_params, train, runtime.world_size, inputs)
        self.run = RunFolder("pretrain", state_dir, resume, self.total_steps, finished,
                             writer=runtime.writes_files)
        # Model init draws from the global generator: seed it from params.
        torch.manual_seed(train.seed)
        self.model = GPT(self.config)
        if init_from is not None:
            load_weights(self.model, init_from)
        self.model.to(runtime.device)
        self.optimizer = adamw(self.model, lr=train.lr, weight_decay=train.weight_decay,
                               betas=(train.beta1, train.beta2), device=runtime.device)
        self.sampler = WindowSampler(
            train_tokens, self.config.context, train.batch_size, train.seed + 1,
            runtime.rank, runtime.world_size,
        )
        self.pin_memory = runtime.device.type == "cuda"
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

    @property
    def state_dir(self) -> Path:
        return self.run.path

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
                "memory; lower train.batch_size (and raise train.grad_accum to keep the same "
                "tokens per step)"
            )

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Resume from the run folder's snapshot when it is one of this run.

        In a distributed run every machine's first process keeps a run folder on its own
        disk (no shared file system is needed, and a rendezvous may hand global rank 0 to
        any machine after a restart; machines that do share a folder keep one writer).
        First every process must run the same run: one whose params, token data, code or
        precision differ from process 0's stops every process with one line, as does a
        machine whose folder holds a snapshot of another run while another machine holds
        one of this run. Then the process holding the newest snapshot of this run sends it
        (and the best weights) to all: every process continues from the same step, and
        every machine's folder holds the run again. File work that can fail on one
        machine goes through :func:`together`, so a failure stops every process.
        """
        runtime, run = self.runtime, self.run
        if not runtime.distributed:
            info = run.start()
            if info is not None:
                self._restore(*run.load(self.model, self.optimizer))
            return
        self._check_same_run()
        held = self._gather(run.held_run() if run.writer else None)
        ours = [rank for rank, found in enumerate(held) if found and found[0] == run.fingerprint]
        other = [rank for rank, found in enumerate(held) if found and found[0] != run.fingerprint]
        if ours and other:
            raise GptpipeError(
                f"pretrain: process {other[0]}'s checkpoint folder ({self.state_dir} on its "
                f"machine) holds a snapshot of another run, while process {ours[0]}'s holds "
                "one of this run; delete that machine's snapshot to resume this run from the "
                "others', or every machine's to start afresh"
            )
        info = together(runtime, lambda: run.start() if run.writer else None)
        steps = self._gather(None if info is None else int(info["step"]))
        holders = [rank for rank, step in enumerate(steps) if step is not None]
        if not holders:
            return
        source = max(holders, key=lambda rank: (steps[rank], -rank))
        payload = [together(runtime, lambda: run.share() if runtime.rank == source else None)]
        dist.broadcast_object_list(payload, src=source)
        shared = payload[0]
        mine = steps[runtime.rank]
        if runtime.rank != source and run.writer and mine != steps[source]:
            have = "none" if mine is None else f"one of step {mine}"
            say("pretrain", f"this machine's checkpoint folder holds {have}: continuing "
                            f"from step {steps[source]} with process {source}'s snapshot")

        def adopt_and_restore() -> None:
            if runtime.rank != source:
                run.adopt(shared)
            snapshot = shared[SNAPSHOT]
            self._restore(*apply_training_state(snapshot[STATE_TENSORS],
                                                json.loads(snapshot[STATE_JSON]),
                                                self.model, self.optimizer))

        together(runtime, adopt_and_restore)

    def _gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, by global rank."""
        found: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(found, value)
        return found

    def _check_same_run(self) -> None:
        """Every process must run process 0's run: the same params (cadence included),
        token data, code, precision and shared settings."""
        mine = json.dumps([self.run.finished, str(self.runtime.dtype), self.shared_settings],
                          sort_keys=True)
        found = self._gather(hashlib.sha256(mine.encode()).hexdigest())
        odd = [rank for rank, fingerprint in enumerate(found) if fingerprint != found[0]]
        if odd:
            raise GptpipeError(
                f"pretrain: process {odd[0]} of {self.runtime.world_size} runs another run "
                "than process 0: its machine's params, token data, gptpipe code or resolved "
                f"train.dtype differ (fingerprint {str(found[odd[0]])[:12]} against "
                f"{str(found[0])[:12]}); give every machine the same commit, params.yaml, "
                "data (dvc pull) and kind of device"
            )

    def _restore(self, rng: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        _set_rng_state(rng, self.runtime)
        self.sampler.load_state_dict(
            {"generator": rng["sampler"], "batches_drawn": info["batches_drawn"]}
        )
        self.step = int(info["step"])
        self.best_val_loss = float(info["best_val_loss"])
        self.best_step = int(info["best_step"])
        self.resumed_from = self.step

    def save_state(self, rng: dict[str, torch.Tensor], sampler_state: dict) -> None:
        """Snapshot (each machine's first process); rng and sampler state are those at the
        step's start."""
        info = {
            "step": self.step,
            "total_steps": self.total_steps,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "batches_drawn": sampler_state["batches_drawn"],
        }
        state = {**rng, "sampler": sampler_state["generator"]}
        together(self.runtime, lambda: self.run.save(self.model, self.optimizer, state, info))

    # ------------------------------------------------------------------ training
    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        accum = self.train.grad_accum
        loss_sum = torch.zeros((), device=self.runtime.device)
        for micro in range(accum):
            # One copy of the (B, T + 1) windows, from pinned memory on a GPU, sliced there.
            window = self.sampler.next_windows(pin_memory=self.pin_memory).to(
                self.runtime.device, non_blocking=True)
            x, y = window[:, :-1], window[:, 1:]
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
                "try a lower train.lr, or train.grad_clip > 0"
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
            provenance = {**self.provenance, "step": self.step, "val_loss": val_loss}
            together(self.runtime, lambda: save_model(self.run.best, self.model, self.config,
                                                      provenance)
                     if self.runtime.writes_files else None)

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any rank: every rank stops at the same step."""
        local = self._signals.requested is not None
        if not self.runtime.distributed:
            return local
        flag = torch.tensor(float(local), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, on_log: Callable[[StepLog], None], on_eval: Callable[[int, float], None],
            progress: Any = None) -> None:
        """Train to the budget; call on_log every log_every steps and on_eval after evals.

        A stop signal (Ctrl-C or SIGTERM) does not interrupt a step half-way: the step in
        hand finishes, a snapshot is saved and a GptpipeError says where. A second signal
        aborts at once.
        """
        with StopSignals() as self._signals:
            self._loop(on_log, on_eval, progress)

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
                    "lower train.batch_size (and raise train.grad_accum to keep the same "
                    "tokens per step)"
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
            stop = self._stop_requested()
            if stop or self.step % train.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_state(_rng_state(self.runtime), self.sampler.state_dict())
            if stop and self.step < self.total_steps:
                # The step in hand finished and was snapshotted at its boundary: stop.
                signame = self._signals.requested or "a signal on another rank"
                raise interrupted_error("pretrain", signame, self.step, self.state_dir)

    def finish(self, out_dir: Path, tokenizer_path: Path) -> None:
        """Write ``out_dir/best`` and ``out_dir/last`` as self-contained model checkpoints
        (on every machine: each has the whole run)."""
        if not self.runtime.writes_files:
            return
        if not self.run.best.is_dir():
            raise GptpipeError(
                f"pretrain: no finite val loss was ever measured, so there is no best model "
                f"in {self.state_dir}; lower train.lr or set train.grad_clip > 0"
            )
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(self.run.best, tmp / "best")
            shutil.copyfile(tokenizer_path, tmp / "best" / "tokenizer.json")
            save_model(tmp / "last", self.model, self.config,
                       {**self.provenance, "step": self.step}, tokenizer_path)
