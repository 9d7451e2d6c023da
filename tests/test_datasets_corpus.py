"""A corpus saved by Hugging Face `datasets` (save_to_disk: Arrow files, state.json,
dataset_info.json), read with pyarrow alone: its layout written by pyarrow's IPC stream
writer (so these tests run without `datasets`) and by `datasets` itself where installed,
bad folders and Hub names refused in one line, and both through a real `dvc repro tokenize`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import BIN, REPO_ROOT, make_dvc_repo, run_cmd, synthetic_documents
from test_pipeline_dvc import TINY

from pipeline.core.errors import GptpipeError
from pipeline.core.params import parse_params
from pipeline.data.corpus import arrow
from pipeline.data.corpus.planning import CorpusStats
from pipeline.data.corpus.reading import corpus_bytes, iter_documents

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MIXED = ["The Nile flows north.", "北京是中国的首都。", "def f(x):\n    return x\n",
         "Zürich liegt am See.", "🎉 emoji 🐍"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hugging Face Hub: every test runs offline."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def write_dataset(folder: Path, columns: dict[str, list], shards: int = 1,
                  batch_rows: int = 1000, ipc_file: bool = False) -> Path:
    """The folder Dataset.save_to_disk writes, written with pyarrow: ``shards`` Arrow IPC
    streams of contiguous rows (data-0000i-of-0000n.arrow, record batches of
    ``batch_rows``), state.json listing them in order, dataset_info.json."""
    folder.mkdir(parents=True)
    table = pa.table(columns)
    names, start = [], 0
    for index in range(shards):
        rows = len(table) // shards + (index < len(table) % shards)
        name = f"data-{index:05d}-of-{shards:05d}.arrow"
        part = table.slice(start, rows)
        opener = pa.ipc.new_file if ipc_file else pa.ipc.new_stream
        with pa.OSFile(str(folder / name), "wb") as sink, opener(sink, table.schema) as out:
            for batch in part.to_batches(max_chunksize=batch_rows):
                out.write_batch(batch)
        names.append(name)
        start += rows
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    features = {name: {"dtype": "string", "_type": "Value"} for name in columns}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    return folder


def _read(corpus: Path | str, text_field: str = "text") -> tuple[list, CorpusStats]:
    stats = CorpusStats()
    params = parse_params({"data": {"corpus": str(corpus), "text_field": text_field}}).data
    return list(iter_documents(params, stats)), stats


# ----------------------------------------------------------------------------- reading


def test_a_dataset_folder_is_its_rows_in_state_json_order(tmp_path):
    texts = [*MIXED, *synthetic_documents(7)]
    folder = write_dataset(tmp_path / "ds", {"id": list(range(12)), "text": texts},
                           shards=3, batch_rows=2)
    documents, stats = _read(folder)
    assert [d.text for d in documents] == texts
    assert [d.source for d in documents[3:5]] == ["data-00000-of-00003.arrow#3",
                                                  "data-00001-of-00003.arrow#0"]
    assert stats.files_read == 3 and stats.documents == 12
    # The progress bar's total: the Arrow files, the JSON beside them aside.
    params = parse_params({"data": {"corpus": str(folder)}}).data
    assert corpus_bytes(params) == sum(p.stat().st_size for p in folder.glob("*.arrow"))


def test_a_batch_longer_than_what_is_decoded_at_once_keeps_every_row(tmp_path):
    texts = [f"document {i}" for i in range(2 * arrow.ROWS_AT_ONCE + 5)]
    folder = write_dataset(tmp_path / "ds", {"text": texts}, batch_rows=len(texts))
    documents, _ = _read(folder)
    assert [d.text for d in documents] == texts
    assert documents[-1].source == f"data-00000-of-00001.arrow#{len(texts) - 1}"


def test_a_dataset_dict_reads_its_splits_in_their_order_and_one_split_alone(tmp_path):
    root = tmp_path / "dict"
    write_dataset(root / "train", {"text": ["a train text", "another"]})
    write_dataset(root / "test", {"text": ["a test text"]})
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    documents, _ = _read(root)
    assert [(d.source, d.text) for d in documents] == [
        ("train/data-00000-of-00001.arrow#0", "a train text"),
        ("train/data-00000-of-00001.arrow#1", "another"),
        ("test/data-00000-of-00001.arrow#0", "a test text")]
    assert [d.text for d in _read(root / "test")[0]] == ["a test text"]


def test_an_arrow_file_alone_stream_or_file_format_and_invalid_utf8(tmp_path):
    stream = write_dataset(tmp_path / "s", {"text": MIXED}) / "data-00000-of-00001.arrow"
    assert [d.text for d in _read(stream)[0]] == MIXED
    ipc_file = write_dataset(tmp_path / "f", {"text": MIXED}, ipc_file=True)
    assert [d.text for d in _read(ipc_file)[0]] == MIXED
    # Bytes, not UTF-8: replaced and counted, as in every other format.
    binary = write_dataset(tmp_path / "b", {"text": pa.array([b"ok \xff\xfe", b"fine"])})
    documents, stats = _read(binary)
    assert [d.text for d in documents] == ["ok \ufffd\ufffd", "fine"]
    assert stats.invalid_bytes == 2


@pytest.mark.parametrize(("make", "needle"), [
    (lambda f: write_dataset(f, {"body": ["x"]}),
     "data-00000-of-00001.arrow: column 'text' missing (found columns: 'body'); allowed: a "
     "string column 'text' (set data.text_field)"),
    (lambda f: write_dataset(f, {"text": [1, 2]}), "column 'text' has type int64"),
    (lambda f: write_dataset(f, {"text": ["x", None]}), "row #1: column 'text' is null"),
    (lambda f: _edit_state(write_dataset(f, {"text": ["x"]}), "../../etc/passwd"),
     "state.json: _data_files holds '../../etc/passwd'; allowed: names of files"),
    (lambda f: _edit_state(write_dataset(f, {"text": ["x"]}), "gone.arrow"),
     "state.json: lists gone.arrow, which is missing"),
    (lambda f: (write_dataset(f, {"text": ["x"]}) / "data-00000-of-00001.arrow").write_bytes(
        b"not arrow at all"), "data-00000-of-00001.arrow: not an Arrow IPC stream or file"),
], ids=["no field", "not text", "null", "escaping name", "missing file", "not arrow"])
def test_a_bad_datasets_folder_is_one_line(tmp_path, make, needle):
    make(tmp_path / "ds")
    with pytest.raises(GptpipeError) as caught:
        _read(tmp_path / "ds")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def _edit_state(folder: Path, filename: str) -> None:
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": filename}]}))


@pytest.mark.parametrize("corpus", ["wikitext", "Salesforce/wikitext",
                                    "hf://datasets/Salesforce/wikitext"])
def test_a_hub_dataset_name_says_to_save_it_locally(tmp_path, monkeypatch, corpus):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptpipeError) as caught:
        _read(corpus)
    message = str(caught.value)
    assert message.startswith(f"data.corpus = {corpus}: not a local file or folder; gptpipe "
                              "reads a local corpus only (no downloads)")
    assert "load_dataset('" in message and ".save_to_disk('data/wikitext')" in message
    # A missing file in a folder that exists is a path, said as before.
    (tmp_path / "data").mkdir()
    with pytest.raises(GptpipeError, match=r"data\.corpus: data/corpus not found"):
        _read("data/corpus")


def test_written_by_datasets_itself(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [*MIXED, *synthetic_documents(9)]
    saved = datasets.Dataset.from_dict({"text": texts, "n": list(range(14))})
    saved.save_to_disk(str(tmp_path / "one"), num_shards=2)
    documents, stats = _read(tmp_path / "one")
    assert [d.text for d in documents] == texts and stats.files_read == 2
    # A shuffled dataset is saved in its new order; a DatasetDict split by split.
    saved.shuffle(seed=0).save_to_disk(str(tmp_path / "shuffled"))
    assert [d.text for d in _read(tmp_path / "shuffled")[0]] == saved.shuffle(seed=0)["text"]
    datasets.DatasetDict({"train": saved, "test": saved.select([0, 1])}).save_to_disk(
        str(tmp_path / "dict"))
    assert [d.text for d in _read(tmp_path / "dict")[0]] == [*texts, *texts[:2]]


def test_ingest_refuses_a_folder_without_the_field_and_writes_nothing(tmp_path):
    write_dataset(tmp_path / "corpus", {"content": MIXED})
    (tmp_path / "params.yaml").write_text("data:\n  corpus: corpus\n  text_field: text\n")
    result = subprocess.run([str(BIN / "gptpipe"), "ingest", "--params", "params.yaml",
                             "--out", "data/raw", "--metrics", "metrics/ingest.json"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("Error: corpus/data-00000-of-00001.arrow: column "
                                            "'text' missing (found columns: 'content')")
    assert len(result.stderr.strip().splitlines()) == 1
    # No table, no metrics, no temporary (only the outputs' parent folder, made first).
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if "corpus" not in p.parts) == ["data", "params.yaml"]


def test_the_documented_commands_save_and_ingest_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    block = re.findall(r"```bash\n(.*?)```",
                       (REPO_ROOT / "docs/datasets.md").read_text(encoding="utf-8"), re.DOTALL)
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                  for t in MIXED), encoding="utf-8")
    (tmp_path / "params.yaml").write_text("data:\n  corpus: data/notes\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / ".hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", "-c", block[0]], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ingest = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert ingest["documents"] == len(MIXED)


# ------------------------------------------------------------------------ dvc repro


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_a_saved_dataset_goes_through_dvc_repro_tokenize(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", TINY)  # data.corpus: corpus
    texts = synthetic_documents(240)
    write_dataset(repo / "corpus", {"text": texts, "id": [str(i) for i in range(240)]},
                  shards=2, batch_rows=100)
    run_cmd(["dvc", "repro", "tokenize"], repo)
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert (ingest["documents"], ingest["files_read"]) == (240, 2)
    assert list((repo / "data/tokens/train").glob("shard-*.parquet"))
    raw = _digest(repo / "data/raw")

    datasets = pytest.importorskip("datasets")
    # The same rows saved by datasets itself: other Arrow bytes (its schema metadata), the
    # same documents, so ingest runs again and writes the very same table, and DVC runs
    # nothing after it.
    for path in (repo / "corpus").iterdir():
        path.unlink()
    (repo / "corpus").rmdir()
    datasets.Dataset.from_dict({"text": texts, "id": [str(i) for i in range(240)]}
                               ).save_to_disk(str(repo / "corpus"), num_shards=2)
    result = run_cmd(["dvc", "repro", "tokenize"], repo)
    assert "Running stage 'ingest'" in result.stdout
    assert "Running stage 'clean'" not in result.stdout, result.stdout
    assert _digest(repo / "data/raw") == raw
