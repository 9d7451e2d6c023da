"""Device, dtype and distributed set-up in one place.

``device: auto`` picks cuda, then mps, then cpu and says so. Mixed precision is chosen
per device: bfloat16 autocast on GPUs that support it, float16 with a gradient scaler on
older GPUs, float32 on CPU. ``bfloat16`` on a CPU is allowed where the processor runs it
natively (AVX512-BF16 or AMX on x86, the BF16 extension on Arm) and refused elsewhere,
where it is emulated and far slower than float32; "auto" keeps float32 on every CPU so
that the default run's outputs are the same bits on any machine (see params.yaml).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.core.errors import GptpipeError


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Whether this process writes the run folder and the stage's outputs: the first
    # process of each machine, so that every machine holds the whole run (a torchrun
    # rendezvous may give global rank 0 to any machine), but only one of the machines
    # that share a folder (see pipeline.core.ranks.one_writer_per_folder).
    writes_files: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        dtype = str(self.dtype).replace("torch.", "")
        where = f", rank {self.rank} of {self.world_size}" if self.distributed else ""
        return f"{name}, {dtype}{where}"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(requested: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N``/``mps``; refuse what is not there."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "mps":
        if not _mps_available():
            raise GptpipeError(f"{key} = 'mps' but no Apple GPU is available; allowed: auto or cpu")
        return torch.device("mps")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GptpipeError(
                f"{key} = {requested!r} but this machine has no CUDA GPU "
                "(or torch is a CPU build); allowed: auto or cpu"
            )
        index = int(requested[5:]) if ":" in requested else local_rank
        count = torch.cuda.device_count()
        if index >= count:
            raise GptpipeError(
                f"{key} = {requested!r} but only {count} GPU(s) are visible; "
                f"allowed: cuda:0 .. cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise GptpipeError(f"{key} = {requested!r}; allowed: auto, cpu, cuda, cuda:N or mps")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX tiles (x86), or
    the BF16 extension (Arm). Asked of torch where it can tell, else of the kernel
    (``cpuinfo`` on Linux, sysctl on macOS)."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    if sys.platform == "darwin":  # Apple silicon: the kernel reports FEAT_BF16
        try:
            found = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                                   capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return found.strip() == "1"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as info:
            flags = {word for line in info if line.lower().startswith(("flags", "features"))
                     for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_dtype(requested: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if requested == "bfloat16" and not bf16:
            raise GptpipeError(f"{key} = 'bfloat16' is not supported by this GPU; allowed: float16")
        return getattr(torch, requested)
    if requested in ("auto", "float32"):
        return torch.float32
    if device.type == "cpu" and requested == "bfloat16":
        if cpu_has_native_bf16():
            return torch.bfloat16
        raise GptpipeError(
            f"{key} = 'bfloat16' on cpu, but this CPU has no native bfloat16 (AVX512-BF16, "
            "AMX or Arm BF16), where it runs far slower than float32; allowed: auto or float32"
        )
    if device.type == "cpu":
        raise GptpipeError(
            f"{key} = {requested!r} on cpu; allowed: auto or float32, or bfloat16 on a CPU "
            "with native bfloat16 (float16 on a CPU runs far slower than float32)"
        )
    return getattr(torch, requested)


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_retained = False


def retain_freed_memory() -> bool:
    """Keep freed CPU memory in the process instead of handing it back to the kernel.

    A training step allocates and frees the same large buffers (logits, activations) every
    step. glibc serves each buffer over its mmap threshold with fresh pages and returns
    them on free, so every step page-faults them in again: about 170,000 faults per step
    on the 6 x 384 benchmark model. With the heap never trimmed and large blocks served
    from it, faults drop 15-30x and a CPU step is 5-10% faster (bench/README.md). The
    cost is that the process keeps its peak memory until it exits, which a training run
    does anyway. Returns whether the setting took (glibc on Linux only).
    """
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): keep its defaults
        return False
    _retained = all((
        mallopt(_M_MMAP_THRESHOLD, 2**31 - 1),  # serve large blocks from the heap
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap
        mallopt(_M_TOP_PAD, 2**28),  # grow it in 256 MiB steps
    ))
    return _retained


def setup_runtime(device: str, dtype: str, threads: int = 0,
                  collective_timeout: float = 1800.0) -> Runtime:
    """Read torchrun's environment, join the process group if any, and pick the device.
    ``collective_timeout``: the seconds a collective waits for the other processes before
    it fails (PyTorch's defaults: 10 minutes for NCCL, 30 for gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if chosen.type == "cpu":
        retain_freed_memory()
    if chosen.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    elif chosen.type == "cpu" and world_size > 1:
        # Processes on one machine share its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
            os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        # TF32 matmuls: about 2x float32 throughput on Ampere+ at no loss that matters here.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(seconds=collective_timeout))
    runtime = Runtime(chosen, torch.float32, rank, world_size, local_rank,
                      writes_files=local_rank == 0)
    # After joining: a dtype one machine's hardware refuses stops every process.
    return replace(runtime, dtype=together(runtime, lambda: pick_dtype(dtype, chosen)))


_Result = TypeVar("_Result")


def together(runtime: Runtime, action: Callable[[], _Result]) -> _Result:
    """Run ``action`` in every process of a distributed run; if it fails in any, fail in
    all, so that no process is left waiting in a collective for one that stopped.

    Work that can fail in one process only (its machine's files, memory or hardware)
    goes through here. The process that failed raises its own error; the others raise a
    GptpipeError with the same line (or naming the failed process and its error). Every
    process must call it at the same point: it is itself a collective.
    """
    if not runtime.distributed:
        return action()
    result: Any = None
    own: BaseException | None = None
    failure: tuple[str, bool] | None = None
    try:
        result = action()
    except Exception as err:  # every failure must reach the other processes
        own = err
        failure = (str(err), isinstance(err, GptpipeError))
    failures: list[tuple[str, bool] | None] = [None] * runtime.world_size
    dist.all_gather_object(failures, failure)
    failed = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
    if failed is None:
        return result
    if own is not None:
        raise own
    rank, (message, clear) = failed
    raise GptpipeError(message if clear else f"process {rank} of {runtime.world_size} "
                       f"failed: {message}")


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
