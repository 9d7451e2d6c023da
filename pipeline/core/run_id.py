"""What a training run is, for deciding whether a snapshot continues it: a :class:`RunId`.

Two runs with equal ids train the same thing: the same params (those that decide what
is trained, as the loop chooses them), the same bytes in every input, the same gptpipe
source. Bytes, not sizes or dates: an edit that keeps a file's length is another run.
Where the checkout lives does not matter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file, source_digest


def input_digests(inputs: Mapping[str, str | Path]) -> dict[str, str]:
    """The sha256 of each input (a file, or a folder's files by relative path and bytes):
    where the checkout lives does not matter, and an edit that keeps a length does."""
    digests = {}
    for name, where in sorted(inputs.items()):
        where = Path(where)
        if where.is_file():
            digests[name] = sha256_file(where)
            continue
        if not where.is_dir():
            raise GptpipeError(f"{where}: not found; the run's input '{name}' must exist")
        digest = hashlib.sha256()
        for path in sorted(p for p in where.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(where).as_posix()}\0{sha256_file(path)}\0".encode())
        digests[name] = digest.hexdigest()
    return digests


def _flat(params: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(params, dict):
        return {prefix: params}
    flat: dict[str, Any] = {}
    for key, value in params.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass(frozen=True)
class RunId:
    """What a run is: the params that decide what it trains (JSON), the sha256 of each
    input, and gptpipe's source (:func:`pipeline.core.io.source_digest`). Two runs with
    equal ids train the same thing; :meth:`differences` says what makes two differ."""

    params: dict[str, Any]
    inputs: dict[str, str]
    code: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "inputs": self.inputs, "code": self.code}

    @classmethod
    def from_json(cls, raw: Any) -> RunId | None:
        if not isinstance(raw, dict) or not {"params", "inputs", "code"} <= raw.keys():
            return None
        return cls(raw["params"], raw["inputs"], raw["code"])

    def differences(self, other: RunId) -> dict[str, tuple[Any, Any]]:
        """``name: (here, there)`` for each param (dotted), input or the code that
        differs from ``other``'s."""
        mine, theirs = _flat(self.params), _flat(other.params)
        keys = sorted(mine.keys() | theirs.keys())
        found = {key: (mine.get(key), theirs.get(key)) for key in keys
                 if mine.get(key) != theirs.get(key)}
        for name in sorted(self.inputs.keys() | other.inputs.keys()):
            if self.inputs.get(name) != other.inputs.get(name):
                found[f"the bytes of its input '{name}'"] = (None, None)
        if self.code != other.code:
            found["gptpipe's code"] = (None, None)
        return found


def run_fingerprint(params: Mapping[str, Any], inputs: Mapping[str, str | Path]) -> RunId:
    """The :class:`RunId` of a run of ``params`` (any JSON) on ``inputs`` (name -> file
    or folder) with this gptpipe's code."""
    return RunId(json.loads(json.dumps(params)), input_digests(inputs), source_digest())


def describe_changes(changes: Mapping[str, tuple[Any, Any]], limit: int = 3) -> str:
    """``train.lr = 0.001 there, 0.003 here; ...`` (``changes``: name -> (here, there))."""
    parts = [name if (here, there) == (None, None) else f"{name} = {there!r} there, {here!r} here"
             for name, (here, there) in changes.items()]
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
