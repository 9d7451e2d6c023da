"""Contamination: n-grams of any script, duplicate keys, the interval maths on hand-worked
numbers, and the stage finding planted twins (and nothing in a clean split)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, run_cmd, synthetic_documents

from pipeline.core.errors import GptpipeError
from pipeline.core.params import ContaminationParams, parse_params
from pipeline.data.contamination import (
    NgramIndex,
    TrainText,
    items_overlap,
    ngram_hashes,
    normal_interval,
    ratio_standard_error,
    sampled,
    split_overlap,
    wilson_interval,
    word_key,
)
from pipeline.data.doctable import DocumentWriter
from pipeline.stages import contamination as stage

# ---------------------------------------------------------------------- pure functions


def test_ngrams_are_words_where_there_are_spaces_and_characters_where_there_are_none():
    assert len(ngram_hashes("one two three four", 2)) == 3
    assert len(ngram_hashes("one two one two", 2)) == 2  # distinct: "one two", "two one"
    assert len(ngram_hashes("one two", 3)) == 0  # too short to check
    # Seven Chinese characters are seven words: five 3-grams.
    assert len(ngram_hashes("我爱北京天安门", 3)) == 5
    # Thai: a base character with its vowel and tone marks is one word.
    assert len(ngram_hashes("สวัสดี", 1)) == len(set(ngram_hashes("สวัสดี", 1)))
    # Code: identifiers and numbers, whatever the punctuation between them.
    assert np.array_equal(ngram_hashes("def f(x): return x+1", 3),
                          ngram_hashes("def f x return x 1", 3))


def test_ngrams_ignore_case_and_punctuation():
    assert np.array_equal(ngram_hashes("The River, the City!", 2),
                          ngram_hashes("the river the city", 2))
    assert not np.array_equal(ngram_hashes("the river the city", 2),
                              ngram_hashes("the city the river", 2))


def test_word_key_is_equal_for_the_same_words_only():
    assert word_key("Hello,  World!") == word_key("hello world")
    assert word_key("hello world") != word_key("world hello")
    assert word_key("北京") != word_key("京北")


def test_index_counts_the_hashes_it_holds():
    index = NgramIndex(2)
    assert index.count_found(ngram_hashes("a b c", 2)) == 0  # empty index
    index.add("a b c")
    index.add("c d")
    assert len(index) == 3
    assert index.count_found(ngram_hashes("b c d e", 2)) == 2  # "b c", "c d"; not "d e"


def test_sampling_keeps_the_same_ngrams_everywhere():
    hashes = np.array([0, 2**62, 2**63, 2**64 - 1], dtype=np.uint64)
    assert sampled(hashes, 1.0) is hashes
    assert sampled(hashes, 0.5).tolist() == [0, 2**62]  # below 2**63
    # A held-out copy of a train text: every n-gram the sample keeps is found.
    text = " ".join(synthetic_documents(1, seed=3, sentences=20))
    index = NgramIndex(3, sample=0.25)
    index.add(text)
    kept = sampled(ngram_hashes(text, 3), 0.25)
    assert 0 < len(kept) < len(ngram_hashes(text, 3))
    assert index.count_found(kept) == len(kept) == len(index)


def test_ratio_standard_error_by_hand():
    # Document 1: 1 of 2 n-grams found, document 2: 0 of 2. share = 1/4; residuals
    # 1 - 0.5 = 0.5 and -0.5; se = sqrt(2/1 * 0.5) / 4 = 0.25.
    share, se = ratio_standard_error(np.array([1, 0]), np.array([2, 2]))
    assert share == 0.25
    assert se == pytest.approx(0.25)
    # Every document at the same share: no spread.
    assert ratio_standard_error(np.array([1, 2]), np.array([2, 4])) == (0.5, 0.0)
    # One document says nothing about the spread.
    assert ratio_standard_error(np.array([1]), np.array([2])) == (0.5, 0.5)
    assert normal_interval(0.25, 0.25) == (0.0, pytest.approx(0.25 + 1.959963984540054 * 0.25))


def test_wilson_interval_by_hand():
    # 0 of 100: centre = (z^2 / 200) / (1 + z^2 / 100), half = z * sqrt(z^2 / 40000) / same.
    z2 = 1.959963984540054 ** 2
    high = (z2 / 200 + math.sqrt(z2 * z2 / 40000)) / (1 + z2 / 100)
    assert wilson_interval(0, 100) == (0.0, pytest.approx(high))
    assert high == pytest.approx(0.037, abs=5e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high)  # symmetric about one half
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------- planted contamination


def long_documents(count: int, seed: int) -> list[str]:
    """Documents of about 120 words: one changed word leaves a Jaccard near 0.9."""
    return synthetic_documents(count, seed=seed, sentences=12)


def near_copy(text: str) -> str:
    """``text`` with one word in its middle replaced."""
    words = text.split(" ")
    words[len(words) // 2] = "zeppelin"
    return " ".join(words)


def test_a_clean_split_shows_nothing():
    held_out = long_documents(20, seed=2)
    train = TrainText(ContaminationParams(), {"test": held_out})
    train.add_all(long_documents(30, seed=1))
    metrics = split_overlap(train, "test", held_out)
    assert metrics["test_documents"] == 20
    assert metrics["test_exact_duplicates"] == metrics["test_near_duplicates"] == 0
    assert metrics["test_ngrams_in_train"] == 0
    assert metrics["test_ngram_share"] == metrics["test_ngram_share_high"] == 0.0
    assert metrics["test_documents_with_train_ngram"] == 0
    # Nothing found in 20 documents still leaves an upper bound above zero.
    assert metrics["test_documents_with_train_ngram_share_high"] == pytest.approx(
        wilson_interval(0, 20)[1], abs=1e-6)


def test_a_planted_duplicate_and_near_duplicate_are_found():
    documents = long_documents(30, seed=1)
    clean = long_documents(18, seed=2)
    # The same words recased and repunctuated; and one word changed in another document.
    planted = [documents[3].upper().replace(".", ";"), near_copy(documents[7])]
    train = TrainText(ContaminationParams(), {"test": clean + planted})
    train.add_all(documents)
    metrics = split_overlap(train, "test", clean + planted)
    assert metrics["test_documents"] == 20
    assert metrics["test_exact_duplicates"] == 1
    assert metrics["test_near_duplicates"] == 2  # an exact duplicate is a near one too
    assert metrics["test_documents_with_train_ngram"] == 2
    # The n-grams found are exactly the planted documents' (all of the copy's, all of the
    # near copy's but the 13 that hold the changed word).
    copy_grams = len(ngram_hashes(planted[0], 13))
    near_grams = len(ngram_hashes(planted[1], 13))
    assert metrics["test_ngrams_in_train"] == copy_grams + near_grams - 13
    share = metrics["test_ngrams_in_train"] / metrics["test_ngrams"]
    assert metrics["test_ngram_share"] == pytest.approx(share, abs=1e-6)
    assert metrics["test_ngram_share_low"] < share < metrics["test_ngram_share_high"]
    assert metrics["test_ngram_share_se"] > 0


def test_items_that_quote_train_are_counted():
    documents = long_documents(10, seed=1)
    train = TrainText(ContaminationParams(), {})
    train.add_all(documents)
    quoted = " ".join(documents[0].split(" ")[5:25])
    metrics = items_overlap(train, "task_file", [quoted, "too short", *long_documents(3, 9)])
    assert metrics["task_file_items"] == 5
    assert metrics["task_file_items_too_short"] == 1
    assert metrics["task_file_items_in_train"] == 1
    assert metrics["task_file_items_in_train_share"] == 0.25


# ------------------------------------------------------------------------ the stage


def write_split(root: Path, splits: dict[str, list[str]]) -> Path:
    for name, texts in splits.items():
        (root / name).mkdir(parents=True)
        with DocumentWriter(root / name) as writer:
            for index, text in enumerate(texts):
                writer.append(id=index, source=f"{name}.txt", text=text)
    return root


def test_stage_writes_flat_numeric_metrics_and_checks_the_task_file(tmp_path: Path):
    documents = long_documents(30, seed=1)
    split = write_split(tmp_path / "split", {
        "train": documents,
        "val": long_documents(5, seed=3),
        "test": [*long_documents(5, seed=4), near_copy(documents[0])],
    })
    task = tmp_path / "task.jsonl"
    quoted = " ".join(documents[2].split(" ")[:20])
    task.write_text(json.dumps({"context": quoted, "choices": [" yes", " no"], "label": 0})
                    + "\n" + json.dumps({"context": "Unseen words here and there and more "
                                         "of them", "choices": [" a", " b"], "label": 1}) + "\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("evaluate:\n  task: file\n")
    metrics = tmp_path / "metrics" / "contamination.json"
    run_cmd([str(BIN / "gptpipe"), "contamination", "--params", str(params_file),
             "--input", str(split), "--task-file", str(task), "--metrics", str(metrics)],
            tmp_path)
    result = json.loads(metrics.read_text())
    assert all(isinstance(value, int | float) for value in result.values())
    assert result["val_near_duplicates"] == 0
    assert result["test_near_duplicates"] == 1
    assert result["task_file_items"] == 2
    assert result["task_file_items_in_train"] == 1
    assert "next_sentence_items" not in result  # evaluate.task: file scores no builtin task


def test_stage_checks_the_builtin_next_sentence_items(tmp_path: Path):
    # The builtin items are the test split's own sentences: a test split copied from train
    # has every checkable item in train.
    documents = long_documents(30, seed=1)
    split = write_split(tmp_path / "split", {
        "train": documents, "val": long_documents(3, seed=3), "test": documents[:10]})
    params = parse_params({"evaluate": {"task": "builtin"}})
    result = stage.run(params, input=split, task_file=tmp_path / "absent.jsonl",
                       metrics=tmp_path / "contamination.json")
    assert result["next_sentence_items"] == 10
    checked = result["next_sentence_items"] - result["next_sentence_items_too_short"]
    assert checked > 0
    assert result["next_sentence_items_in_train"] == checked
    assert result["test_exact_duplicates"] == 10


def test_bad_params_are_one_line_errors():
    with pytest.raises(GptpipeError, match=r"contamination\.near_dup_threshold = 1\.0"):
        parse_params({"contamination": {"near_dup_threshold": 1.0}})
    with pytest.raises(GptpipeError, match=r"contamination\.ngram_sample = 0\.0"):
        parse_params({"contamination": {"ngram_sample": 0.0}})
    with pytest.raises(GptpipeError, match=r"contamination\.near_twins"):
        parse_params({"contamination": {"near_twins": "move"}})
    with pytest.raises(GptpipeError, match=r"contamination\.shingles"):
        parse_params({"contamination": {"shingles": 3}})


# ---------------------------------------------------------- near twins at the split


def clean_table_with_a_twin_in(tmp_path: Path, held_out: str) -> tuple[Path, str]:
    """A clean table of train-bound documents plus a near copy of one of them that the
    hash sends to ``held_out``; the copy is returned too."""
    from pipeline.core.params import SplitParams
    from pipeline.data.splitting import assign_split

    settings = SplitParams()
    documents = long_documents(60, seed=5)
    train = [d for d in documents
             if assign_split(d, settings.seed, settings.train, settings.val) == "train"]
    twin = next(copy for copy in (near_copy(d) for d in train)
                if assign_split(copy, settings.seed, settings.train, settings.val) == held_out)
    table = tmp_path / "clean"
    table.mkdir()
    with DocumentWriter(table) as writer:
        for index, text in enumerate([*documents, twin]):
            writer.append(id=index, source="corpus.txt", text=text)
    return table, twin


def split_with(tmp_path: Path, table: Path, near_twins: str) -> tuple[dict, Path]:
    from pipeline.stages import split

    params = parse_params({"split": {"workers": 1},
                           "contamination": {"near_twins": near_twins}})
    out = tmp_path / f"split-{near_twins}"
    metrics = split.run(params, input=table, out=out, metrics=tmp_path / f"{near_twins}.json")
    return metrics, out


def table_texts(table: Path) -> list[str]:
    return list(stage._texts(table))


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_near_twins_train_moves_the_twin_to_train(tmp_path: Path, held_out: str):
    table, twin = clean_table_with_a_twin_in(tmp_path, held_out)
    kept, kept_out = split_with(tmp_path, table, "keep")
    moved, moved_out = split_with(tmp_path, table, "train")
    assert twin in table_texts(kept_out / held_out)
    assert "near_twins_moved_to_train" not in kept[held_out]  # keep: metrics as before
    assert twin not in table_texts(moved_out / held_out)
    assert twin in table_texts(moved_out / "train")
    assert moved[held_out]["near_twins_moved_to_train"] == 1
    assert moved["train"]["documents"] == kept["train"]["documents"] + 1
    assert moved["train"]["bytes"] == kept["train"]["bytes"] + len(twin.encode())
    # The report on the new split finds no near twin left.
    train = TrainText(ContaminationParams(), {held_out: table_texts(moved_out / held_out)})
    train.add_all(table_texts(moved_out / "train"))
    report = split_overlap(train, held_out, table_texts(moved_out / held_out))
    assert report[f"{held_out}_near_duplicates"] == 0


def test_near_twins_drop_leaves_the_twin_out(tmp_path: Path):
    table, twin = clean_table_with_a_twin_in(tmp_path, "test")
    kept, _ = split_with(tmp_path, table, "keep")
    dropped, out = split_with(tmp_path, table, "drop")
    assert dropped["test"]["near_twins_dropped"] == 1
    assert dropped["val"]["near_twins_dropped"] == 0
    assert all(twin not in table_texts(out / name) for name in ("train", "val", "test"))
    assert dropped["test"]["documents"] == kept["test"]["documents"] - 1
    assert dropped["train"]["documents"] == kept["train"]["documents"]
    assert dropped["documents"] == kept["documents"]  # the documents the split read
