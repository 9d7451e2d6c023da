"""Where ``gptpipe compare`` reads a run: what DVC knows of the workspace, a commit, a
branch or tag, or a ``dvc exp`` experiment.

A run's metrics files and plots are in Git (``cache: false`` outputs); its per-item
tables are DVC-tracked outputs, read from the DVC cache through ``dvc.lock`` at that
revision (``DVCFileSystem``), so an experiment that ``dvc exp run`` or ``dvc queue``
made is read as DVC saved it, and nothing is checked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError
from pipeline.core.io import parse_json

WORKSPACE = "workspace"
# The most bytes of one metrics file compare reads (they are a few kB).
_MAX_METRICS_BYTES = 1 << 20


@dataclass
class RunSource:
    """One side of a comparison: its name as given, a label with its commit, and how to
    read its files (``fs`` None: the workspace, from disk)."""

    name: str
    label: str
    root: Path
    fs: Any = None
    _cache: dict[str, bytes | None] = field(default_factory=dict, repr=False)

    def read(self, path: str) -> bytes | None:
        """The bytes of ``path`` (relative to the repository) in this run, or None when
        the run has no such file (or DVC has not got its data: ``dvc pull``)."""
        if path not in self._cache:
            self._cache[path] = self._read(path)
        return self._cache[path]

    def _read(self, path: str) -> bytes | None:
        if self.fs is None:
            file = self.root / path
            return file.read_bytes() if file.is_file() else None
        try:
            with self.fs.open(path, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except Exception:  # a tracked file whose data is in no cache: nothing to read
            return None

    def metrics(self, path: str) -> dict[str, Any] | None:
        """A metrics JSON file of this run as a flat dict, or None when it has none."""
        raw = self.read(path)
        if raw is None:
            return None
        if len(raw) > _MAX_METRICS_BYTES:
            raise GptpipeError(f"{path} at {self.label}: {len(raw)} bytes; a metrics file "
                               f"is at most {_MAX_METRICS_BYTES}")
        data = parse_json(raw.decode("utf-8", "replace"), f"{path} at {self.label}")
        return data if isinstance(data, dict) else None


def open_sources(names: list[str], root: Path) -> list[RunSource]:
    """A source for each name: ``workspace``, a commit, branch or tag, or an
    experiment's name; one line naming the first that is none of these."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError as err:
        raise GptpipeError(f"{root}: not a DVC repository ({err}); run compare in one") from None
    sources = []
    for name in names:
        if name == WORKSPACE:
            sources.append(RunSource(name, WORKSPACE, root))
            continue
        sha = _resolve(repo, name)
        sources.append(RunSource(name, f"{name} ({sha[:7]})", root, _filesystem(root, sha)))
    return sources


def _resolve(repo, name: str) -> str:
    """The commit of a Git revision or of an experiment's name."""
    from dvc.repo.experiments.exceptions import AmbiguousExpRefInfo
    from dvc.repo.experiments.utils import resolve_name
    from scmrepo.exceptions import SCMError

    try:
        return repo.scm.resolve_rev(name)
    except SCMError:
        pass  # not a Git revision: perhaps an experiment's name
    try:
        ref = resolve_name(repo.scm, name).get(name)
    except AmbiguousExpRefInfo as err:
        raise GptpipeError(f"compare: {name}: {err}") from None
    if ref is None:
        raise GptpipeError(f"compare: {name}: no commit, branch, tag or experiment of that "
                           "name (allowed: workspace, a Git revision, or a name that "
                           "`dvc exp show` lists)")
    return repo.scm.get_ref(str(ref))


def _filesystem(root: Path, sha: str):
    from dvc.api import DVCFileSystem

    return DVCFileSystem(repo=str(root), rev=sha)


def experiments_of(root: Path, baseline: str = "HEAD") -> list[str]:
    """The names of the experiments run from ``baseline`` (``dvc exp ls``), in name
    order."""
    from dvc.repo import Repo

    listed = Repo(str(root)).experiments.ls(rev=baseline)
    return sorted(name for runs in listed.values() for name, _ in runs if name)
