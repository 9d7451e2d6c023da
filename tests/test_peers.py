"""The processes of a several-process run name the one that died: pipeline.core.peers,
with a real rendezvous store in a real subprocess (the SIGTERM that torchrun sends to
the survivors is sent by the process to itself)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Process 0 of a run of two, under ``watched``, receives SIGTERM outside any training
# loop. What process 1 did is set up in the store first (SCENARIO).
SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import torch
    import torch.distributed as dist
    from pipeline.core.device import Runtime
    from pipeline.core.errors import GptpipeError
    from pipeline.core.peers import watched

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                      TORCHELASTIC_RUN_ID="test", TORCHELASTIC_RESTART_COUNT="0")
    key = "gptpipe/test/0/{what}/1".format
    store.add(key(what="beat"), 3)  # process 1 has been beating
    scenario = sys.argv[1]
    if scenario == "failed":
        store.set(key(what="error"), "pretrain: the batch does not fit")
        store.add(key(what="ended"), 1)
    elif scenario == "alive":
        def beat():
            while True:
                store.add(key(what="beat"), 1)
                time.sleep(0.3)
        threading.Thread(target=beat, daemon=True).start()
    runtime = Runtime(torch.device("cpu"), torch.float32, rank=0, world_size=2)
    try:
        with watched(runtime, "pretrain", 60):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
    except GptpipeError as err:
        print(f"Error: {err}")
        sys.exit(2)
""")


@pytest.mark.parametrize(("scenario", "expected"), [
    ("silent", "pretrain: process 1 of 2 stopped (killed, crashed or its machine went down); "
               "this process stopped too"),
    ("failed", "pretrain: process 1 of 2 failed (pretrain: the batch does not fit); "
               "this process stopped too"),
    ("alive", "pretrain: stopped by SIGTERM, every other process still alive"),
])
def test_sigterm_from_torchrun_names_the_process_that_stopped(scenario, expected):
    result = subprocess.run([sys.executable, "-c", SCRIPT, scenario], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {expected}"), lines
