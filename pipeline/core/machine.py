"""What computed a result: the machine, the software and the precision, as plain JSON.

Float results depend on more than params and data: the CPU's instruction set picks
torch's kernels (AVX-512 and AVX2 sum in another order), the BLAS and oneDNN builds and
their environment switches pick others, a GPU rounds differently again, and so do the
precision and the thread count. :func:`describe_machine` records all of it, so that a
snapshot (and any metrics file) can say what produced it, and a finished run is reused
only where training it again would compute the same bits.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from typing import Any

import torch

# Instruction-set extensions that change which kernels torch runs (x86 and Arm).
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd",
              "sve", "sve2", "bf16", "i8mm")
# Environment switches that make torch, MKL or oneDNN pick other kernels, and gptpipe's own
# (GPTPIPE_KERNELS=native: the libraries' widest kernels instead of the AVX2 pin, cli.py).
_KERNEL_SWITCHES = ("GPTPIPE_KERNELS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG",
                    "NVIDIA_TF32_OVERRIDE")


# The packages besides torch whose code computes the stages' numbers (numpy in the reward
# baseline and gold judge, the tokenizers' ids, safetensors' and pyarrow's bytes).
_PACKAGES = ("numpy", "scipy", "scikit-learn", "pyarrow", "safetensors", "tokenizers", "tiktoken")


def _package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`_PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpuinfo() -> tuple[str, list[str]]:
    """(CPU model name, its instruction-set flags among :data:`_ISA_FLAGS`) from
    /proc/cpuinfo; the platform's processor string and no flags elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = info.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    name, flags = "", set()
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return name or platform.machine(), [flag for flag in _ISA_FLAGS if flag in flags]


def _math_libraries() -> list[str]:
    """The BLAS, LAPACK and oneDNN builds torch was compiled with (from its config)."""
    config = torch.__config__.show()
    found = [line.strip(" -") for line in config.splitlines()
             if re.search(r"Math Kernel Library|MKL-DNN|oneDNN|OpenBLAS|Accelerate|"
                          r"CUDA Runtime|CuDNN", line)]
    for key in ("BLAS_INFO", "LAPACK_INFO"):
        match = re.search(rf"{key}=([^,\s]+)", config)
        if match:
            found.append(f"{key}={match.group(1)}")
    return found


def describe_machine(device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The machine and software a computation runs with, as JSON: the CPU (model, the
    instruction-set flags that pick kernels, torch's chosen CPU capability), the GPU, the
    torch build and its math libraries, the versions of the other packages that compute,
    the environment switches that pick kernels, the thread count, and the precision
    (``dtype``: the autocast dtype; None: float32).

    The same on every call on one machine and software, so two records compare equal
    exactly when the same kernels would run."""
    device = torch.device(device)
    cpu, flags = _cpuinfo()
    described: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "os": sys.platform,
        "torch": torch.__version__,
        "math_libraries": _math_libraries(),
        "packages": _package_versions(),
        "kernel_switches": {key: os.environ[key] for key in _KERNEL_SWITCHES
                            if key in os.environ},
        "threads": torch.get_num_threads(),
        "device": device.type,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "float32_matmul": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
        described["cuda"] = torch.version.cuda
        described["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return described


def machine_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old there, new here`` for each entry that differs between two records."""
    keys = sorted(set(old) | set(new))
    return [f"{key} {old.get(key)!r} there, {new.get(key)!r} here" for key in keys
            if old.get(key) != new.get(key)]


def kernels_summary(described: dict[str, Any]) -> str:
    """One line naming what decides a float result's bits in a :func:`describe_machine`
    record: the device (the GPU's name), the processor architecture, torch's CPU kernels,
    the precision and torch's version. Two runs of one configuration whose summaries
    differ are not expected to give the same bits."""
    device = described.get("gpu") or described.get("device", "cpu")
    return (f"{device} on {described.get('machine')}, {described.get('cpu_capability')} "
            f"kernels, {described.get('precision')}, torch {described.get('torch')}")
