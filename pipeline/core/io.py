"""Atomic outputs, JSON metrics and hashing.

Every output of a stage is complete or absent: it is written under a temporary name in
the same folder and renamed into place only when finished, so a crash, a kill or a full
disk never leaves a half-written file for a later stage to read or for DVC to cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError

_TMP_MARK = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries left beside ``path`` by an earlier, killed run."""
    parent = path.parent
    if not parent.is_dir():
        return
    for stale in parent.glob(f".{path.name}{_TMP_MARK}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _temp_owner(name: str) -> int | None:
    """The pid in a temporary's name (``.<name>.tmp-<pid>`` or ``.tmp-old-<pid>``)."""
    if not name.startswith(".") or _TMP_MARK not in name:
        return None
    tail = name.rsplit(_TMP_MARK, 1)[1].removeprefix("old-")
    if not tail.isascii() or not tail.isdigit():
        return None
    pid = int(tail)
    return pid if 0 < pid <= _pid_max() else None  # a date or a number that is no pid


@functools.cache
def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 4_194_304  # Linux's upper bound; other systems use less


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process. A zombie (a killed writer whose parent died
    too and that nothing has reaped yet) still answers kill(pid, 0), but writes nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (not Linux), or it just ended
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def find_temporaries(root: str | Path) -> list[str]:
    """Every temporary (``.<name>.tmp-...``) under ``root``, outside .git and .dvc, as
    sorted paths relative to ``root``: what a kill may leave (for checks and reports)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".dvc")]
        found += [os.path.relpath(os.path.join(folder, name), root) for name in dirs + files
                  if name.startswith(".") and _TMP_MARK in name]
    return sorted(found)


def sweep_dead_temporaries(folders: Iterable[str | Path]) -> list[Path]:
    """Delete temporaries in ``folders`` whose writer is dead; return what was deleted.

    A stage killed mid-write leaves its temporary behind, and the stage that would clear
    it (:func:`_remove_stale_temps`) may never run again: ``dvc repro`` can restore the
    outputs of a killed forced re-run from its run cache instead. So every stage start
    sweeps the folders of all declared outputs. A temporary whose pid is alive belongs to a
    running writer and stays (a recycled pid only delays the sweep to a later start). The
    pid is this machine's: a workspace shared with writers on other machines or in other
    pid namespaces at the same moment is not supported (DVC's own repository lock assumes
    one writer too). Best effort: a folder or entry that cannot be read or removed is
    left alone.
    """
    removed = []
    for folder in folders:
        try:
            entries = list(Path(folder).iterdir())
        except OSError:  # absent, not a folder, or unreadable
            continue
        for entry in entries:
            pid = _temp_owner(entry.name)
            if pid is None or _alive(pid):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that after a power loss the
    renamed folder never holds empty or partial files (rename orders names, not data)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _write_failed(path: Path, err: OSError) -> GptpipeError:
    if err.errno == errno.ENOSPC:
        return GptpipeError(
            f"{path}: no space left on the device while writing; nothing was replaced"
        )
    return GptpipeError(f"{path}: could not write ({err.strerror or err}); nothing was replaced")


def _refuse_replacing(path: Path) -> None:
    """An output folder is replaced whole: refuse one that is plainly not an output (the
    working directory or a folder above it, or a repository), before anything is written."""
    if not path.is_dir():
        return
    here, target = Path.cwd().resolve(), path.resolve()
    what = None
    if target == here or target in here.parents:
        what = "the working directory"
    elif (path / ".git").exists() or (path / ".dvc").exists():
        what = "a git or DVC repository"
    if what:
        raise GptpipeError(f"{path}: refusing to replace {what} with a stage's output; name a "
                           "folder of its own for the output (data/tokens, say)")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds.

    ``path`` is replaced whole (it is the output), so the working directory, a folder
    above it and a repository are refused before the block runs.
    """
    path = Path(path)
    _refuse_replacing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() and _exchange(tmp, path):
            # One atomic step swapped old and new; tmp now holds the old version.
            _fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _replace_dir(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(path, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported.

    A directory cannot be replaced by rename() while it exists, and deleting it first
    leaves a moment with no directory at all: a kill then would lose the previous
    output (for a training snapshot, the whole run so far). Swapping avoids that moment.
    """
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


@functools.cache
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2  # noqa: B018 - present in glibc >= 2.28 and musl
    except (OSError, AttributeError):
        return None
    return libc


def _replace_dir(tmp: Path, path: Path) -> None:
    """Fallback without an atomic swap: move the old version aside, then delete it."""
    aside = path.with_name(f".{path.name}{_TMP_MARK}old-{os.getpid()}")
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if aside.exists():
        _remove(aside)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as stable JSON (sorted keys, fixed indent) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# Size limits on what is read whole into memory. Beyond them a file is refused with one line
# naming the file and the limit, instead of an out-of-memory kill that prints nothing.
# A JSON document (a config, a tokenizer, a metrics or meta file): the largest public
# tokenizer.json files are tens of MB.
MAX_JSON_BYTES = 256 * 2**20
# One record of a JSONL file (a document, a preference pair, an example, a task item).
MAX_JSONL_LINE_BYTES = 64 * 2**20
# Nesting depth of a JSON value: far beyond any real record, far below Python's recursion
# limit (a deeper value raises RecursionError inside the json module).
MAX_JSON_DEPTH = 200


def _too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a cheap pre-check: the
    json module's parser recurses once per level)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_json(text: str, where: str, allowed: str = "") -> Any:
    """The JSON value of ``text``; one :class:`GptpipeError` line naming ``where`` (and what
    is ``allowed``, when given) for anything that is not reasonable JSON: a syntax error,
    nesting deeper than :data:`MAX_JSON_DEPTH`, or an integer too long for Python to
    convert (both of which raise other errors than JSONDecodeError in the json module)."""
    tail = f"; allowed: {allowed}" if allowed else ""
    if _too_deep(text):
        raise GptpipeError(f"{where}: not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)"
                           f"{tail or '; allowed: ordinary records'}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GptpipeError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column "
                           f"{err.colno}){tail}") from None
    except RecursionError:
        raise GptpipeError(f"{where}: not valid JSON (nested too deeply)"
                           f"{tail or '; allowed: ordinary records'}") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise GptpipeError(f"{where}: not valid JSON ({err}){tail}") from None


def check_size(path: Path, limit: int, what: str = "file") -> None:
    """Refuse a file larger than ``limit`` bytes with one line naming it and the limit."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GptpipeError(f"{path}: {what} not found") from None
    if size > limit:
        raise GptpipeError(f"{path}: {what} of {size:,} bytes is over the limit of "
                           f"{limit:,} bytes that gptpipe reads whole")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of a whole file, refused in one line when missing, larger than
    ``limit`` bytes, not UTF-8 or not valid JSON (see :func:`parse_json`)."""
    path = Path(path)
    if path.is_dir():
        raise GptpipeError(f"{path}: is a directory; allowed: a JSON file")
    check_size(path, limit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptpipeError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise GptpipeError(f"{path}: not valid JSON ({err})") from None
    return parse_json(text, str(path))


def numbered_lines(path: Path, what: str,
                   limit: int = MAX_JSONL_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line ending) of every line of a JSONL
    file, read as a stream; ``what`` names the file in a one-line error when it is missing
    or a line is longer than ``limit`` bytes."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise GptpipeError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise GptpipeError(f"{path}: is a directory; allowed: a JSONL file") from None
    with stream:
        number = 0
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            number += 1
            if len(line) > limit and not line.endswith(b"\n"):
                raise GptpipeError(f"{path}: line {number} is longer than the limit of "
                                   f"{limit:,} bytes per record")
            line = line.removesuffix(b"\n")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as some editors write
            yield number, line.removesuffix(b"\r")


def json_line(where: str, line: bytes) -> Any:
    """The JSON value on one line (``where``: "file: line N"), None for a blank line; a
    one-line error for invalid UTF-8 or JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptpipeError(
            f"{where}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1}); "
            "allowed: UTF-8 text"
        ) from None
    if not text.strip():
        return None
    return parse_json(text, where)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def source_digest() -> str:
    """The sha256 of gptpipe's own source (every ``pipeline/**/*.py``, names and bytes).

    Part of a training snapshot's fingerprint: DVC re-runs a stage when its code changes,
    and a snapshot written by other code must not then be resumed, nor a finished one's
    outputs reused, as if the new code had produced them.
    """
    package = source_root()
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def source_root() -> Path:
    """The ``pipeline`` package's folder (this module is ``pipeline/core/io.py``)."""
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- tensor files


def unique_state(module: Any) -> dict[str, Any]:
    """``module``'s state dict without the later names of tied tensors (an output matrix
    tied to the embedding, say): safetensors refuses two names for one storage, and
    loading the first name re-ties the rest."""
    state, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its write errors raised as OSError so that
    :func:`atomic_dir` reports them in one line (a full disk, say)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        full = "No space" in str(err) or "os error 28" in str(err)
        raise OSError(errno.ENOSPC if full else errno.EIO, str(err)) from None


def load_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (never a pickle: a planted one is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise GptpipeError(
            f"{path}: not a readable safetensors file ({err}); gptpipe never loads pickles"
        ) from None
