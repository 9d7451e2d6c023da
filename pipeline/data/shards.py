"""Token shards: the token stream of each split, as Parquet files of bounded size and as
one flat file that training and evaluation read window by window.

Layout written by the ``tokenize`` stage::

    <tokens>/meta.json                 tokenizer sha256, kind, vocab_size, dtype, bos_id, eos_id,
                                       shard_tokens and per split: documents, tokens, bytes,
                                       shards, token_bytes
    <tokens>/<split>/shard-00000.parquet   one column ``ids`` (uint16, or uint32 when the
    <tokens>/<split>/shard-00001.parquet   vocabulary needs it), at most shard_tokens rows
    <tokens>/<split>/tokens.bin        the same stream, flat: the raw ids, native order

Every document is stored as ``<bos> ids <eos>``, so the stream can be cut into training
windows anywhere and a window still shows where documents start and end. Shards are
zstd-compressed with fixed settings and no timestamps, so the same tokens give the same
bytes: the portable, compact copy. ``tokens.bin`` is the working copy: a declared part of
the tokenize stage's output (so DVC caches, versions and shares it, and a fresh clone's
``dvc pull`` brings it), read by :class:`TokenFile` with positioned reads, so a process
holds only the windows it reads, however large the split, and processes on one machine
share the file's pages through the operating system's cache instead of each holding a
copy. It costs ``itemsize`` bytes per token on disk beside the compressed shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json, write_json
from pipeline.data.tokenizer import MadeWith

META_NAME = "meta.json"
FLAT_NAME = "tokens.bin"
SHARD_PATTERN = "shard-{index:05d}.parquet"
SHARD_GLOB = "shard-*.parquet"
COLUMN = "ids"

# Row groups of at most this many tokens keep a reader's decode buffer small.
_ROW_GROUP_TOKENS = 1 << 20

_META_KEYS = ("tokenizer_sha256", "kind", "vocab_size", "dtype", "bos_id", "eos_id", "splits")
_SPLIT_KEYS = ("documents", "tokens", "bytes", "shards")
# Positioned reads of at most this many tokens at a time (a bounded buffer).
_READ_TOKENS = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays to ``<directory>/shard-NNNNN.parquet`` files.

    Every shard but the last holds exactly ``shard_tokens`` tokens; the buffer never holds
    more than one shard plus the last appended array, whatever the corpus size. At least
    one shard is written (an empty split gets one empty shard), so readers always find
    the dtype on disk.
    """

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.schema = pa.schema([pa.field(COLUMN, pa.from_numpy_dtype(self.dtype), False)])
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._flat = open(self.directory / FLAT_NAME, "wb")  # noqa: SIM115 - closed in close()
        self.shards = 0
        self.tokens = 0

    def append(self, ids: np.ndarray) -> None:
        """Queue ``ids`` (cast to the shard dtype) and write every shard that fills up."""
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}")
        ids = ids.astype(self.dtype, copy=False)
        ids.tofile(self._flat)
        self._pending.append(ids)
        self._pending_tokens += ids.size
        self.tokens += ids.size
        if self._pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            full = len(stream) - len(stream) % self.shard_tokens
            for start in range(0, full, self.shard_tokens):
                self._write(stream[start : start + self.shard_tokens])
            rest = stream[full:]
            self._pending = [rest] if rest.size else []
            self._pending_tokens = rest.size

    def close(self) -> None:
        """Write the last, partial shard (or the one empty shard of an empty split) and
        close the flat file."""
        if self._pending_tokens or self.shards == 0:
            stream = np.concatenate(self._pending) if self._pending else np.empty(0, self.dtype)
            self._write(stream)
        self._pending = []
        self._pending_tokens = 0
        if not self._flat.closed:
            self._flat.close()

    def _write(self, ids: np.ndarray) -> None:
        table = pa.Table.from_arrays(
            [pa.array(ids, type=self.schema.field(0).type)], schema=self.schema
        )
        pq.write_table(
            table,
            self.directory / SHARD_PATTERN.format(index=self.shards),
            row_group_size=_ROW_GROUP_TOKENS,
            compression="zstd",
            compression_level=3,
            # Plain pages + zstd: dictionary pages made BPE shards ~8% larger when measured.
            use_dictionary=False,
            write_statistics=False,
            store_schema=False,
        )
        self.shards += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        # On an error the whole output directory is discarded, so skip the last shard.
        if exc_type is None:
            self.close()
        else:
            self._flat.close()


