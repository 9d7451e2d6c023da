"""The ``gptpipe`` command: one subcommand per DVC stage, each defined in its own module.

Stage modules are imported only when their subcommand runs, so ``gptpipe --help`` and a
cheap stage start fast without loading torch or pyarrow.

Before any of them imports torch, :func:`pin_kernels` fixes the code paths of the CPU math
libraries, so that float32 training gives the same bits on every x86-64 machine with AVX2
or newer: torch's own kernels (ATen), MKL's BLAS and oneDNN each pick, by default, the
widest vector instructions the CPU has, and AVX-512 sums in another order than AVX2.
``GPTPIPE_KERNELS=native`` in the environment lifts the pin, for speed over identical bits
(bench/README.md measures the cost).
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import importlib
import importlib.util
import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

import click

from pipeline.core.errors import GptpipeError
from pipeline.core.stage import command_help

# The AVX2 code path of every CPU math library the stages run, set before torch is imported
# (each library reads its switch once, when it loads). AVX2 is the widest instruction set
# that every x86-64 machine of the last decade has; MKL's STRICT mode also makes its matrix
# products independent of the thread count.
PINNED_KERNELS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
}
# The environment switch that lifts the pin: "native" (each library's own choice) or
# "avx2" (the default).
KERNELS_SWITCH = "GPTPIPE_KERNELS"

# subcommand -> module that defines ``main`` (a click command), in pipeline order.
COMMANDS: dict[str, str] = {
    "ingest": "pipeline.stages.ingest",
    "clean": "pipeline.stages.clean",
    "split": "pipeline.stages.split",
    "contamination": "pipeline.stages.contamination",
    "vocab": "pipeline.stages.vocab",
    "tokenize": "pipeline.stages.tokenize",
    "pretrain": "pipeline.stages.pretrain",
    "evaluate": "pipeline.stages.evaluate",
    "preferences": "pipeline.stages.preferences",
    "reward": "pipeline.stages.reward",
    "sft": "pipeline.stages.sft",
    "rlhf": "pipeline.stages.rlhf",
    "export": "pipeline.stages.export",
    "compare": "pipeline.compare.command",
    "lm-eval-tasks": "pipeline.lm.lm_eval_tasks",
    "generate": "pipeline.lm.generate",
}

def short_help(name: str) -> str:
    """The one-line help of a subcommand, read from its module's docstring without
    importing the module (which would load torch): the same text its own --help shows."""
    spec = importlib.util.find_spec(COMMANDS[name])
    source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    return command_help(name, ast.get_docstring(ast.parse(source)))[0]


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        return importlib.import_module(module).main

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short_help(name)) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gptpipe")
def cli() -> None:
    """gptpipe: a reproducible pipeline from raw text to a pretrained GPT.

    Each subcommand is one stage of dvc.yaml; run the whole pipeline with `dvc repro`.
    """


def pinned_threads(cores: int) -> int:
    """The CPU threads of a pinned run on ``cores`` cores: the largest power of two that
    fits. The thread count splits torch's work, and so its sums: measured on a few AdamW
    steps of the default model, 1, 2, 4, 8 and 16 threads gave the same bits, 3 and 6
    others; a power of two keeps a 6-core machine's bits those of a 4- or 8-core one."""
    return 1 << (max(1, cores).bit_length() - 1)


def pin_kernels(environ: MutableMapping[str, str], machine: str, cores: int) -> None:
    """Set :data:`PINNED_KERNELS` in ``environ`` on an x86-64 ``machine``, unless
    ``GPTPIPE_KERNELS=native`` asks for each library's own choice. Values set outside are
    replaced: a machine capped lower would compute other bits. Other architectures (Arm)
    have one code path per build and keep it. The thread count (``OMP_NUM_THREADS``,
    read by torch when it loads) becomes :func:`pinned_threads` of ``cores``, unless set
    outside; ``train.threads`` still sets pretraining's own.

    Torchrun workers and every process a stage starts inherit the environment, so they
    run the same kernels."""
    choice = environ.get(KERNELS_SWITCH, "avx2")
    if choice not in ("avx2", "native"):
        raise GptpipeError(f"environment {KERNELS_SWITCH}={choice!r}: allowed avx2 (the "
                           "same bits on every x86-64 machine) or native (fastest)")
    if choice == "avx2" and machine.lower() in ("x86_64", "amd64"):
        environ.update(PINNED_KERNELS)
        environ.setdefault("OMP_NUM_THREADS", str(pinned_threads(cores)))


def physical_cores() -> int:
    """The cores torch would take by default: physical cores this process may run on."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return min(filter(None, (usable, psutil.cpu_count(logical=False), os.cpu_count(), 1 << 16)))


# The exit status of the command that ran, once click has ended it (see main).
_EXIT_STATUS: list[int] = []


def main() -> None:
    # First, so that it runs last at exit, after every clean-up registered later.
    atexit.register(_exit_before_native_teardown)
    # DVC is driven from our tests and scripts; never send its usage analytics.
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        pin_kernels(os.environ, platform.machine(), physical_cores())
    except GptpipeError as error:  # raised before click runs: print it as click would
        error.show()
        raise SystemExit(error.exit_code) from None
    try:
        cli()
    except SystemExit as done:  # click ends every command so, with its exit status
        code = done.code
        _EXIT_STATUS.append(0 if code is None else code if isinstance(code, int) else 1)
        raise


def _exit_before_native_teardown() -> None:
    """At exit, once Python has joined its threads and run every other clean-up: end
    the process with the command's status, skipping the native libraries' teardown.
    Arrow's thread pools can abort the process there (SIGABRT, "terminate called
    without an active exception", apache/arrow#34314), seldom and under load, which
    turned a finished stage (for DVC, a failed one) or a compare into a crash. A command
    that ended any other way (a traceback) exits as Python would."""
    if not _EXIT_STATUS:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_STATUS[-1])


if __name__ == "__main__":
    main()
