"""The split stage and the pure assignment rules of pipeline/data/splitting.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import BIN, synthetic_documents

from pipeline.cli import cli
from pipeline.core.io import sha256_file
from pipeline.core.params import Params, parse_params
from pipeline.data.doctable import DOCUMENT_SCHEMA, PART_NAME, DocumentWriter
from pipeline.data.splitting import SPLITS, assign_split, documents_for_nonempty, split_point
from pipeline.stages.split import run


def write_clean(directory: Path, texts: list[str], first_id: int = 0,
                sources: list[str] | None = None) -> Path:
    directory.mkdir(parents=True)
    with DocumentWriter(directory, DOCUMENT_SCHEMA) as writer:
        for offset, text in enumerate(texts):
            source = sources[offset] if sources else f"doc{first_id + offset}"
            writer.append(id=first_id + offset, source=source, text=text)
    return directory


def split_params(**overrides: object) -> Params:
    return parse_params({"split": overrides})


def assignment(out: Path) -> dict[int, str]:
    """Document id -> the split it was written to."""
    found: dict[int, str] = {}
    for name in SPLITS:
        for doc_id in pq.read_table(out / name / PART_NAME, columns=["id"])["id"].to_pylist():
            assert doc_id not in found, f"document {doc_id} is in two splits"
            found[doc_id] = name
    return found


def test_split_point_is_the_documented_hash() -> None:
    assert split_point("hello", 1337) == 0.21575005348976203
    digest = hashlib.blake2b(b"-5\0caf\xc3\xa9").digest()
    assert split_point("café", -5) == int.from_bytes(digest[:8], "big") / 2**64


def test_assign_split_thresholds() -> None:
    u = split_point("hello", 1337)  # 0.2157...
    assert assign_split("hello", 1337, train=u + 1e-9, val=0.1) == "train"
    assert assign_split("hello", 1337, train=u, val=0.1) == "val"  # u < train is strict
    assert assign_split("hello", 1337, train=u - 0.05, val=0.05 + 1e-9) == "val"
    assert assign_split("hello", 1337, train=u - 0.05, val=0.05) == "test"


def test_documents_for_nonempty() -> None:
    assert documents_for_nonempty(0.1) == 44  # 0.9**44 = 0.0097 < 0.01 <= 0.9**43
    assert documents_for_nonempty(0.5) == 7
    assert documents_for_nonempty(0.8) == 3
    # 0.5**2 equals the risk exactly; "below risk" needs one more document.
    assert documents_for_nonempty(0.5, risk=0.25) == 3
    with pytest.raises(ValueError):
        documents_for_nonempty(1.0)


def test_fractions_follow_params(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", synthetic_documents(2000, seed=1))
    metrics = run(split_params(), input=clean, out=tmp_path / "split",
                  metrics=tmp_path / "split.json")
    assert metrics["documents"] == 2000
    assert sum(metrics[name]["documents"] for name in SPLITS) == 2000
    for name, target in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(metrics[name]["fraction_documents"] - target) < 0.03, metrics
        assert abs(metrics[name]["fraction_bytes"] - target) < 0.03, metrics
        rows = pq.read_table(tmp_path / "split" / name / PART_NAME)
        assert rows.num_rows == metrics[name]["documents"]
        assert sum(len(t.encode()) for t in rows["text"].to_pylist()) == metrics[name]["bytes"]
    assert json.loads((tmp_path / "split.json").read_text()) == metrics


def test_adding_documents_moves_none(tmp_path: Path) -> None:
    texts = synthetic_documents(600, seed=2)
    small = write_clean(tmp_path / "small", texts[:400])
    large = write_clean(tmp_path / "large", texts)
    run(split_params(), input=small, out=tmp_path / "a", metrics=tmp_path / "a.json")
    run(split_params(), input=large, out=tmp_path / "b", metrics=tmp_path / "b.json")
    before, after = assignment(tmp_path / "a"), assignment(tmp_path / "b")
    assert len(before) == 400 and len(after) == 600
    assert {i: after[i] for i in before} == before


def test_seed_changes_assignment(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", synthetic_documents(300, seed=3))
    run(split_params(seed=1), input=clean, out=tmp_path / "a", metrics=tmp_path / "a.json")
    run(split_params(seed=2), input=clean, out=tmp_path / "b", metrics=tmp_path / "b.json")
    first, second = assignment(tmp_path / "a"), assignment(tmp_path / "b")
    moved = sum(first[i] != second[i] for i in first)
    assert moved > 30  # about 2 * 0.8 * 0.2 = 32% of documents move; never none


def test_identical_texts_share_a_split(tmp_path: Path) -> None:
    texts = synthetic_documents(50, seed=4) * 3  # every text three times
    clean = write_clean(tmp_path / "clean", texts)
    run(split_params(), input=clean, out=tmp_path / "split", metrics=tmp_path / "split.json")
    splits_of: dict[str, set[str]] = {}
    for name in SPLITS:
        for text in pq.read_table(tmp_path / "split" / name / PART_NAME)["text"].to_pylist():
            splits_of.setdefault(text, set()).add(name)
    assert len(splits_of) == 50
    assert all(len(names) == 1 for names in splits_of.values())


def test_output_is_byte_identical_across_runs(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", synthetic_documents(200, seed=5))
    for name in ("a", "b"):
        run(split_params(), input=clean, out=tmp_path / name, metrics=tmp_path / f"{name}.json")
    for name in SPLITS:
        first = sha256_file(tmp_path / "a" / name / PART_NAME)
        assert first == sha256_file(tmp_path / "b" / name / PART_NAME)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(SPLITS)


def _invoke(tmp_path: Path, params_text: str, clean: Path) -> tuple[int, str]:
    (tmp_path / "p.yaml").write_text(params_text, encoding="utf-8")
    args = ["split", "--params", str(tmp_path / "p.yaml"), "--input", str(clean)]
    args += ["--out", str(tmp_path / "split"), "--metrics", str(tmp_path / "split.json")]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_cli_writes_outputs(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", synthetic_documents(100, seed=6))
    code, output = _invoke(tmp_path, "split:\n  seed: 7\n", clean)
    assert code == 0, output
    assert "split: 100 documents: train" in output
    metrics = json.loads((tmp_path / "split.json").read_text())
    assert sum(metrics[name]["documents"] for name in SPLITS) == 100


def test_too_small_corpus_names_the_empty_split(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", ["only one", "and two"])
    code, output = _invoke(tmp_path, "split:\n  seed: 1\n", clean)
    assert code != 0
    line = output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "got 0 of 2 documents from" in line and str(clean) in line
    assert "about 44 make an empty val split unlikely at split.val = 0.1" in line
    assert not (tmp_path / "split").exists() and not (tmp_path / "split.json").exists()


def test_missing_input_table_names_it(tmp_path: Path) -> None:
    code, output = _invoke(tmp_path, "split: {}\n", tmp_path / "nowhere")
    assert code != 0
    assert str(tmp_path / "nowhere") in output and PART_NAME in output


def test_fractions_not_summing_to_one_fail_in_one_line(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean", synthetic_documents(10))
    params = tmp_path / "p.yaml"
    params.write_text("split:\n  train: 0.8\n  val: 0.2\n  test: 0.2\n", encoding="utf-8")
    args = [str(BIN / "gptpipe"), "split", "--params", str(params), "--input", str(clean)]
    args += ["--out", str(tmp_path / "split"), "--metrics", str(tmp_path / "split.json")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "p.yaml: split.train + split.val + split.test = 1.2" in lines[0]
    assert "allowed: fractions that sum to 1" in lines[0]
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize(("sources", "texts", "remedy"), [
    # Whole text files: cut them in paragraphs or lines.
    (["notes.txt", "more.md"], ["one note", "another"],
     "the documents are whole text files: cut them into more with data.txt_unit: paragraph"),
    # Paragraphs of a text file, some of several lines: cut them in lines.
    (["book.txt:1", "book.txt:9"], ["line one\nline two", "three"],
     "the documents are paragraphs of text files: cut them into more with data.txt_unit: "
     "line"),
    # Records of structured data: only more data (or larger fractions) helps.
    (["rows.jsonl:1", "rows.jsonl:2"], ["a", "b"],
     "use a larger corpus, or larger split.val and split.test fractions"),
])
def test_a_split_left_empty_names_the_param_that_fixes_it(tmp_path, sources, texts, remedy):
    clean = write_clean(tmp_path / "clean", texts, sources=sources)
    code, output = _invoke(tmp_path, "split:\n  seed: 1\n", clean)
    assert code == 2
    assert output.count("\n") == 1 and remedy in output


def test_split_is_byte_identical_for_any_number_of_workers(tmp_path: Path) -> None:
    # 9,000 documents are three row groups: one task each, hashed by one or two workers.
    clean = write_clean(tmp_path / "clean", synthetic_documents(9000, seed=8, sentences=1))
    digests = set()
    for workers, groups in ((1, 4), (1, 1), (2, 1)):
        out = tmp_path / f"split-{workers}-{groups}"
        run(split_params(workers=workers), input=clean, out=out,
            metrics=tmp_path / f"{workers}-{groups}.json", groups_per_task=groups)
        tables = [sha256_file(out / name / PART_NAME) for name in SPLITS]
        digests.add((*tables, sha256_file(tmp_path / f"{workers}-{groups}.json")))
    assert len(digests) == 1
    # The same rows as the plain rule gives, in input order.
    texts = synthetic_documents(9000, seed=8, sentences=1)
    expected = [i for i, text in enumerate(texts) if assign_split(text, 1337, 0.8, 0.1) == "val"]
    val = pq.read_table(out / "val" / PART_NAME, columns=["id"])["id"].to_pylist()
    assert val == expected
    assert pq.ParquetFile(out / "train" / PART_NAME).metadata.num_row_groups == 2
