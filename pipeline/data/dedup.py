"""Exact deduplication in bounded memory: which documents repeat an earlier one.

The clean stage keeps the first of each group of identical texts, in document order, and
compares texts by their 16-byte key (:func:`pipeline.data.text.dedup_key`). When every
document's key fits in ``clean.dedup_memory_mb``, a set of the keys seen so far decides
each document as it comes (:class:`SeenKeys`). A corpus with more documents than that
spills (:class:`SpilledKeys`): the keys are appended to partition files by a hash prefix,
each partition is then read back alone in document order with a set of its own keys (a
key's copies all land in the same partition, so the first of them is found there), and
the ordinals of the later copies are merged back into document order. Memory is then
bounded by the budget, whatever the corpus size; the decisions are the same as the
set's, document for document.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

KEY_BYTES = 16
# What one 16-byte key costs in a CPython set: the bytes object (49 bytes, 64 with the
# allocator's rounding) and its slot (16 bytes in a table kept at most 60% full, which
# doubles when it fills). Measured 98 bytes a key at 2 million keys; 128 bounds it just
# after a doubling.
BYTES_PER_KEY = 128
# A partition record: the document's ordinal (uint64, little-endian) and its key.
RECORD = np.dtype([("ordinal", "<u8"), ("key", f"V{KEY_BYTES}")])
# The write buffer of each partition and the read buffer of each merged stream stay
# between these sizes: large enough for few system calls, small enough that a thousand
# partitions still fit the budget.
MIN_BUFFER_BYTES, MAX_BUFFER_BYTES = 4096, 2**20


def partitions_needed(documents: int, memory_bytes: int) -> int:
    """How many partitions keep one partition's set of keys within ``memory_bytes``
    (1: every key fits, no need to spill). Every document is counted as distinct."""
    return max(1, math.ceil(documents * BYTES_PER_KEY / memory_bytes))


class SeenKeys:
    """The keys seen so far, in memory: the decision for a corpus that fits the budget."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen_before(self, key: bytes) -> bool:
        """Whether ``key`` came before; remembers it for the documents after."""
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class SpilledKeys:
    """Keys partitioned to files in ``folder``, decided in two passes.

    First pass: :meth:`add` each document's key in document order (its ordinal is the
    count of keys added before it). Then :meth:`duplicates` yields, in increasing order,
    the ordinals of the documents whose key an earlier document had: exactly the
    documents :meth:`SeenKeys.seen_before` answers True for. ``folder`` must exist; the
    caller removes it (:func:`scratch_folder`).
    """

    def __init__(self, folder: Path, partitions: int, memory_bytes: int) -> None:
        self.folder = Path(folder)
        self.partitions = partitions
        self.count = 0
        self._buffer_bytes = min(MAX_BUFFER_BYTES,
                                 max(MIN_BUFFER_BYTES, memory_bytes // (4 * partitions)))
        self._buffers = [bytearray() for _ in range(partitions)]

    def _keys_path(self, partition: int) -> Path:
        return self.folder / f"keys-{partition:05d}.bin"

    def _duplicates_path(self, partition: int) -> Path:
        return self.folder / f"duplicates-{partition:05d}.bin"

    def add(self, key: bytes) -> None:
        """Record the next document's key."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a dedup key has {KEY_BYTES} bytes, got {len(key)}")
        # Keys are blake2b digests: any 8 of their bytes are uniform, so the partitions
        # get equal shares of the distinct keys.
        partition = int.from_bytes(key[:8], "little") % self.partitions
        buffer = self._buffers[partition]
        buffer += self.count.to_bytes(8, "little")
        buffer += key
        self.count += 1
        if len(buffer) >= self._buffer_bytes:
            self._flush(partition)

    def _flush(self, partition: int) -> None:
        buffer = self._buffers[partition]
        if buffer:
            # Opened per flush, not held: a thousand partitions need no thousand handles.
            with self._keys_path(partition).open("ab") as handle:
                handle.write(buffer)
            buffer.clear()

    def duplicates(self) -> Iterator[int]:
        """The ordinals of the later copies, in increasing order (call once, after the
        last :meth:`add`)."""
        for partition in range(self.partitions):
            self._flush(partition)
            self._resolve(partition)
        streams = [_read_ordinals(self._duplicates_path(p), self._buffer_bytes)
                   for p in range(self.partitions)]
        return heapq.merge(*streams)

    def _resolve(self, partition: int) -> None:
        """Write the ordinals of the partition's later copies, in increasing order (its
        records are in document order), and delete its keys."""
        keys = self._keys_path(partition)
        seen: set[bytes] = set()
        with self._duplicates_path(partition).open("wb") as out:
            for records in _read_records(keys, self._buffer_bytes):
                later = []
                for ordinal, key in zip(records["ordinal"].tolist(), records["key"].tolist(),
                                        strict=True):
                    if key in seen:
                        later.append(ordinal)
                    else:
                        seen.add(key)
                out.write(np.asarray(later, "<u8").tobytes())
        keys.unlink(missing_ok=True)


def _read_records(path: Path, buffer_bytes: int) -> Iterator[np.ndarray]:
    """A partition's records, a buffer at a time; none if it was never written."""
    if not path.exists():
        return
    chunk = max(1, buffer_bytes // RECORD.itemsize) * RECORD.itemsize
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            yield np.frombuffer(data, RECORD)


def _read_ordinals(path: Path, buffer_bytes: int) -> Iterator[int]:
    """The ordinals of a duplicates file, read a buffer at a time; the file is opened for
    each read, so merging many partitions holds no file handles between reads."""
    chunk = max(8, buffer_bytes // 8 * 8)
    offset = 0
    while True:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(chunk)
        if not data:
            return
        offset += len(data)
        yield from np.frombuffer(data, "<u8").tolist()


def scratch_path(output: Path) -> Path:
    """Where the spill files of the stage writing ``output`` go: a folder beside it,
    named as the start-of-stage sweep expects a temporary (``.<name>.tmp-<pid>``), so a
    killed run's files are deleted by the next run of any stage."""
    output = Path(output)
    return output.with_name(f".{output.name}-dedup.tmp-{os.getpid()}")


@contextlib.contextmanager
def scratch_folder(path: Path) -> Iterator[Path]:
    """Create the folder ``path``, yield it and delete it (with what is in it) after."""
    path = Path(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
