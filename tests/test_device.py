"""Device selection and the CPU allocator setting (pipeline/core/device.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.core import device
from pipeline.core.device import pick_device, pick_dtype
from pipeline.core.errors import GptpipeError

# A few training steps of a model whose logits (16 x 128 x 8192 floats, 64 MiB) are above
# glibc's largest mmap threshold, as the default pipeline's are; count the page faults of
# the steps after warm-up.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from pipeline.core.device import retain_freed_memory
    from pipeline.lm.model import GPT, GPTConfig
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, context=128, n_layer=1, n_head=2, n_embd=64))
    x = torch.randint(0, 8192, (16, 128))
    def step():
        model(x, x)[1].backward()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retained_memory_is_reused_without_page_faults():
    # Each step page-faults its fresh logits buffers in (64 MiB = 16,384 pages of 4 KiB,
    # several times over); with freed memory retained the steps reuse mapped pages.
    default, retained = _faults("default"), _faults("retain")
    assert default > 4 * 16_384
    assert retained < default / 5


def test_cpu_is_always_available_and_unknown_devices_are_refused():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(GptpipeError, match="allowed: auto, cpu, cuda, cuda:N or mps"):
        pick_device("tpu")


def test_cpu_auto_is_float32_even_with_native_bfloat16(monkeypatch):
    # The default run's outputs stay the same bits on every machine.
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_cpu_bfloat16_is_allowed_only_where_the_cpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(GptpipeError) as caught:
        pick_dtype("bfloat16", torch.device("cpu"))
    assert str(caught.value) == (
        "train.dtype = 'bfloat16' on cpu, but this CPU has no native bfloat16 (AVX512-BF16, "
        "AMX or Arm BF16), where it runs far slower than float32; allowed: auto or float32")


def test_cpu_float16_is_refused():
    with pytest.raises(GptpipeError, match=r"train.dtype = 'float16' on cpu; allowed: auto or"):
        pick_dtype("float16", torch.device("cpu"))


_X86 = "processor\t: 0\nmodel name\t: A CPU\nflags\t\t: fpu sse4_2 avx2 {extra}\n\n"
_ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n\n"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS asks sysctl, not /proc/cpuinfo")
@pytest.mark.parametrize(("text", "extra", "native"), [
    (_X86, "avx512f avx512_bf16", True), (_X86, "amx_tile amx_bf16", True),
    (_X86, "avx512f avx512bw", False), (_ARM, "sve bf16", True), (_ARM, "sve i8mm", False),
])
def test_native_bfloat16_is_read_from_the_kernels_cpu_flags(tmp_path, monkeypatch, text,
                                                             extra, native):
    # torch cannot tell (no probe says yes): the kernel's flags decide.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text.format(extra=extra) * 2)
    assert device.cpu_has_native_bf16(str(cpuinfo)) is native
    assert device.cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_a_probe_of_torch_that_says_yes_is_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    (tmp_path / "cpuinfo").write_text(_X86.format(extra=""))
    assert device.cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is True


_DESCRIBE = "import json; from pipeline.core.machine import describe_machine; " \
            "print(json.dumps(describe_machine()))"


def test_the_machine_record_names_what_picks_the_kernels():
    """A snapshot records it; a finished run is reused only where it is the same."""
    from pipeline.core.machine import describe_machine, machine_differences

    here = describe_machine("cpu", torch.bfloat16)
    assert here["torch"] == torch.__version__ and here["precision"] == "bfloat16"
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert here["threads"] == torch.get_num_threads()
    assert here["packages"]["numpy"] == importlib.metadata.version("numpy")
    assert describe_machine("cpu", torch.bfloat16) == here  # the same on every call
    # Another kernel choice (what an AVX2-only machine runs): another record.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    there = json.loads(subprocess.run([sys.executable, "-c", _DESCRIBE], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    assert there["kernel_switches"]["ATEN_CPU_CAPABILITY"] == "default"
    assert there["cpu_capability"] == "DEFAULT"
    differing = machine_differences(there, describe_machine())
    assert any(line.startswith("kernel_switches ") for line in differing)


def test_the_machine_record_says_when_the_kernel_pin_is_lifted():
    # GPTPIPE_KERNELS=native: each library's widest kernels, so other bits than the pin's.
    env = {**os.environ, "GPTPIPE_KERNELS": "native"}
    record = json.loads(subprocess.run([sys.executable, "-c", _DESCRIBE], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    assert record["kernel_switches"]["GPTPIPE_KERNELS"] == "native"
