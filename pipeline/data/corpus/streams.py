"""Opening corpus files: decompressed byte streams (gzip, zstandard), text streams with
escaped invalid bytes, byte ranges of a file, and Parquet files; every read reported to an
``on_read`` callback for the progress bar."""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from pipeline.core.errors import GptpipeError
from pipeline.data.corpus.decoding import BINARY_PROBE_BYTES, decode_errors

READ_CHUNK_BYTES = 1 << 20

# Compressed bytes fed to zstd at a time. zstd's densest block (run-length: 4 bytes for
# 128 KiB) expands 32768 times, and one call decompresses all it is fed: 1 KiB in is at
# most 32 MiB out, so a zstd bomb is stopped by the readers' limits before it fills memory
# (text expands 3-10 times: about 5 KB per call).
ZSTD_INPUT_BYTES = 1 << 10


OnRead = Callable[[int], None]


def no_progress(_: int) -> None:
    """An ``on_read`` callback that does nothing."""


class _CountingReader(io.RawIOBase):
    """A raw reader that reports how many bytes it hands out (for the progress bar), and
    hands out at most ``limit`` bytes when one is given (a byte range of a file)."""

    def __init__(self, raw: BinaryIO, on_read: OnRead, limit: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._on_read = on_read
        self._left = limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: Any) -> int:
        if self._left is not None:
            if self._left <= 0:
                return 0
            buffer = memoryview(buffer)[: self._left]
        count = self._raw.readinto(buffer)
        if count and self._left is not None:
            self._left -= count
        if count:
            self._on_read(count)
        return count or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompress a zstandard stream of one or more frames; a cut-off frame is an error.

    zstandard's own ``stream_reader`` returns a silent early EOF for a truncated file,
    which would drop the rest of a corpus without a word; a decompression object tells
    whether its frame ended. Several frames follow each other in files from pzstd or from
    ``cat a.zst b.zst``. Compressed input is fed in small pieces so that the output of one
    piece stays small too (:data:`ZSTD_INPUT_BYTES`).
    """

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            piece = self._source.read(ZSTD_INPUT_BYTES)
            if not piece:
                if self._in_frame:
                    raise zstandard.ZstdError("the file ends inside a frame (truncated)")
                return 0
            self._pending = memoryview(self._decompress(piece))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            # The frame is complete; whatever follows it starts the next frame.
            data = self._frame.unused_data
            self._frame = self._context.decompressobj()
            self._in_frame = False
        return b"".join(out)


class _CappedReader(io.RawIOBase):
    """A raw reader of a (decompressed) stream that refuses, with ``refusal``, to hand out
    more than ``cap`` bytes: what a whole-file reader uses, so a bomb stops early."""

    def __init__(self, source: IO[bytes], cap: int, refusal: str) -> None:
        super().__init__()
        self._source = source
        self._left = cap
        self._refusal = refusal

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._source.readinto(buffer)
        self._left -= count
        if self._left < 0:
            raise GptpipeError(self._refusal)
        return count


@contextlib.contextmanager
def open_binary(
    path: Path, compression: str | None, on_read: OnRead = no_progress,
    byte_range: tuple[int, int] | None = None, cap: tuple[int, str] | None = None,
) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading its decompressed bytes; ``on_read`` gets file bytes read.
    ``byte_range`` ``(start, end)`` reads only those bytes of an uncompressed file.
    ``cap`` ``(bytes, refusal)``: reading more decompressed bytes raises the refusal."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb", buffering=0))
        limit = None
        if byte_range is not None:
            raw.seek(byte_range[0])
            limit = byte_range[1] - byte_range[0]
        stream: IO[bytes] = stack.enter_context(
            io.BufferedReader(_CountingReader(raw, on_read, limit), READ_CHUNK_BYTES)
        )
        if compression == "gz":
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        elif compression == "zst":
            stream = stack.enter_context(io.BufferedReader(_ZstdReader(stream), READ_CHUNK_BYTES))
        if cap is not None:
            stream = stack.enter_context(
                io.BufferedReader(_CappedReader(stream, *cap), READ_CHUNK_BYTES))
        yield stream


@contextlib.contextmanager
def open_text(
    path: Path, compression: str | None, on_read: OnRead = no_progress, newline: str | None = None,
    byte_range: tuple[int, int] | None = None, cap: tuple[int, str] | None = None,
    codec: str = "utf-8",
) -> Iterator[TextIO]:
    """Open ``path`` as text in ``codec`` (a canonical codec name, ``DataParams.codec``)
    whose invalid bytes are escaped (see :func:`~pipeline.data.corpus.decoding.repair_text`).

    A leading UTF-8 byte-order mark is dropped (utf-8-sig), so a CSV header from a
    spreadsheet still names its first column. ``newline=None`` turns CRLF and CR into
    '\\n'. ``byte_range`` reads only those bytes (see
    :func:`~pipeline.data.corpus.planning.plan_ranges`); ``cap`` bounds the decompressed
    bytes read (see :func:`open_binary`).
    """
    with open_binary(path, compression, on_read, byte_range, cap) as binary:
        from_start = byte_range is None or byte_range[0] == 0
        encoding = "utf-8-sig" if codec == "utf-8" and from_start else codec
        text = io.TextIOWrapper(
            binary, encoding=encoding, errors=decode_errors(codec), newline=newline,
        )
        try:
            yield text
        finally:
            # The binary stream belongs to open_binary; do not let the wrapper close it.
            text.detach()


def read_head(path: Path, compression: str | None, size: int = BINARY_PROBE_BYTES) -> bytes:
    """The first ``size`` decompressed bytes of ``path`` (fewer if it is shorter)."""
    with open_binary(path, compression) as stream:
        head = bytearray()
        while len(head) < size:
            chunk = stream.read(size - len(head))
            if not chunk:
                break
            head += chunk
        return bytes(head)


@contextlib.contextmanager
def open_parquet(
    path: Path, compression: str | None, on_read: OnRead = no_progress
) -> Iterator[pq.ParquetFile]:
    """Open a Parquet file; a compressed one is first decompressed to a temporary file.

    Parquet needs random access (its footer comes last), which a gzip or zstd stream
    cannot give, so the temporary file keeps memory flat at the cost of disk space.
    """
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_binary(path, compression, on_read))
        if compression is not None:
            spooled = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(source, spooled, READ_CHUNK_BYTES)
            spooled.seek(0)
            source = spooled
        try:
            # no prefetch: it keeps each row group read until the file closes
            parquet = pq.ParquetFile(source, pre_buffer=False)
        except pa.ArrowException as err:
            raise GptpipeError(
                f"{path}: not a Parquet file ({err}); allowed: a Parquet file"
            ) from None
        yield parquet
