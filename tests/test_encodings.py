"""Text in other encodings than UTF-8: data.encoding reads Shift_JIS, GB18030, Big5,
Latin-1 and CP1252 files in every text format, and a file that does not decode says so,
naming data.encoding."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, run_cmd

from pipeline.core.io import sha256_file
from pipeline.core.params import DataParams, Params
from pipeline.data.corpus import iter_documents
from pipeline.data.doctable import PART_NAME
from pipeline.stages.ingest import run

# Texts each encoding can hold, two per file.
TEXTS = {
    "shift_jis": ["吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。"],
    "cp932": ["①　ＮＥＣ特殊文字も読める。", "髙橋さんの﨑。"],
    "gb18030": ["北京是中华人民共和国的首都。", "𠀀 罕用字也能读。"],
    "big5": ["臺北是臺灣的首都。", "繁體中文的文件。"],
    "latin-1": ["Café, naïve, déjà vu: l'été à Besançon.", "Straße und Größe."],
    "cp1252": ["“Quoted” — with an em dash and the € sign.", "Œuvres complètes."],
}


def write_corpus(root: Path, encoding: str, texts: list[str]) -> Path:
    """The texts as a plain-text file (one paragraph each), a JSONL file, a JSON file
    and a CSV file, all in ``encoding``."""
    root.mkdir(parents=True)
    (root / "a.txt").write_bytes("\n\n".join(texts).encode(encoding) + b"\n")
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (root / "b.jsonl").write_bytes(lines.encode(encoding))
    (root / "c.json").write_bytes(json.dumps([{"text": t} for t in texts],
                                             ensure_ascii=False).encode(encoding))
    rows = io.StringIO()
    csv.writer(rows).writerows([["text"], *[[t] for t in texts]])
    (root / "d.csv").write_bytes(rows.getvalue().encode(encoding))
    return root


def ingest(workdir: Path, corpus: str, check: bool = True, **data: object):
    (workdir / "params.yaml").write_text(yaml.safe_dump({"data": {"corpus": corpus, **data}},
                                                        allow_unicode=True))
    command = [str(BIN / "gptpipe"), "ingest", "--params", "params.yaml", "--out", "raw",
               "--metrics", "ingest.json"]
    return run_cmd(command, workdir, check=check)


@pytest.mark.parametrize("encoding", list(TEXTS))
def test_data_encoding_reads_every_text_format_in_that_encoding(tmp_path, encoding):
    texts = TEXTS[encoding]
    write_corpus(tmp_path / "corpus", encoding, texts)
    result = ingest(tmp_path, "corpus", encoding=encoding)
    rows = pq.read_table(tmp_path / "raw" / PART_NAME).to_pylist()
    assert [row["text"] for row in rows] == texts * 4
    assert [row["source"] for row in rows][::2] == ["a.txt:1", "b.jsonl:1", "c.json#0",
                                                    "d.csv:2"]
    assert json.loads((tmp_path / "ingest.json").read_text())["invalid_bytes"] == 0
    assert "invalid" not in result.stdout and "skipped:" not in result.stdout


def test_a_file_in_another_encoding_is_refused_naming_data_encoding(tmp_path):
    (tmp_path / "novel.txt").write_bytes("\n\n".join(TEXTS["shift_jis"] * 20).encode("sjis"))
    result = ingest(tmp_path, "novel.txt", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: data.corpus: novel.txt is not text in data.encoding = "
                               "utf-8")
    assert "set it to the file's encoding: shift_jis" in lines[0]
    assert not (tmp_path / "raw").exists()
    # Named, it reads.
    ingest(tmp_path, "novel.txt", encoding="shift_jis")
    texts = pq.read_table(tmp_path / "raw" / PART_NAME).column("text").to_pylist()
    assert texts == TEXTS["shift_jis"] * 20


def test_a_folder_in_another_encoding_says_what_did_not_decode_naming_data_encoding(tmp_path):
    # Latin-1 accents are a few bytes in a hundred: read, but each replaced; Shift_JIS is
    # mostly bytes invalid in UTF-8: skipped as not text.
    corpus = write_corpus(tmp_path / "corpus", "latin-1", TEXTS["latin-1"])
    (corpus / "e.txt").write_bytes("\n".join(TEXTS["shift_jis"] * 10).encode("sjis"))
    result = ingest(tmp_path, "corpus")
    metrics = json.loads((tmp_path / "ingest.json").read_text())
    # One invalid byte per accented letter, in each of the four files.
    accents = 4 * sum(not char.isascii() for text in TEXTS["latin-1"] for char in text)
    assert metrics["files_skipped_binary"] == 1 and metrics["invalid_bytes"] == accents
    assert ("ingest: 1 files skipped: not text in data.encoding = utf-8 (binary files, or "
            "text in another encoding: set data.encoding)") in result.stdout
    assert (f"ingest: {accents} bytes invalid in data.encoding = utf-8 were replaced with "
            "U+FFFD (if the files are in another encoding, set data.encoding)") in result.stdout


def test_bytes_invalid_in_a_legacy_encoding_are_replaced_and_counted_one_each(tmp_path):
    # 0x81 0x20: a Shift_JIS lead byte without its trail byte; 0xFF: no Shift_JIS byte.
    path = tmp_path / "a.txt"
    path.write_bytes("前".encode("sjis") + b"\x81 \xff" + "後".encode("sjis"))
    documents = list(iter_documents(DataParams(corpus=str(path), encoding="shift_jis")))
    assert [(d.text, d.invalid_bytes) for d in documents] == [("前\ufffd \ufffd後", 2)]


@pytest.mark.parametrize("encoding", ["utf-16", "iso2022_jp", "utf-7", "base64", "no-such"])
def test_an_encoding_the_readers_cannot_cut_is_refused_in_one_line(tmp_path, encoding):
    (tmp_path / "a.txt").write_text("text\n", encoding="utf-8")
    result = ingest(tmp_path, "a.txt", check=False, encoding=encoding)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: params.yaml: data.encoding = {encoding!r}; allowed: an encoding that reads "
        "ASCII as ASCII, with no shift states: utf-8, shift_jis, cp932, euc_jp, gb18030, "
        "gbk, big5, euc_kr, latin-1, cp1252 ...")


def test_a_legacy_encoding_is_read_the_same_in_byte_ranges_by_any_number_of_workers(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paragraphs = [f"{i}: " + TEXTS["gb18030"][i % 2] * (1 + i % 3) for i in range(200)]
    (corpus / "big.txt").write_bytes("\r\n\r\n".join(paragraphs).encode("gb18030"))
    (corpus / "b.jsonl").write_bytes("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n"
                                             for p in paragraphs).encode("gb18030"))
    digests = set()
    for workers, range_bytes in ((1, 1 << 30), (1, 500), (2, 500)):
        params = Params(data=DataParams(corpus=str(corpus), encoding="gb18030",
                                        txt_unit="paragraph", workers=workers))
        out = tmp_path / f"raw-{workers}-{range_bytes}"
        metrics = run(params, out=out, metrics=tmp_path / "m.json", range_bytes=range_bytes)
        digests.add(sha256_file(out / PART_NAME))
    assert len(digests) == 1
    assert metrics["documents"] == 400 and metrics["invalid_bytes"] == 0
    assert pq.read_table(out / PART_NAME).column("text").to_pylist() == paragraphs * 2
