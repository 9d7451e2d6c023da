"""Arrow files and Hugging Face ``datasets`` folders, read with pyarrow alone.

``Dataset.save_to_disk`` writes a folder of Arrow files (IPC streams) and two JSON files:
``state.json`` lists the Arrow files in row order (``_data_files``) and
``dataset_info.json`` describes the columns. ``DatasetDict.save_to_disk`` writes one such
folder per split and ``dataset_dict.json`` naming the splits. ``data.corpus`` may name:

- a ``Dataset`` folder: its Arrow files in ``state.json``'s order;
- a ``DatasetDict`` folder: every split in ``dataset_dict.json``'s order (name one split's
  folder to read only that split);
- an ``.arrow`` file, alone or among the files of a plain folder (an IPC stream, as
  ``datasets`` writes them, or an IPC file).

One document per row of column ``data.text_field``, source ``<file>#<row>`` (``<split>/<file>``
in a DatasetDict). The file is memory-mapped and read a record batch at a time, and a batch
in slices of :data:`ROWS_AT_ONCE` rows, so memory stays bounded whatever the size of the
corpus or of its batches. Text is UTF-8, as in Parquet; ``data.include`` and
``data.txt_unit`` do not apply to a ``datasets`` folder.

A Hugging Face Hub name (``wikitext``, ``owner/name``, ``hf://datasets/...``) is not read:
gptpipe reads local files only, and :func:`refuse_hub_name` says how to save one locally.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json
from pipeline.data.corpus.decoding import RawDocument, make_document
from pipeline.data.corpus.streams import OnRead, no_progress

STATE_FILE = "state.json"
DICT_FILE = "dataset_dict.json"
ARROW_SUFFIX = ".arrow"
# Rows decoded at once: a record batch can hold any number of rows.
ROWS_AT_ONCE = 1024
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def is_datasets_folder(root: Path) -> bool:
    """Whether ``root`` is a folder ``datasets`` saved (a Dataset or a DatasetDict)."""
    return root.is_dir() and ((root / STATE_FILE).is_file() or (root / DICT_FILE).is_file())


def datasets_files(root: Path) -> list[tuple[Path, str]]:
    """(Arrow file, source name) of a ``datasets`` folder, in row order: a Dataset's
    files as its state.json lists them, a DatasetDict's splits in its dataset_dict.json's
    order. Every name is checked to be a file inside the folder."""
    if (root / STATE_FILE).is_file():
        return [(root / name, name) for name in _state_files(root)]
    splits = _json_field(root / DICT_FILE, "splits", "a list of split folder names")
    files = []
    for split in splits:
        folder = root / _plain_name(root / DICT_FILE, "splits", split)
        if not (folder / STATE_FILE).is_file():
            raise GptpipeError(f"{root / DICT_FILE}: split {split!r} has no {folder.name}/"
                               f"{STATE_FILE}; allowed: a folder DatasetDict.save_to_disk "
                               "wrote, every split beside it")
        files += [(folder / name, f"{split}/{name}") for name in _state_files(folder)]
    return files


def _state_files(folder: Path) -> list[str]:
    """The Arrow file names a Dataset folder's state.json lists, each checked."""
    state = folder / STATE_FILE
    entries = _json_field(state, "_data_files", "a list of {\"filename\": ...}")
    names = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        names.append(_plain_name(state, "_data_files", name))
        if not (folder / names[-1]).is_file():
            raise GptpipeError(f"{state}: lists {names[-1]}, which is missing; allowed: "
                               "the folder as save_to_disk wrote it, whole")
    return names


def _json_field(path: Path, key: str, shape: str) -> list[Any]:
    """The list under ``key`` of the JSON object in ``path``, or one line."""
    data = read_json(path)
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise GptpipeError(f"{path}: {key} is {value!r}; allowed: {shape} (the file "
                           "save_to_disk writes)")
    return value


def _plain_name(path: Path, key: str, name: Any) -> str:
    """``name`` when it names an entry of the folder itself (no folder part, no '..')."""
    if not isinstance(name, str) or name in ("", ".", "..") or PurePosixPath(name).name != name:
        raise GptpipeError(f"{path}: {key} holds {name!r}; allowed: names of files or "
                           "folders inside this folder")
    return name


