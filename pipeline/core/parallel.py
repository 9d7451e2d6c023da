"""An ordered, bounded parallel map over worker processes, for the data stages."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from pipeline.core.errors import GptpipeError

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_Meta = TypeVar("_Meta")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and batch
    schedulers set), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def ordered_map(func: Callable[[_In], _Out], items: Iterable[tuple[_Meta, _In]], workers: int,
                what: str = "a worker",
                in_process: Callable[[_In], bool] | None = None
                ) -> Iterator[tuple[_Meta, _Out | None]]:
    """Yield ``(meta, func(item))`` in input order, computed by ``workers`` processes.

    At most two tasks per worker are in flight (unlike ``Pool.imap``, whose feeder drains
    the whole input at once), so memory stays bounded however large the input. ``func``
    and the items must pickle. A worker that dies (the kernel's OOM killer, a signal) is
    one line naming ``what`` was running, where a ``multiprocessing.Pool`` waits forever.
    With ``workers <= 1`` everything runs in this process.

    Items for which ``in_process(item)`` is true are not sent to a worker: ``(meta, None)``
    is yielded for them, in order, once every earlier result has been, and nothing later
    is submitted until the caller asks for the next result, so the caller can do that
    item's work itself (for example stream a file too big to hand over whole).
    """
    local = in_process or (lambda _: False)
    if workers <= 1:
        for meta, item in items:
            yield meta, None if local(item) else func(item)
        return
    # spawn, not fork: the parent holds pyarrow's threads, and forking a threaded
    # process can deadlock the child on a lock some other thread held.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending: deque[tuple[_Meta, Future[_Out]]] = deque()
            for meta, item in items:
                if local(item):
                    while pending:
                        done_meta, future = pending.popleft()
                        yield done_meta, future.result()
                    yield meta, None
                    continue
                pending.append((meta, pool.submit(func, item)))
                if len(pending) >= 2 * workers:
                    done_meta, future = pending.popleft()
                    yield done_meta, future.result()
            while pending:
                done_meta, future = pending.popleft()
                yield done_meta, future.result()
    except BrokenProcessPool:
        raise GptpipeError(
            f"{what}: a worker process died (killed by a signal or by the system for want of "
            "memory); nothing was written; run it again, with fewer workers if memory is short"
        ) from None
