"""Device selection and the CPU allocator setting (pipeline/core/device.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

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


def test_cpu_refuses_reduced_precision():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(GptpipeError, match=r"train.dtype = 'bfloat16' on cpu"):
        pick_dtype("bfloat16", torch.device("cpu"))