def read_arrow(path: Path, source: str, text_field: str, on_read: OnRead = no_progress
               ) -> Iterator[RawDocument]:
    """One document per row of column ``text_field`` of an Arrow IPC stream or file,
    source ``<source>#<row>``; the file's bytes go to ``on_read`` once read."""
    where = path.as_posix()
    try:
        with pa.memory_map(str(path)) as mapped:
            batches = _open_ipc(mapped, where)
            column = _text_column(batches.schema, text_field, where)
            row = 0
            for batch in batches:
                for first in range(0, batch.num_rows, ROWS_AT_ONCE):
                    texts = batch.column(column).slice(first, ROWS_AT_ONCE)
                    yield from _documents(texts, source, row, text_field, where)
                    row += len(texts)
    except (OSError, pa.ArrowException) as err:
        raise GptpipeError(f"{where}: could not read it as Arrow ({err}); allowed: an "
                           "Arrow IPC stream or file (as datasets' save_to_disk writes)"
                           ) from None
    on_read(path.stat().st_size)


def _open_ipc(mapped: pa.MemoryMappedFile, where: str) -> Iterator[pa.RecordBatch]:
    """The record batches of a stream (what ``datasets`` writes) or of a file."""
    try:
        return pa.ipc.open_stream(mapped)
    except pa.ArrowInvalid:
        mapped.seek(0)
    try:
        reader = pa.ipc.open_file(mapped)
    except pa.ArrowInvalid:
        raise GptpipeError(f"{where}: not an Arrow IPC stream or file; allowed: the .arrow "
                           "files datasets' save_to_disk writes") from None
    return _FileBatches(reader)


class _FileBatches:
    """An IPC file reader as an iterable of record batches with a schema, like a stream."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader) -> None:
        self.reader, self.schema = reader, reader.schema

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return (self.reader.get_batch(i) for i in range(self.reader.num_record_batches))


def _text_column(schema: pa.Schema, text_field: str, where: str) -> int:
    if text_field not in schema.names:
        found = ", ".join(repr(name) for name in schema.names)
        raise GptpipeError(f"{where}: column {text_field!r} missing (found columns: {found}); "
                           f"allowed: a string column {text_field!r} (set data.text_field)")
    kind = schema.field(text_field).type
    if kind not in _TEXT_TYPES:
        raise GptpipeError(f"{where}: column {text_field!r} has type {kind}; allowed: string "
                           "or binary")
    return schema.get_field_index(text_field)


def _documents(texts: pa.Array, source: str, row: int, text_field: str, where: str
               ) -> Iterator[RawDocument]:
    """The documents of a slice of the text column whose first row is ``row``; the column
    is read as bytes and decoded here, so invalid UTF-8 is replaced and counted as in every
    other format."""
    if texts.null_count:
        first_null = row + texts.is_null().to_pylist().index(True)
        raise GptpipeError(f"{where}: row #{first_null}: column {text_field!r} is null; "
                           "allowed: a string")
    for offset, value in enumerate(texts.cast(pa.large_binary()).to_pylist()):
        yield make_document(f"{source}#{row + offset}", value.decode("utf-8", "surrogateescape"))


# A Hub dataset id: a name, or an owner and a name, without a file suffix.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def refuse_hub_name(corpus: str) -> None:
    """Refuse, in one line, a ``data.corpus`` that is no local path and reads as a Hub
    dataset name (``hf://...``, ``wikitext``, ``owner/name``): gptpipe reads local files
    only, and the line says how to save the dataset locally."""
    path = Path(corpus)
    if path.exists():
        return
    name = corpus.removeprefix("hf://").removeprefix("datasets/")
    hub_like = corpus.startswith("hf://") or (
        _HUB_ID.fullmatch(corpus) is not None and not path.suffix
        and not Path(path.parts[0]).is_dir())  # a missing file inside a folder that exists
    if hub_like:
        local = f"data/{name.rsplit('/', 1)[-1]}"
        raise GptpipeError(
            f"data.corpus = {corpus}: not a local file or folder; gptpipe reads a local corpus "
            "only (no downloads). Save a Hugging Face dataset with datasets first, e.g. "
            f"python -c \"import datasets; datasets.load_dataset('{name}', split='train')"
            f".save_to_disk('{local}')\", then set data.corpus: {local}")
