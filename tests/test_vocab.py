"""The vocab stage: training from train only, val metrics, determinism and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BIN, REPO_ROOT, run_cmd, synthetic_documents

from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.params import Params, VocabParams, parse_params
from pipeline.data.corpus import read_builtin
from pipeline.data.doctable import DocumentWriter
from pipeline.data.tokenizer import (
    TrainingSample,
    load_tokenizer,
    sample_fraction,
    train_tokenizer,
)
from pipeline.stages.vocab import run


def write_splits(root: Path, splits: dict[str, list[str]]) -> Path:
    """Document tables <root>/split/<name>/part-00000.parquet, as the split stage writes."""
    for name, texts in splits.items():
        directory = root / "split" / name
        directory.mkdir(parents=True)
        with DocumentWriter(directory) as writer:
            for index, text in enumerate(texts):
                writer.append(id=index, source=f"{name}.txt", text=text)
    return root / "split"


def default_splits(root: Path) -> Path:
    docs = synthetic_documents(60)
    return write_splits(root, {"train": docs[:48], "val": docs[48:54], "test": docs[54:]})


def params(**values: object) -> VocabParams:
    return parse_params({"vocab": values}).vocab


def write_params(root: Path, **values: object) -> Path:
    path = root / "params.yaml"
    path.write_text("vocab:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items()))
    return path


def invoke(root: Path, split: Path, params_path: Path):
    return CliRunner().invoke(
        cli,
        [
            "vocab",
            "--params",
            str(params_path),
            "--input",
            str(split),
            "--out",
            str(root / "vocab" / "tokenizer.json"),
            "--metrics",
            str(root / "metrics" / "vocab.json"),
        ],
    )


def test_bpe_metrics_and_tokenizer(tmp_path: Path) -> None:
    split = default_splits(tmp_path)
    out, metrics_path = tmp_path / "vocab" / "tokenizer.json", tmp_path / "vocab.json"
    metrics = run(Params(vocab=params(kind="bpe", vocab_size=300)), input=split, out=out,
                  metrics=metrics_path)
    assert json.loads(metrics_path.read_text()) == metrics
    assert set(metrics) == {
        "kind",
        "vocab_size",
        "val_tokens",
        "val_bytes",
        "val_unk_rate",
        "val_bytes_per_token",
    }
    assert metrics["kind"] == "bpe" and metrics["vocab_size"] == 300
    val_texts = synthetic_documents(60)[48:54]
    assert metrics["val_bytes"] == sum(len(t.encode()) for t in val_texts)
    tok = load_tokenizer(out)
    assert metrics["val_tokens"] == sum(map(len, tok.encode_batch(val_texts)))
    assert metrics["val_unk_rate"] == 0.0
    assert metrics["val_bytes_per_token"] == round(metrics["val_bytes"] / metrics["val_tokens"], 6)
    assert metrics["val_bytes_per_token"] > 1.5  # merges were learned and used


def test_word_unk_rate_counts_val_words_never_seen_in_train(tmp_path: Path) -> None:
    split = write_splits(
        tmp_path,
        {
            "train": ["alpha beta gamma"] * 3,
            # 6 tokens, of which zeta, eta and theta were never in train.
            "val": ["alpha zeta beta", "eta theta gamma"],
            "test": ["unused"],
        },
    )
    metrics = run(Params(vocab=params(kind="word", min_freq=1)), input=split,
                  out=tmp_path / "t.json", metrics=tmp_path / "m.json")
    assert metrics["vocab_size"] == 4 + 3
    assert metrics["val_tokens"] == 6
    assert metrics["val_unk_rate"] == 0.5


def test_trains_on_train_only(tmp_path: Path) -> None:
    split = write_splits(
        tmp_path, {"train": ["common words here"] * 2, "val": ["valonly " * 9], "test": ["x"]}
    )
    run(Params(vocab=params(kind="word", min_freq=1)), input=split, out=tmp_path / "t.json",
        metrics=tmp_path / "m.json")
    tok = load_tokenizer(tmp_path / "t.json")
    assert tok.hf.token_to_id("common") is not None
    assert tok.hf.token_to_id("valonly") is None


def test_cli_output_is_byte_identical_across_processes(tmp_path: Path) -> None:
    split = default_splits(tmp_path)
    params_path = write_params(tmp_path, kind="bpe", vocab_size=320)
    result = invoke(tmp_path, split, params_path)
    assert result.exit_code == 0, result.output
    first = (tmp_path / "vocab" / "tokenizer.json").read_bytes()
    # A second process (its own hash seeds) must write the very same bytes.
    run_cmd(
        [
            str(BIN / "gptpipe"),
            "vocab",
            "--params",
            str(params_path),
            "--input",
            str(split),
            "--out",
            str(tmp_path / "again.json"),
            "--metrics",
            str(tmp_path / "again-m.json"),
        ],
        cwd=tmp_path,
    )
    assert (tmp_path / "again.json").read_bytes() == first
    assert (tmp_path / "again-m.json").read_bytes() == (
        tmp_path / "metrics" / "vocab.json"
    ).read_bytes()
    assert not [p for p in os.listdir(tmp_path / "vocab") if p != "tokenizer.json"]


def test_help_lists_exactly_the_dvc_options() -> None:
    result = CliRunner().invoke(cli, ["vocab", "--help"])
    assert result.exit_code == 0
    for option in ("--params", "--input", "--out", "--metrics"):
        assert option in result.output
    missing = CliRunner().invoke(cli, ["vocab", "--input", "data/split"])
    assert missing.exit_code != 0 and "--params" in missing.output


def test_too_small_train_split_names_it_and_leaves_no_output(tmp_path: Path) -> None:
    split = write_splits(tmp_path, {"train": ["ab ab"], "val": ["ab"], "test": ["ab"]})
    result = invoke(tmp_path, split, write_params(tmp_path, kind="bpe", vocab_size=4096))
    assert result.exit_code == 2
    assert f"{split / 'train'}: too little text for vocab.vocab_size = 4096" in result.output
    assert "vocab.vocab_size <= 262" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "vocab" / "tokenizer.json").exists()


def test_nothing_reaching_min_freq_names_the_key(tmp_path: Path) -> None:
    split = write_splits(tmp_path, {"train": ["one two three"], "val": ["one"], "test": ["x"]})
    result = invoke(tmp_path, split, write_params(tmp_path, kind="word", min_freq=2))
    assert result.exit_code == 2
    assert f"{split / 'train'}: no word occurs vocab.min_freq = 2 times" in result.output


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_names_its_directory(tmp_path: Path, missing: str) -> None:
    texts = synthetic_documents(4)
    split = write_splits(tmp_path, {n: texts for n in ("train", "val") if n != missing})
    result = invoke(tmp_path, split, write_params(tmp_path, kind="char"))
    assert result.exit_code == 2
    assert f"{split / missing}: no document table" in result.output
    with pytest.raises(GptpipeError, match=str(split / missing)):
        run(Params(vocab=params(kind="char")), input=split, out=tmp_path / "t.json",
            metrics=tmp_path / "m.json")


def test_bad_params_value_names_the_key(tmp_path: Path) -> None:
    split = default_splits(tmp_path)
    result = invoke(tmp_path, split, write_params(tmp_path, kind="sentencepiece"))
    assert result.exit_code == 2
    assert "vocab.kind = 'sentencepiece'" in result.output


# ------------------------------------------------------- a sample of a large train split


def test_a_train_split_that_fits_is_taken_whole_batch_for_batch() -> None:
    sample = TrainingSample(total_bytes=100, max_bytes=100)
    batch = ["a", "bb"]
    assert sample.whole and sample.take(batch) is batch


def test_the_sample_is_the_texts_under_the_rate_while_the_budget_lasts() -> None:
    texts = [f"text number {i}" for i in range(400)]  # 13 to 15 bytes each
    total = sum(len(t.encode()) for t in texts)
    sample = TrainingSample(total_bytes=total, max_bytes=total // 4)
    assert sample.rate == (total // 4) / total
    kept = sample.take(texts[:150]) + sample.take(texts[150:])
    under = [t for t in texts if sample_fraction(t.encode()) < sample.rate]
    # The hash's picks, in order, less the few the budget had no room left for.
    assert [t for t in under if t in kept] == kept and len(under) - len(kept) <= 5
    assert sample.taken_bytes == sum(len(t.encode()) for t in kept) <= total // 4
    assert sample.taken_bytes > total // 5  # about the budget: the hash is uniform
    again = TrainingSample(total_bytes=total, max_bytes=total // 4)
    assert [t for i in range(0, 400, 7) for t in again.take(texts[i:i + 7])] == kept


def test_sample_fraction_is_a_uniform_position_of_the_hash() -> None:
    fractions = [sample_fraction(str(i).encode()) for i in range(4000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    assert 0.45 < sum(f < 0.5 for f in fractions) / 4000 < 0.55
    assert sample_fraction(b"same") == sample_fraction(b"same") != sample_fraction(b"Same")


def test_vocab_learns_from_a_sample_of_at_most_max_train_mb(tmp_path: Path, capsys) -> None:
    train = [f"Document {i}: " + " ".join(f"w{i * 7 + k}" for k in range(48)) for i in range(8000)]
    total = sum(len(t.encode()) for t in train)
    assert 2 * 2**20 < total < 3 * 2**20
    split = write_splits(tmp_path, {"train": train, "val": train[:20], "test": ["x"]})
    made = {}
    for max_mb in (1, 1, 3):
        out = tmp_path / f"{max_mb}.json"
        run(Params(vocab=params(kind="word", min_freq=1, max_size=10**6, max_train_mb=max_mb)),
            input=split, out=out, metrics=tmp_path / "m.json")
        made.setdefault(max_mb, []).append(out.read_bytes())
    said = capsys.readouterr().out
    assert f"sample of at most vocab.max_train_mb = 1 MiB ({2**20 / total:.1%})" in said
    assert made[1][0] == made[1][1]  # the same sample every run
    sample = TrainingSample(total, 2**20)
    sampled = sample.take(train)
    assert 0.9 * 2**20 < sample.taken_bytes <= 2**20
    expected = train_tokenizer(params(kind="word", min_freq=1, max_size=10**6), [sampled])
    assert made[1][0] == expected.json_bytes
    whole = train_tokenizer(params(kind="word", min_freq=1, max_size=10**6), train)
    assert made[3][0] == whole.json_bytes != made[1][0]


@pytest.mark.parametrize("corpus", ["wikipedia-en", "wikipedia-fr", "wikipedia-es"])
def test_every_builtin_corpus_is_learned_from_whole_by_default(corpus: str) -> None:
    texts = (doc.text for doc in read_builtin(REPO_ROOT / "data" / "builtin" / f"{corpus}.corpus"))
    size = sum(len(text.encode()) for text in texts)
    assert TrainingSample(size, VocabParams().max_train_mb * 2**20).whole


def test_max_train_mb_must_be_positive(tmp_path: Path) -> None:
    split = default_splits(tmp_path)
    result = invoke(tmp_path, split, write_params(tmp_path, kind="bpe", max_train_mb=0))
    assert result.exit_code == 2
    assert "vocab.max_train_mb = 0; allowed: a number > 0" in result.output
