"""Several processes: a process that dies or freezes is named, and the others stop.

Left alone, the survivors of a dead process wait in their next collective for PyTorch's
process-group timeout (10 minutes for NCCL, 30 for gloo), then print a traceback that
names no process. So each process keeps a heartbeat in the run's rendezvous store (the
one torchrun starts; a counter it increments every second from a thread of its own),
and marks the store when it ends, well or with an error:

- a collective that breaks (a peer's connection closed: it was killed or crashed) makes
  the process look at the heartbeats: whoever stopped beating without ending is named,
  in one line, and this process stops too;
- torchrun's SIGTERM, which it sends to the survivors the moment a process dies, and
  which may come before any collective breaks, is handled the same way;
- a process whose heartbeat stops for ``timeout`` seconds (``train.peer_timeout``: it
  froze, or its machine went away without closing its connections) makes every other
  stop with one line naming it, even while blocked in a collective.

The snapshots on disk stay as they were: running the command again resumes the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from types import FrameType
from typing import Any

import torch.distributed as dist

from pipeline.core.device import Runtime
from pipeline.core.errors import GptpipeError

BEAT_SECONDS = 1.0
# How long a heartbeat must stand still, after a collective broke, for its process to
# count as gone: several beats, so that a slow beat is not taken for a dead process.
SILENCE_SECONDS = 3.5
# The process group's own timeout is longer than train.peer_timeout by this much, so that
# a frozen process is named by the heartbeats first; it still ends a collective that a
# live process never joins.
COLLECTIVE_MARGIN_SECONDS = 10.0


class PeerWatch:
    """The heartbeats of one process of a run, and what it can tell of the others."""

    def __init__(self, runtime: Runtime, stage: str, timeout: float) -> None:
        self.runtime, self.stage, self.timeout = runtime, stage, timeout
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"gptpipe/{run}/{attempt}/"
        self.store = self._connect()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gptpipe-heartbeat", daemon=True)

    def _connect(self) -> dist.TCPStore | None:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None  # not started by torchrun: no store to watch each other in
        try:
            return dist.TCPStore(host, int(port), is_master=False,
                                 timeout=timedelta(seconds=min(self.timeout, 30)),
                                 wait_for_workers=False)
        except (RuntimeError, ValueError):
            return None

    def _key(self, what: str, rank: int) -> str:
        return f"{self.prefix}{what}/{rank}"

    def _others(self) -> list[int]:
        return [rank for rank in range(self.runtime.world_size) if rank != self.runtime.rank]

    def _counters(self) -> dict[int, int]:
        """Every other process's heartbeat count, 0 once it ended (done or failed)."""
        assert self.store is not None
        counts = {}
        for rank in self._others():
            ended = self.store.add(self._key("ended", rank), 0)
            counts[rank] = 0 if ended else self.store.add(self._key("beat", rank), 0)
        return counts

    def start(self) -> None:
        if self.store is not None:
            self._thread.start()

    def _beat(self) -> None:
        """Beat every second; stop the process when another has been silent too long."""
        last: dict[int, tuple[int, float]] = {}
        while not self._stopped.wait(BEAT_SECONDS):
            now = time.monotonic()
            try:
                self.store.add(self._key("beat", self.runtime.rank), 1)
                counts = self._counters()
            except (RuntimeError, OSError):  # the store's host itself is gone
                counts = {rank: last.get(rank, (0, now))[0] for rank in self._others()}
            for rank, count in counts.items():
                if count == 0 or last.get(rank, (None, 0.0))[0] != count:
                    last[rank] = (count, now)
            silent = [rank for rank, (count, since) in last.items()
                      if count and now - since >= self.timeout]
            if silent and not self._stopped.is_set():
                print(f"Error: {self._silent_line(silent)}", file=sys.stderr, flush=True)
                os._exit(2)  # the main thread may be blocked in a collective for good

    def _silent_line(self, silent: list[int]) -> str:
        return (f"{self.stage}: process {silent[0]} of {self.runtime.world_size} stopped "
                f"responding (no heartbeat for {self.timeout:g} s, train.peer_timeout: it froze "
                "or its machine went away); this process stopped too; run the command again "
                "on every machine to resume from the last snapshot")

    def gone(self) -> tuple[list[int], dict[int, str]]:
        """(the processes that stopped beating without ending, the errors of those that
        ended with one), looked at over :data:`SILENCE_SECONDS`. Without the store (its
        host went down with the failure), a run of two can still name the other."""
        others = self._others()
        try:
            if self.store is None:
                raise RuntimeError("no store")
            failed = {rank: self.store.get(self._key("error", rank)).decode(errors="replace")
                      for rank in others if self.store.check([self._key("error", rank)])}
            before = self._counters()
            time.sleep(SILENCE_SECONDS)
            after = self._counters()
        except (RuntimeError, OSError):
            return (others if len(others) == 1 else []), {}
        return [rank for rank, count in after.items() if count and count == before[rank]], failed

    def end(self, error: str | None = None) -> None:
        """Stop beating, and tell the others this process ended (with ``error``); once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.store is None:
            return
        with contextlib.suppress(RuntimeError, OSError):
            if error is not None:
                self.store.set(self._key("error", self.runtime.rank), error)
            self.store.add(self._key("ended", self.runtime.rank), 1)


class TerminatedBySignal(BaseException):
    """SIGTERM outside a training loop's own handling (torchrun sends it to the survivors
    the moment a process dies): ends the block as a broken collective would. A
    BaseException, so that no ``except Exception`` on the way swallows it."""


class _SigtermAsError:
    """While installed (main thread only), the first SIGTERM raises
    :class:`TerminatedBySignal`; once :attr:`holding`, signals are only noted, so that the
    one line naming the dead process gets written before the process ends."""

    def __init__(self) -> None:
        self.holding = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.holding:
            self.holding = True
            raise TerminatedBySignal

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


@contextlib.contextmanager
def watched(runtime: Runtime, stage: str, timeout: float) -> Iterator[None]:
    """Run the block with this process's heartbeat; a collective broken by another
    process, or torchrun's SIGTERM after another process died, becomes one line naming
    it (see the module docstring)."""
    if not runtime.distributed:
        yield
        return
    watch = PeerWatch(runtime, stage, timeout)
    sigterm = _SigtermAsError()
    sigterm.install()
    watch.start()
    try:
        yield
    except GptpipeError as err:
        sigterm.holding = True
        watch.end(str(err))
        raise
    except (Exception, TerminatedBySignal) as err:
        sigterm.holding = True  # torchrun's SIGTERM would cut the line short
        watch.end(type(err).__name__)
        silent, failed = watch.gone()
        if silent or failed:
            raise peer_error(runtime, stage, silent, failed) from None
        if isinstance(err, TerminatedBySignal):
            raise GptpipeError(
                f"{stage}: stopped by SIGTERM, every other process still alive; the snapshots "
                "on disk are kept: run the command again to resume from the last one"
            ) from None
        if "timed out" in str(err).lower():
            raise GptpipeError(
                f"{stage}: a collective of the {runtime.world_size} processes waited more than "
                f"train.peer_timeout = {timeout:g} s, though every process is alive; raise "
                "train.peer_timeout if a step, an evaluation or a snapshot takes this long"
            ) from None
        raise
    finally:
        watch.end()
        sigterm.restore()


def peer_error(runtime: Runtime, stage: str, silent: list[int],
               failed: dict[int, str]) -> GptpipeError:
    """The one line of a process whose collective another process broke."""
    if silent:
        what = (f"process {silent[0]} of {runtime.world_size} stopped (killed, crashed or "
                "its machine went down)")
    else:
        rank, error = next(iter(failed.items()))
        what = f"process {rank} of {runtime.world_size} failed ({error})"
    return GptpipeError(f"{stage}: {what}; this process stopped too; run the command again on "
                        "every machine to resume from the last snapshot")