def shard_paths(split_dir: str | Path) -> list[Path]:
    """The split's shard files in stream order; an error if there are none."""
    split_dir = Path(split_dir)
    paths = sorted(split_dir.glob(SHARD_GLOB)) if split_dir.is_dir() else []
    if not paths:
        raise GptpipeError(
            f"{split_dir}: no token shards ({SHARD_GLOB}) found; run gptpipe tokenize first"
        )
    return paths


def iter_shards(split_dir: str | Path) -> Iterator[np.ndarray]:
    """Stream a split's tokens one shard at a time (memory: one shard)."""
    for path in shard_paths(split_dir):
        yield _read_shard(path)


class TokenFile:
    """A split's token stream in its flat file, read with positioned reads: nothing is
    held but what a call returns, and the pages are the operating system's to cache (and
    to share between processes). Behaves as a read-only 1-D array for ``len``, slicing
    (``tokens[a:b]``), :meth:`windows` and ``np.asarray`` (which reads it all)."""

    def __init__(self, path: Path, dtype: np.dtype, length: int) -> None:
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), length
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.length

    @property
    def size(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens from position ``start`` (fewer at the end)."""
        start, stop = max(0, start), min(self.length, start + count)
        if stop <= start:
            return np.empty(0, self.dtype)
        size = self.dtype.itemsize
        data = os.pread(self._fd, (stop - start) * size, start * size)
        if len(data) != (stop - start) * size:
            raise GptpipeError(f"{self.path}: cut short while reading (the file changed "
                               "under a running stage?); run gptpipe tokenize again")
        return np.frombuffer(data, self.dtype)

    def __reduce__(self) -> tuple:
        # A file descriptor means nothing in another process: reopen by path there.
        return (TokenFile, (self.path, self.dtype, self.length))

    def __getitem__(self, key: slice | int) -> np.ndarray | np.integer:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step == 1:
                return self.read(start, stop - start)
            picked = range(start, stop, step)
            if not picked:
                return np.empty(0, self.dtype)
            low = min(picked[0], picked[-1])
            span = self.read(low, max(picked[0], picked[-1]) - low + 1)
            return span[np.asarray(picked) - low]
        index = key + self.length if key < 0 else key
        if not 0 <= index < self.length:
            raise IndexError(f"token {key} of {self.length}")
        return self.read(index, 1)[0]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length): the windows of ``length`` tokens at ``starts``."""
        out = np.empty((len(starts), length), self.dtype)
        for row, start in enumerate(np.asarray(starts).tolist()):
            out[row] = self.read(int(start), length)
        return out

    def chunks(self, size: int | None = None) -> Iterator[np.ndarray]:
        """The whole stream, ``size`` tokens at a time (a bounded buffer by default)."""
        size = size or _READ_TOKENS
        for start in range(0, self.length, size):
            yield self.read(start, size)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self.read(0, self.length).copy()
        return whole if dtype is None else whole.astype(dtype)


TokenStream = TokenFile | np.ndarray


def windows(tokens: TokenStream, starts: np.ndarray, length: int) -> np.ndarray:
    """(len(starts), length): windows of a token stream in memory or on disk, the same
    tokens either way."""
    if isinstance(tokens, TokenFile):
        return tokens.windows(starts, length)
    return np.asarray(tokens)[np.asarray(starts)[:, None] + np.arange(length)]


def read_tokens(split_dir: str | Path) -> TokenFile:
    """A split's token stream (``<split>/tokens.bin``) for bounded-memory reading, checked
    against its shards: the length that the shards hold, and the same first and last
    shard. One line when it is missing, cut short or from other shards."""
    split_dir = Path(split_dir)
    paths = shard_paths(split_dir)
    first = _read_shard(paths[0])
    path = split_dir / FLAT_NAME
    again = "run gptpipe tokenize again (dvc repro tokenize)"
    if not path.is_file():
        raise GptpipeError(f"{path}: missing (token folders from before it was written, or "
                           f"a copy without it); {again}")
    size = path.stat().st_size
    if size % first.dtype.itemsize:
        raise GptpipeError(f"{path}: {size} bytes, not whole {first.dtype} ids: cut short; "
                           f"{again}")
    tokens = TokenFile(path, first.dtype, size // first.dtype.itemsize)
    last = first if len(paths) == 1 else _read_shard(paths[-1])
    # Every shard but the last holds the same number of tokens (ShardWriter).
    expected = (len(paths) - 1) * len(first) + len(last) if len(paths) > 1 else len(first)
    if tokens.length != expected:
        raise GptpipeError(f"{path}: {tokens.length} tokens but the shards hold {expected}: "
                           f"cut short or from other shards; {again}")
    if not (np.array_equal(tokens[: len(first)], first)
            and np.array_equal(tokens[tokens.length - len(last):], last)):
        raise GptpipeError(f"{path}: its tokens differ from the shards'; {again}")
    return tokens


def _read_shard(path: Path) -> np.ndarray:
    try:
        table = pq.read_table(path, columns=[COLUMN])
    except (pa.ArrowInvalid, KeyError, OSError) as err:
        raise GptpipeError(
            f"{path}: not a token shard ({err}); allowed: Parquet with a column '{COLUMN}'"
        ) from None
    column = table.column(0)
    if not pa.types.is_unsigned_integer(column.type):
        raise GptpipeError(f"{path}: column '{COLUMN}' is {column.type}; allowed: uint16 or uint32")
    dtype = column.type.to_pandas_dtype()
    if column.num_chunks == 0:
        return np.empty(0, dtype)
    return np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks])


