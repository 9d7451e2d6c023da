"""Atomic outputs, JSON metrics and hashing.

Every output of a stage is complete or absent: it is written under a temporary name in
the same folder and renamed into place only when finished, so a crash, a kill or a full
disk never leaves a half-written file for a later stage to read or for DVC to cache.

An output folder is replaced whole, so gptpipe replaces only what it wrote
(:func:`atomic_dir`): never a user's folder named by mistake as an output. A previous
output stays complete until its replacement is: swapped in one step where the file system
can, else moved aside first and put back by the next start if a kill came in between.

Reading JSON and tensor files has modules of its own (:mod:`pipeline.core.jsonfile`,
:mod:`pipeline.core.weights`); their names stay importable from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError
from pipeline.core.jsonfile import (  # noqa: F401 - importable from here, as always
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSONL_LINE_BYTES,
    check_size,
    json_line,
    numbered_lines,
    parse_json,
    read_json,
)

_TMP_MARK = ".tmp-"
# The tail of an aside copy's name: the previous output while its replacement moves in.
_ASIDE = "old-"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def _remove_stale_temps(path: Path) -> None:
    """Settle the temporaries that dead writers left beside ``path`` (see
    :func:`_settle`); a live writer's stay, for two processes may write the same output
    at once (the last to finish wins, neither loses its half-written temporary)."""
    parent = path.parent
    try:
        entries = list(parent.iterdir())
    except OSError:  # absent or unreadable: nothing of ours to settle
        return
    prefix = f".{path.name}{_TMP_MARK}"
    for entry in entries:
        pid = _temp_owner(entry.name)
        if not entry.name.startswith(prefix) or pid is None:
            continue
        # A temporary named after this very process is stale too: a writer of an earlier
        # boot that had the same pid, or a cleanup of this process that failed.
        if pid == os.getpid() or not _alive(pid):
            _settle(entry)


def _settle(entry: Path) -> bool:
    """Deal with a dead writer's temporary; True when it is gone.

    An aside copy (``.<name>.tmp-old-<pid>``: the previous output, moved away to make room
    for its replacement on a file system without an atomic swap) goes back to ``<name>``
    when the replacement never arrived: it is then the only copy. Anything else (a
    half-written output, an aside whose replacement is in place) is deleted.
    """
    try:
        if _is_aside(entry.name):
            target = entry.with_name(entry.name[1:].rsplit(_TMP_MARK, 1)[0])
            if not (target.exists() or target.is_symlink()):
                os.replace(entry, target)
                _fsync_dir(entry.parent)
                return True
        _remove(entry)
    except OSError:  # best effort: what cannot be moved or removed stays
        return False
    return True


def _is_aside(name: str) -> bool:
    return name.rsplit(_TMP_MARK, 1)[-1].startswith(_ASIDE)


def _temp_owner(name: str) -> int | None:
    """The pid in a temporary's name (``.<name>.tmp-<pid>`` or ``.tmp-old-<pid>``)."""
    if not name.startswith(".") or _TMP_MARK not in name:
        return None
    tail = name.rsplit(_TMP_MARK, 1)[1].removeprefix(_ASIDE)
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
    """Settle the temporaries in ``folders`` whose writer is dead; return them.

    A dead writer's temporary is deleted, except an aside copy whose replacement never
    arrived: that is the previous output, and it goes back in place (:func:`_settle`).

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
            entries = sorted(Path(folder).iterdir())
        except OSError:  # absent, not a folder, or unreadable
            continue
        for entry in entries:
            pid = _temp_owner(entry.name)
            if pid is not None and not _alive(pid) and _settle(entry):
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
def atomic_dir(path: str | Path, writes: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds.

    ``path`` is replaced whole (it is the output), so it must be gptpipe's to replace
    (:func:`_check_replaceable`): the working directory, a folder above it and a repository
    are refused before the block runs; any other folder that holds something this output
    does not write, unless ./dvc.yaml declares it, is refused before the block runs when
    ``writes`` names the entries the output may hold, else before the replacement. Either
    way nothing is replaced and the temporary is removed.
    """
    path = Path(path)
    _refuse_replacing(path)
    if writes:
        _check_replaceable(path, set(writes))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _check_replaceable(path, {entry.name for entry in tmp.iterdir()} | set(writes))
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


def _check_replaceable(path: Path, writes: set[str]) -> None:
    """Refuse to replace what gptpipe did not write: ``path`` may be replaced when it is
    absent or empty, when each of its entries is one the new output writes too (``writes``:
    a previous output of the same kind; a numbered entry, such as part-00003.parquet, is of
    the same kind as any of its family, since a smaller output holds fewer) or a gptpipe
    temporary, or when it is (or lies inside) an output that the dvc.yaml of the working
    directory declares (DVC removes and caches those itself). A file or a link where the
    folder goes is not a previous output.
    """
    if path.is_dir() and not path.is_symlink():
        families = {_family(name) for name in writes}
        foreign = sorted(entry.name for entry in path.iterdir()
                         if _family(entry.name) not in families
                         and _temp_owner(entry.name) is None)
        if not foreign:
            return
        what = f"a folder that gptpipe did not write (it holds {foreign[0]!r}, which this " \
               "output does not write)"
    elif path.exists() or path.is_symlink():
        what = "a file or a link that gptpipe did not write with an output folder"
    else:
        return
    if _is_declared_output(path):
        return
    raise GptpipeError(f"{path}: refusing to replace {what}; name a new or empty folder for "
                       "the output, or move this one away")


def _family(name: str) -> str:
    """``name`` with each run of digits as ``#``: shard-00001.parquet -> shard-#.parquet."""
    return re.sub(r"[0-9]+", "#", name)


def _is_declared_output(path: Path) -> bool:
    """Whether ``path`` is, or lies inside, an output of ./dvc.yaml."""
    target = Path(os.path.abspath(path))
    return any(target == out or out in target.parents
               for out in declared_outputs(Path("dvc.yaml")))


def declared_outputs(dvc_yaml: Path) -> list[Path]:
    """The absolute paths of the outputs (outs, metrics, plots) that ``dvc_yaml``
    declares, beside their stage's wdir; templated and generated ones (``${...}``,
    foreach, matrix) are DVC's to resolve and left out. Empty when there is no readable
    dvc.yaml."""
    import yaml

    try:
        document = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    stages = document.get("stages") if isinstance(document, dict) else None
    outputs: dict[Path, None] = {}
    for stage in stages.values() if isinstance(stages, dict) else []:
        if not isinstance(stage, dict) or "foreach" in stage or "matrix" in stage:
            continue
        wdir = dvc_yaml.parent / str(stage.get("wdir", "."))
        for key in ("outs", "metrics", "plots"):
            entries = stage.get(key)
            for entry in entries if isinstance(entries, list) else []:
                name = next(iter(entry), None) if isinstance(entry, dict) else entry
                if isinstance(name, str) and "${" not in name:
                    outputs[Path(os.path.abspath(wdir / name))] = None
    return list(outputs)


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
    """Fallback without an atomic swap (NFS, say): move the old version aside, move the
    new one in, then delete the aside copy. The previous output exists under one name or
    the other at every moment: a kill between the two moves leaves it aside, and the next
    start puts it back (:func:`_settle`); a failed move-in puts it back at once."""
    aside = path.with_name(f".{path.name}{_TMP_MARK}{_ASIDE}{os.getpid()}")
    moved_aside = path.exists() or path.is_symlink()
    if moved_aside:
        os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except OSError:
        if moved_aside:
            os.replace(aside, path)
        raise
    _fsync_dir(path.parent)
    if moved_aside:
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
