"""The clean stage: cleaning, filters, metrics, determinism, workers and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import synthetic_documents

from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file
from pipeline.core.params import Params, parse_params
from pipeline.data.doctable import PART_NAME, RAW_SCHEMA, DocumentWriter
from pipeline.stages.clean import run


def write_raw(directory: Path, texts: list[str], invalid: list[int] | None = None) -> Path:
    directory.mkdir(parents=True)
    with DocumentWriter(directory, RAW_SCHEMA) as writer:
        for index, text in enumerate(texts):
            writer.append(
                id=index,
                source=f"corpus/doc{index}.txt",
                text=text,
                invalid_bytes=invalid[index] if invalid else 0,
            )
    return directory


def clean_params(**overrides: object) -> Params:
    return parse_params({"clean": {"min_bytes": 10, "workers": 1, **overrides}})


def read_rows(directory: Path) -> list[dict]:
    return pq.read_table(directory / PART_NAME).to_pylist()


def write_params(path: Path, **clean: object) -> Path:
    lines = ["clean:"] + [f"  {key}: {json.dumps(value)}" for key, value in clean.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def invoke(tmp_path: Path, params: Path, raw: Path) -> tuple[int, str]:
    args = ["clean", "--params", str(params), "--input", str(raw)]
    args += ["--out", str(tmp_path / "clean"), "--metrics", str(tmp_path / "clean.json")]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_clean_filters_and_counts(tmp_path: Path) -> None:
    texts = [
        "  First\u00a0document,\r\nlong enough.\x00 ",  # cleaned; one control char
        "tiny",  # too short
        "First document,\nlong enough.",  # exact duplicate of the first once cleaned
        "Second \u200bdocument \ufb01ne.",  # NFKC folds the ligature; one zero-width char
        "tiny",  # too short again
    ]
    raw = write_raw(tmp_path / "raw", texts, invalid=[0, 0, 0, 3, 1])
    metrics = run(clean_params(), input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")

    rows = read_rows(tmp_path / "clean")
    assert rows == [
        {"id": 0, "source": "corpus/doc0.txt", "text": "First document,\nlong enough."},
        {"id": 3, "source": "corpus/doc3.txt", "text": "Second document fine."},
    ]
    assert metrics == {
        "documents_in": 5,
        "documents_out": 2,
        "bytes_in": sum(len(t.encode()) for t in texts),
        "bytes_out": len(b"First document,\nlong enough.") + len(b"Second document fine."),
        "dropped_too_short": 2,
        "dropped_exact_duplicate": 1,
        "dropped_near_duplicate": 0,
        "invalid_bytes": 4,
        "chars_removed": 2,
    }
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_dedup_off_keeps_exact_duplicates(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["same text here", "same text here", "other text!"])
    metrics = run(clean_params(dedup=False), input=raw, out=tmp_path / "clean",
                  metrics=tmp_path / "m.json")
    assert metrics["documents_out"] == 3
    assert metrics["dropped_exact_duplicate"] == 0


def test_nfc_keeps_compatibility_characters(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["\ufb01ne \u2460 e\u0301t\u00e9"])
    params = clean_params(normalization="NFC", min_bytes=1)
    run(params, input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")
    assert read_rows(tmp_path / "clean")[0]["text"] == "\ufb01ne \u2460 \u00e9t\u00e9"


def test_near_duplicates_are_dropped_keeping_the_first(tmp_path: Path) -> None:
    base, other = synthetic_documents(2, seed=7, sentences=8)
    words = base.split()
    words[len(words) // 2] = "changed"  # one word of ~90: Jaccard of 5-grams near 0.9
    near = " ".join(words)
    raw = write_raw(tmp_path / "raw", [base, other, near])
    params = clean_params(near_dup_threshold=0.7)
    metrics = run(params, input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")
    assert [row["id"] for row in read_rows(tmp_path / "clean")] == [0, 1]
    assert metrics["dropped_near_duplicate"] == 1

    off = run(clean_params(), input=raw, out=tmp_path / "clean-off",
              metrics=tmp_path / "m-off.json")
    assert off["documents_out"] == 3


def test_output_is_identical_for_any_worker_count(tmp_path: Path) -> None:
    texts = synthetic_documents(60, seed=3)
    texts[10] = texts[2]  # an exact duplicate across worker batches
    texts[20] = "short"
    raw = write_raw(tmp_path / "raw", texts)
    outputs = []
    for name, workers in (("a", 1), ("b", 2)):
        params = clean_params(workers=workers, near_dup_threshold=0.8)
        metrics = run(params, input=raw, out=tmp_path / name, metrics=tmp_path / f"{name}.json",
                      batch_documents=7)
        outputs.append((sha256_file(tmp_path / name / PART_NAME), metrics))
    assert outputs[0] == outputs[1]
    assert outputs[0][1]["dropped_exact_duplicate"] == 1
    assert outputs[0][1]["dropped_too_short"] == 1
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_cli_writes_outputs(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["a document long enough", "another one, long enough"])
    code, output = invoke(tmp_path, write_params(tmp_path / "p.yaml", min_bytes=5), raw)
    assert code == 0, output
    assert "kept 2 of 2 documents" in output
    assert json.loads((tmp_path / "clean.json").read_text())["documents_out"] == 2
    assert len(read_rows(tmp_path / "clean")) == 2


def test_all_dropped_is_an_error_and_keeps_the_old_output(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["short", "tiny", "short"])
    old = tmp_path / "clean"
    old.mkdir()
    (old / "marker").write_text("previous run")
    code, output = invoke(tmp_path, write_params(tmp_path / "p.yaml", min_bytes=64), raw)
    assert code != 0
    assert "all 3 documents" in output and str(raw) in output
    assert "too_short: 3, exact_duplicate: 0, near_duplicate: 0" in output
    assert "clean.min_bytes" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert (old / "marker").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "p.yaml", "raw"]


def test_missing_input_table_names_it(tmp_path: Path) -> None:
    code, output = invoke(tmp_path, write_params(tmp_path / "p.yaml"), tmp_path / "nowhere")
    assert code != 0
    assert str(tmp_path / "nowhere") in output and PART_NAME in output
    assert not (tmp_path / "clean").exists()


def test_empty_input_table_is_an_error(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", [])
    with pytest.raises(GptpipeError, match=r"raw/part-00000.parquet: 0 documents"):
        run(clean_params(), input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")


def test_unworkable_near_dup_threshold_names_the_key(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["a document long enough"])
    params = write_params(tmp_path / "p.yaml", near_dup_threshold=0.99, near_dup_num_perm=128)
    code, output = invoke(tmp_path, params, raw)
    assert code != 0
    assert "p.yaml: clean.near_dup_threshold = 0.99" in output
    assert "at most 0.98 with clean.near_dup_num_perm = 128" in output


def test_bad_params_value_names_the_key(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["a document long enough"])
    code, output = invoke(tmp_path, write_params(tmp_path / "p.yaml", normalization="NFD"), raw)
    assert code != 0
    assert "clean.normalization = 'NFD'" in output


def test_cli_options_are_all_required() -> None:
    result = CliRunner().invoke(cli, ["clean", "--input", "data/raw"])
    assert result.exit_code != 0
    assert "Missing option '--params'" in result.output


def test_code_keeps_its_layout_and_prose_is_tidied(tmp_path: Path) -> None:
    code = "def f(x):\n\n\n    if x:  \n\t\treturn  x   # aligned\n"
    prose = "Prose   with\ttabs \n\n\n\nand blank lines. "
    raw = write_raw(tmp_path / "raw", [code, prose], invalid=[0, 0])
    run(clean_params(min_bytes=1), input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")
    texts = [row["text"] for row in read_rows(tmp_path / "clean")]
    # Indentation, tabs, inner runs of spaces and blank lines stay; trailing spaces go.
    assert texts == ["def f(x):\n\n\n    if x:\n\t\treturn  x   # aligned",
                     "Prose with tabs\n\nand blank lines."]


def test_min_bytes_counts_utf8_bytes_the_same_in_every_script(tmp_path: Path) -> None:
    texts = ["北京是中国的首都", "Moscow is big", "Москва большая"]  # 24, 13 and 27 bytes
    raw = write_raw(tmp_path / "raw", texts, invalid=[0, 0, 0])
    run(clean_params(min_bytes=24), input=raw, out=tmp_path / "a", metrics=tmp_path / "a.json")
    assert [row["text"] for row in read_rows(tmp_path / "a")] == [texts[0], texts[2]]
    run(clean_params(min_bytes=25), input=raw, out=tmp_path / "b", metrics=tmp_path / "b.json")
    assert [row["text"] for row in read_rows(tmp_path / "b")] == [texts[2]]


def test_clean_keeps_the_joiners_of_persian_words_and_emoji(tmp_path: Path) -> None:
    # The French builtin corpus spells a Persian name this way: Shams al-Din, with a ZWNJ.
    persian = "Hafez, \u0634\u0645\u0633\u200c\u0627\u0644\u062f\u06cc\u0646, was a poet of Shiraz."
    emoji = "The sticker \U0001f469\u200d\U0001f4bb (woman technologist) is one emoji."
    stray = "The Roman Republic (509\u200d\u2013\u200d27 BC) came before the Empire."
    raw = write_raw(tmp_path / "raw", [persian, emoji, stray])
    metrics = run(clean_params(), input=raw, out=tmp_path / "clean", metrics=tmp_path / "m.json")
    assert [row["text"] for row in read_rows(tmp_path / "clean")] == [
        persian, emoji, "The Roman Republic (509\u201327 BC) came before the Empire."]
    assert metrics["chars_removed"] == 2


def test_dedup_memory_must_be_positive(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", ["a document long enough"])
    code, output = invoke(tmp_path, write_params(tmp_path / "p.yaml", dedup_memory_mb=0), raw)
    assert code == 2
    assert "p.yaml: clean.dedup_memory_mb = 0; allowed: a number > 0" in output