def write_meta(tokens_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``<tokens_dir>/meta.json`` (stable JSON, atomically)."""
    write_json(Path(tokens_dir) / META_NAME, meta)


def read_meta(tokens_dir: str | Path) -> dict[str, Any]:
    """Load ``<tokens_dir>/meta.json`` and check it has the keys readers rely on."""
    path = Path(tokens_dir) / META_NAME
    if not path.is_file():
        raise GptpipeError(f"{path}: token metadata not found; run gptpipe tokenize first")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise GptpipeError(f"{path}: a {type(meta).__name__}; allowed: a JSON object")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise GptpipeError(
            f"{path}: key '{missing[0]}' missing; allowed: an object with " + ", ".join(_META_KEYS)
        )
    for split, counts in sorted(meta["splits"].items()):
        absent = [key for key in _SPLIT_KEYS if key not in counts]
        if absent:
            raise GptpipeError(f"{path}: splits.{split}.{absent[0]} missing")
    return meta


def made_with(meta: dict[str, Any], tokens_dir: str | Path) -> MadeWith:
    """What the shards' meta.json records of their tokenizer (for ``require_tokenizer``)."""
    return MadeWith("the token shards were", Path(tokens_dir) / META_NAME,
                    meta["tokenizer_sha256"], int(meta["vocab_size"]))


def require_splits(meta: dict[str, Any], tokens_dir: str | Path, *names: str) -> None:
    """Raise unless meta.json lists every split of ``names``."""
    for name in names:
        if name not in meta["splits"]:
            raise GptpipeError(f"{Path(tokens_dir) / META_NAME} has no '{name}' split; "
                               "re-run gptpipe tokenize (it writes train, val and test)")
