"""Hostile corpus files: deep or huge JSON, endless lines, compression bombs. Each is one
line naming the file (and the limit), exit 2, nothing written, and a bomb stops early, in
bounded memory. The limits are pipeline/data/corpus/limits.py's."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import BIN

from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file
from pipeline.core.params import DataParams, Params
from pipeline.data.corpus import iter_documents, limits, reading
from pipeline.data.doctable import PART_NAME
from pipeline.stages.ingest import run

MIB = 2**20


def ingest_command(workdir: Path, corpus: str, **data: object
                   ) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``gptpipe ingest`` on ``corpus`` in ``workdir`` as DVC would; return the result
    and the command's peak resident memory in bytes."""
    params = {"data": {"corpus": corpus, "workers": 1, **data}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    args = [str(BIN / "gptpipe"), "ingest", "--params", "params.yaml", "--out", "data/raw",
            "--metrics", "metrics/ingest.json"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(workdir / "out.txt", "w+") as out, open(workdir / "err.txt", "w+") as err:
        process = subprocess.Popen(args, cwd=workdir, env=env, stdout=out, stderr=err)
        # wait4, not wait: it also gives the child's peak memory (ru_maxrss, KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, process.returncode, out.read(), err.read())
    return result, usage.ru_maxrss * 1024


def assert_refused(workdir: Path, result: subprocess.CompletedProcess, *parts: str) -> str:
    """One ``Error:`` line holding every part, exit 2, and nothing written."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert not (workdir / "data" / "raw").exists()
    assert not (workdir / "metrics").exists()
    assert not [p for p in (workdir / "data").iterdir() if ".tmp-" in p.name]
    return lines[0]


# --- hostile JSON, end to end through the command ----------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_RECORD = b'{"text": "a", "nested": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
HUGE_INTEGER = b'{"text": "a", "n": ' + b"9" * 5_000 + b"}"


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


HOSTILE_JSON = {
    "deep.json": (DEEP, "deep.json: not valid JSON (nested deeper than 200 levels)"),
    "deep.json.gz": (_gz(DEEP), "deep.json.gz: not valid JSON (nested deeper than 200"),
    "integer.json": (b"[" + HUGE_INTEGER + b"]", "integer.json: not valid JSON (Exceeds the "
                                                 "limit (4300 digits) for integer string"),
    "integer.json.zst": (zstandard.compress(b"[" + HUGE_INTEGER + b"]"),
                         "integer.json.zst: not valid JSON (Exceeds the limit (4300 digits)"),
    "deep.jsonl": (b'{"text": "fine"}\n' + DEEP_RECORD + b"\n",
                   "deep.jsonl: line 2: not valid JSON (nested deeper than 200 levels)"),
    "deep.jsonl.zst": (zstandard.compress(b'{"text": "fine"}\n' + DEEP_RECORD + b"\n"),
                       "deep.jsonl.zst: line 2: not valid JSON (nested deeper than 200"),
    "integer.jsonl.gz": (_gz(b'{"text": "fine"}\n\n' + HUGE_INTEGER + b"\n"),
                         "integer.jsonl.gz: line 3: not valid JSON (Exceeds the limit"),
}


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_hostile_json_is_one_line_through_the_command(tmp_path, name):
    data, message = HOSTILE_JSON[name]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_bytes(data)
    result, _ = ingest_command(tmp_path, f"data/{name}")
    assert_refused(tmp_path, result, message)
    assert "Traceback" not in result.stderr


# --- bombs: a few MB that decompress to GBs, stopped early -------------------------------

# What a bomb's reader may hold at most: a few hundred MB for the largest limit (a line of
# 256 Mi characters) and the interpreter with pyarrow. Reading any bomb below whole needs
# 2 GiB or more.
BOMB_PEAK_BYTES = 1536 * MIB


def gzip_bomb(head: bytes, filler: bytes, gib: int) -> bytes:
    """``head`` then ``gib`` GiB of ``filler`` as concatenated gzip members (a reader must
    read them all, as gunzip does): a 64 MiB member compresses to about 64 KB."""
    member = gzip.compress(filler * (64 * MIB // len(filler)), compresslevel=9, mtime=0)
    return gzip.compress(head, mtime=0) + member * (16 * gib)


def zstd_bomb(head: bytes, filler: bytes, gib: int) -> bytes:
    """The same as zstd frames, each a few KB."""
    frame = zstandard.ZstdCompressor(level=3).compress(filler * (64 * MIB // len(filler)))
    return zstandard.compress(head) + frame * (16 * gib)


def test_a_gzip_bomb_of_json_stops_at_the_json_file_limit(tmp_path):
    # "[" then 4 GiB of spaces: valid JSON so far, so only the size limit can stop it.
    (tmp_path / "data").mkdir()
    bomb = tmp_path / "data" / "bomb.json.gz"
    bomb.write_bytes(gzip_bomb(b"[", b" ", 4))
    assert bomb.stat().st_size < 8 * MIB
    result, peak = ingest_command(tmp_path, "data/bomb.json.gz")
    assert_refused(tmp_path, result, "bomb.json.gz: the file (decompressed) is longer than "
                   f"{limits.MAX_JSON_FILE_BYTES:,} bytes", "as JSONL")
    assert peak < BOMB_PEAK_BYTES


def test_a_zstd_bomb_of_one_endless_jsonl_line_stops_at_the_line_limit(tmp_path):
    (tmp_path / "data").mkdir()
    bomb = tmp_path / "data" / "bomb.jsonl.zst"
    bomb.write_bytes(zstd_bomb(b'{"text": "', b"a", 2))
    assert bomb.stat().st_size < MIB
    result, peak = ingest_command(tmp_path, "data/bomb.jsonl.zst")
    assert_refused(tmp_path, result, "bomb.jsonl.zst: line 1 is longer than "
                   f"{limits.MAX_LINE_CHARS:,} characters")
    assert peak < BOMB_PEAK_BYTES


def test_a_zstd_bomb_of_text_read_whole_stops_at_the_document_limit(tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("A first, ordinary file.\n", encoding="utf-8")
    (corpus / "b.txt.zst").write_bytes(zstd_bomb(b"word ", b"word ", 2))
    result, peak = ingest_command(tmp_path, "data/corpus", txt_unit="file")
    assert_refused(tmp_path, result, "b.txt.zst: the file, read whole as one document, is "
                   f"longer than {limits.MAX_DOCUMENT_CHARS:,} characters")
    assert peak < BOMB_PEAK_BYTES


# --- each limit, in process, with small limits -------------------------------------------


@pytest.fixture
def small_limits(monkeypatch):
    """Limits of 100 characters per document, 200 per line, 300 bytes per JSON file. The
    CSV reader sets the csv module's process-wide field limit from them: it is put back
    after the test, or a later test in the same process could not read a long field."""
    monkeypatch.setattr(limits, "MAX_DOCUMENT_CHARS", 100)
    monkeypatch.setattr(limits, "MAX_LINE_CHARS", 200)
    monkeypatch.setattr(limits, "MAX_JSON_FILE_BYTES", 300)
    field_limit = csv.field_size_limit()
    yield
    csv.field_size_limit(field_limit)


def read(path: Path, **data: object) -> list[str]:
    return [d.text for d in iter_documents(DataParams(corpus=str(path), **data))]


def write_csv(path: Path, texts: list[str]) -> Path:
    rows = "".join('"' + text.replace('"', '""') + '"\n' for text in texts)
    path.write_text("text\n" + rows, encoding="utf-8")
    return path


LIMIT_CASES = {
    # (file name, contents, data params, message parts)
    "paragraph": ("book.txt", "Short.\n\n" + "line of twenty chars\n" * 6, {},
                  ["book.txt: the paragraph from line 3 is longer than 100 characters",
                   "data.txt_unit: line"]),
    "line": ("notes.txt", "ok\n" + "x" * 250 + "\n", {"txt_unit": "line"},
             ["notes.txt: line 2 is longer than 200 characters"]),
    "line as a document": ("notes.txt", "ok\n" + "x" * 150 + "\n", {"txt_unit": "line"},
                           ["notes.txt:2: the document (150 characters) is longer than 100"]),
    "whole file": ("page.md", "y" * 101, {"txt_unit": "file"},
                   ["page.md: the file, read whole as one document, is longer than 100",
                    "data.txt_unit: paragraph or line"]),
    "jsonl line": ("a.jsonl", json.dumps({"text": "z" * 250}) + "\n", {},
                   ["a.jsonl: line 1 is longer than 200 characters"]),
    "jsonl record": ("a.jsonl", json.dumps({"text": "z" * 150}) + "\n", {},
                     ["a.jsonl:1: the document (150 characters) is longer than 100"]),
    "json file": ("a.json", json.dumps([{"text": "w" * 50}] * 6), {},
                  ["a.json: the file (decompressed) is longer than 300 bytes"]),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_each_limit_refuses_in_one_line_naming_the_file(tmp_path, small_limits, case):
    name, contents, data, parts = LIMIT_CASES[case]
    path = tmp_path / name
    path.write_text(contents, encoding="utf-8")
    with pytest.raises(GptpipeError) as caught:
        read(path, **data)
    for part in parts:
        assert part in str(caught.value)


def test_a_csv_field_over_the_document_limit_names_the_record(tmp_path, small_limits):
    # The field spans lines of 20 characters: only the field limit can stop it.
    path = write_csv(tmp_path / "t.csv", ["fine", "twenty characters..\n" * 6])
    with pytest.raises(GptpipeError, match=r"t\.csv: a field of the record ending at line "
                                           r"\d+ is longer than 100 characters"):
        read(path)


def test_a_parquet_row_over_the_document_limit_names_the_row(tmp_path, small_limits):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["short", "v" * 101]}), path)
    with pytest.raises(GptpipeError, match=r"t\.parquet#1: the document \(101 characters\)"):
        read(path)


def test_texts_at_the_limits_are_read(tmp_path, small_limits):
    assert read(write_csv(tmp_path / "t.csv", ["u" * 100])) == ["u" * 100]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "w" * 50}] * 4), encoding="utf-8")
    assert len(read(tmp_path / "a.json")) == 4  # 4 records: 81 bytes of JSON each
    (tmp_path / "p.txt").write_text("t" * 100 + "\n\nnext\n", encoding="utf-8")
    assert read(tmp_path / "p.txt") == ["t" * 100, "next"]


def test_a_task_that_expands_past_a_workers_share_is_streamed_by_ingest_itself(tmp_path):
    # Two small .jsonl.gz files, each handed to a worker whole, the first expanding past
    # what a worker collects (reading.TASK_TEXT_RANGES tasks' worth of text): the table is
    # the one a single process writes.
    range_bytes = 2000
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = "".join(json.dumps({"text": f"record {i} " + "words " * 40}) + "\n"
                      for i in range(reading.TASK_TEXT_RANGES * range_bytes // 250 + 50))
    (corpus / "a.jsonl.gz").write_bytes(_gz(records.encode()))
    (corpus / "b.jsonl.gz").write_bytes(_gz(b'{"text": "a last small record"}\n'))
    assert (corpus / "a.jsonl.gz").stat().st_size < range_bytes
    digests = set()
    for workers in (1, 2):
        out = tmp_path / f"raw-{workers}"
        params = Params(data=DataParams(corpus=str(corpus), workers=workers))
        metrics = run(params, out=out, metrics=tmp_path / f"m-{workers}.json",
                      range_bytes=range_bytes)
        digests.add(sha256_file(out / PART_NAME))
    assert len(digests) == 1
    assert metrics["bytes"] > reading.TASK_TEXT_RANGES * range_bytes
