"""The CPU kernel pin (pipeline/cli.py): float32 training gives the same bits on every
x86-64 machine with AVX2 or newer, whatever its widest instruction set."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import BIN, REPO_ROOT

from pipeline.cli import KERNELS_SWITCH, PINNED_KERNELS, pin_kernels, pinned_threads

# A few AdamW steps of the default model shape (float32, fused AdamW as pretraining runs it),
# in a fresh process that sets the pin as the `gptpipe` entry point does, before torch is
# imported. Prints torch's chosen CPU capability and a digest of the trained weights.
_STEPS = textwrap.dedent("""
    import hashlib, os, platform, sys
    from pipeline.cli import physical_cores, pin_kernels
    pin_kernels(os.environ, platform.machine(), physical_cores())
    import torch
    from pipeline.lm.model import GPT, GPTConfig
    from pipeline.lm.optim import adamw
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512))
    optimizer = adamw(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95),
                      device=torch.device("cpu"))
    tokens = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = torch.randint(0, 512, (4, 129), generator=tokens)  # (B, T + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    digest = hashlib.sha256()
    for _, tensor in sorted(model.state_dict().items()):
        digest.update(tensor.contiguous().numpy().tobytes())
    print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
""")

# What an AVX2-only machine's libraries choose by themselves.
_AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                 "ONEDNN_MAX_CPU_ISA": "AVX2"}
_SWITCHES = (*PINNED_KERNELS, KERNELS_SWITCH, "OMP_NUM_THREADS")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return {flag for line in info if line.startswith("flags")
                    for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _train(extra_env: dict[str, str], threads: int = 1) -> tuple[str, str]:
    """(CPU capability, weights digest) of :data:`_STEPS` run with ``extra_env`` over an
    environment cleared of every kernel switch."""
    env = {key: value for key, value in os.environ.items() if key not in _SWITCHES}
    env.update(extra_env, PYTHONPATH=str(REPO_ROOT), PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    done = subprocess.run([sys.executable, "-c", _STEPS, str(threads)], env=env, check=True,
                          capture_output=True, text=True, timeout=240)
    capability, digest = done.stdout.split()
    return capability, digest


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "avx2" not in _cpu_flags(), reason="an x86-64 CPU with AVX2")
def test_pinned_kernels_give_the_same_bits_as_an_avx2_machine():
    # This machine as it is (AVX-512 where it has it), and as an AVX2-only machine would
    # run: with the pin both run AVX2 kernels and train the very same weights.
    here = _train({})
    avx2_machine = _train(_AVX2_MACHINE)
    assert here[0] == avx2_machine[0] == "AVX2"
    assert here[1] == avx2_machine[1]
    # Lifting the pin lets torch pick this machine's widest kernels again.
    native = _train({KERNELS_SWITCH: "native"})
    expected = "AVX512" if "avx512f" in _cpu_flags() else "AVX2"
    assert native[0] == expected


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "avx2" not in _cpu_flags(), reason="an x86-64 CPU with AVX2")
def test_pinned_thread_counts_give_the_same_bits():
    # Machines have different core counts; the pin rounds them down to a power of two.
    assert _train({}, threads=1) == _train({}, threads=2) == _train({}, threads=4)


def test_pinned_threads_are_the_largest_power_of_two_that_fits():
    assert [pinned_threads(cores) for cores in (0, 1, 2, 3, 6, 8, 12, 64)] == \
        [1, 1, 2, 2, 4, 8, 8, 64]


def test_pin_sets_every_switch_on_x86_and_replaces_values_set_outside():
    environ = {"ATEN_CPU_CAPABILITY": "default", "OTHER": "kept"}
    pin_kernels(environ, "x86_64", cores=6)
    assert environ == {**PINNED_KERNELS, "OTHER": "kept", "OMP_NUM_THREADS": "4"}
    # A thread count set outside is the user's choice (the machine record keeps it).
    chosen = {"OMP_NUM_THREADS": "3"}
    pin_kernels(chosen, "x86_64", cores=6)
    assert chosen["OMP_NUM_THREADS"] == "3"


def test_native_lifts_the_pin_and_other_architectures_keep_their_own_kernels():
    native = {KERNELS_SWITCH: "native"}
    pin_kernels(native, "x86_64", cores=6)
    assert native == {KERNELS_SWITCH: "native"}
    arm: dict[str, str] = {}
    pin_kernels(arm, "aarch64", cores=6)
    assert arm == {}


def test_an_unknown_kernel_choice_stops_with_one_line(tmp_path):
    env = {**os.environ, KERNELS_SWITCH: "fast"}
    done = subprocess.run([str(BIN / "gptpipe"), "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: environment GPTPIPE_KERNELS='fast': allowed avx2 (the same bits on every "
        "x86-64 machine) or native (fastest)"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "avx2" not in _cpu_flags(), reason="an x86-64 CPU with AVX2")
def test_the_kernel_pin_benchmark_runs_and_reports_both_settings(tmp_path):
    out = tmp_path / "kernels.md"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_repro.py"), "--kernels",
                    "1", "--kernel-steps", "1", "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=240)
    rows = [line.split(" | ")[:2] for line in out.read_text().splitlines()
            if line.startswith(("| avx2", "| native"))]
    native = "AVX512" if "avx512f" in _cpu_flags() else "AVX2"
    assert rows == [["| avx2", "AVX2"], ["| native", native]]
