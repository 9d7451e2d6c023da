"""The tokenize stage: shards per split, meta and metrics, eos, determinism and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_documents

from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.params import Params, parse_params
from pipeline.data.doctable import DocumentWriter
from pipeline.data.shards import iter_shards, made_with, read_meta, read_tokens, shard_paths
from pipeline.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    load_tokenizer,
    require_tokenizer,
    train_tokenizer,
)
from pipeline.stages.tokenize import run

UNICODE = [
    "Crème brûlée à Paris, naïve café — «déjà vu».",
    "東京は日本の首都です。😀 👍🏽",
    "Tabs\tnewlines\n\n  and    spaces \r\n",
    "literal <eos> and <pad> text",
]


def write_splits(root: Path, splits: dict[str, list[str]]) -> Path:
    """Document tables <root>/split/<name>/part-00000.parquet, as the split stage writes."""
    for name, texts in splits.items():
        directory = root / "split" / name
        directory.mkdir(parents=True)
        with DocumentWriter(directory) as writer:
            for index, text in enumerate(texts):
                writer.append(id=index, source=f"{name}.txt", text=text)
    return root / "split"


def corpus() -> dict[str, list[str]]:
    docs = synthetic_documents(50, seed=3)
    return {
        "train": docs[:36] + UNICODE,
        "val": docs[36:43] + UNICODE[:2],
        "test": [*docs[43:], ""],  # an empty document still ends with <eos>
    }


def make_tokenizer(root: Path, splits: dict[str, list[str]], **vocab: object) -> Path:
    values = {"kind": "bpe", "vocab_size": 400, "min_freq": 1, **vocab}
    params = parse_params({"vocab": values}).vocab
    path = root / "vocab" / f"{values['kind']}.json"
    train_tokenizer(params, splits["train"]).save(path)
    return path


def tokenize_params(**values: object) -> Params:
    values = {"shard_tokens": 256, "batch_documents": 8, **values}
    return parse_params({"tokenize": values})


def documents_of(stream: np.ndarray) -> list[np.ndarray]:
    """Cut a token stream into its `<bos> ids <eos>` documents (it ends with <eos>)."""
    stream = np.asarray(stream)  # a split's flat file, read whole
    assert stream[-1] == EOS_ID
    pieces = np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)[:-1]
    assert all(piece[0] == BOS_ID for piece in pieces)
    return [piece[1:-1] for piece in pieces]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    splits = corpus()
    return write_splits(tmp_path, splits), make_tokenizer(tmp_path, splits), splits


def test_counts_shards_and_meta_add_up(tmp_path: Path, setup: tuple) -> None:
    split, tok_path, splits = setup
    out = tmp_path / "tokens"
    metrics = run(tokenize_params(), input=split, tokenizer=tok_path, out=out,
                  metrics=tmp_path / "m.json")
    meta = read_meta(out)
    tok = load_tokenizer(tok_path)
    require_tokenizer(tok, made_with(meta, out))
    assert (meta["kind"], meta["vocab_size"], meta["dtype"], meta["eos_id"]) == (
        "bpe",
        400,
        "uint16",
        EOS_ID,
    )
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    for name, texts in splits.items():
        counts = meta["splits"][name]
        stream = np.asarray(read_tokens(out / name))
        sizes = [len(a) for a in iter_shards(out / name)]
        assert all(size <= 256 for size in sizes)
        assert counts["shards"] == len(sizes) == len(shard_paths(out / name))
        assert counts["tokens"] == len(stream) == sum(sizes)
        assert counts["documents"] == len(texts) == int((stream == EOS_ID).sum())
        assert counts["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert counts["documents"] == int((stream == BOS_ID).sum())
        expected = sum(len(ids) + 2 for ids in tok.encode_batch(texts))
        assert counts["tokens"] == expected
        assert metrics[name] == {
            "documents": counts["documents"],
            "tokens": counts["tokens"],
            "bytes": counts["bytes"],
            "bytes_per_token": round(counts["bytes"] / counts["tokens"], 6),
        }
    assert meta["splits"]["train"]["shards"] > 1  # the corpus spans several shards


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_documents_decode_back_to_their_text(tmp_path: Path, kind: str) -> None:
    splits = corpus()
    split = write_splits(tmp_path, splits)
    tok_path = make_tokenizer(tmp_path, splits, kind=kind)
    run(tokenize_params(), input=split, tokenizer=tok_path, out=tmp_path / "tokens",
        metrics=tmp_path / "m.json")
    tok = load_tokenizer(tok_path)
    for name in ("train", "val"):
        docs = documents_of(read_tokens(tmp_path / "tokens" / name))
        assert [tok.decode(ids.tolist()) for ids in docs] == splits[name]


def test_word_documents_decode_lowercased_and_spaced(tmp_path: Path) -> None:
    splits = {"train": ["The River, runs.", "the river"], "val": ["A River"], "test": ["x"]}
    split = write_splits(tmp_path, splits)
    tok_path = make_tokenizer(tmp_path, splits, kind="word", lowercase=True)
    run(tokenize_params(), input=split, tokenizer=tok_path, out=tmp_path / "tokens",
        metrics=tmp_path / "m.json")
    tok = load_tokenizer(tok_path)
    train = documents_of(read_tokens(tmp_path / "tokens" / "train"))
    assert [tok.decode(ids.tolist()) for ids in train] == ["the river , runs .", "the river"]
    (val,) = documents_of(read_tokens(tmp_path / "tokens" / "val"))
    assert tok.decode(val.tolist()) == "<unk> river"


def test_same_inputs_give_byte_identical_outputs(tmp_path: Path, setup: tuple) -> None:
    split, tok_path, _ = setup
    run(tokenize_params(), input=split, tokenizer=tok_path, out=tmp_path / "a",
        metrics=tmp_path / "ma.json")
    # A different batch size must not change the stream either.
    run(tokenize_params(batch_documents=5), input=split, tokenizer=tok_path, out=tmp_path / "b",
        metrics=tmp_path / "mb.json")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b and len(files_a) > 4
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "ma.json").read_bytes() == (tmp_path / "mb.json").read_bytes()


def test_vocab_kind_sets_dtype_and_vocab_size(tmp_path: Path) -> None:
    splits = corpus()
    split = write_splits(tmp_path, splits)
    # Trained on 70,000 distinct words, a word vocabulary is too large for uint16.
    words = [f"w{i}" for i in range(70_000)]
    many_words = {"train": [" ".join(words[i : i + 1000]) for i in range(0, 70_000, 1000)]}
    for kind, dtype, source in (
        ("word", "uint32", many_words),
        ("char", "uint16", splits),
        ("bpe", "uint16", splits),
    ):
        tok_path = make_tokenizer(tmp_path, source, kind=kind, max_size=100_000, vocab_size=300)
        out = tmp_path / f"tokens-{kind}"
        run(tokenize_params(shard_tokens=100_000), input=split, tokenizer=tok_path, out=out,
            metrics=tmp_path / "m.json")
        meta = read_meta(out)
        assert meta["kind"] == kind and meta["dtype"] == dtype
        assert meta["vocab_size"] == load_tokenizer(tok_path).vocab_size
        assert read_tokens(out / "val").dtype == np.dtype(dtype)
    assert read_meta(tmp_path / "tokens-word")["vocab_size"] == 70_004
    assert read_meta(tmp_path / "tokens-bpe")["vocab_size"] == 300


def invoke(tmp_path: Path, split: Path, tok_path: Path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text("tokenize:\n  shard_tokens: 300\n  batch_documents: 4\n")
    return CliRunner().invoke(
        cli,
        [
            "tokenize",
            "--params",
            str(params_path),
            "--input",
            str(split),
            "--tokenizer",
            str(tok_path),
            "--out",
            str(tmp_path / "data" / "tokens"),
            "--metrics",
            str(tmp_path / "metrics" / "tokenize.json"),
        ],
    )


def test_cli_writes_declared_outputs(tmp_path: Path, setup: tuple) -> None:
    split, tok_path, _ = setup
    result = invoke(tmp_path, split, tok_path)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics" / "tokenize.json").read_text())
    assert set(metrics) == {"train", "val", "test"}
    assert read_meta(tmp_path / "data" / "tokens")["shard_tokens"] == 300
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tokens"]
    help_text = CliRunner().invoke(cli, ["tokenize", "--help"]).output
    for option in ("--params", "--input", "--tokenizer", "--out", "--metrics"):
        assert option in help_text


@pytest.mark.parametrize("content", ["{broken", '{"model": {"type": "Unigram"}}'])
def test_bad_tokenizer_file_names_it(tmp_path: Path, setup: tuple, content: str) -> None:
    split, _, _ = setup
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = invoke(tmp_path, split, bad)
    assert result.exit_code == 2
    assert f"{bad}:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "data" / "tokens").exists()


def test_missing_tokenizer_names_it(tmp_path: Path, setup: tuple) -> None:
    split, _, _ = setup
    result = invoke(tmp_path, split, tmp_path / "vocab" / "nothing.json")
    assert result.exit_code == 2
    assert f"{tmp_path / 'vocab' / 'nothing.json'}: tokenizer not found" in result.output


def test_missing_split_names_it_and_keeps_old_output(tmp_path: Path, setup: tuple) -> None:
    split, tok_path, _ = setup
    assert invoke(tmp_path, split, tok_path).exit_code == 0
    before = read_meta(tmp_path / "data" / "tokens")
    (split / "test" / "part-00000.parquet").unlink()
    result = invoke(tmp_path, split, tok_path)
    assert result.exit_code == 2
    assert f"{split / 'test'}: no document table" in result.output
    assert read_meta(tmp_path / "data" / "tokens") == before


def test_the_flat_copy_holds_the_shards_stream_and_any_damage_is_one_line(tmp_path, setup):
    split, tok_path, _ = setup
    out = tmp_path / "tokens"
    run(tokenize_params(), input=split, tokenizer=tok_path, out=out, metrics=tmp_path / "m.json")
    for name in ("train", "val", "test"):
        shards = np.concatenate(list(iter_shards(out / name)))
        assert np.array_equal(np.asarray(read_tokens(out / name)), shards)
    flat = out / "train" / "tokens.bin"
    data = flat.read_bytes()
    flat.write_bytes(data[:-2])  # cut short by one uint16 token
    with pytest.raises(GptpipeError, match=r"tokens.bin: \d+ tokens but the shards hold"):
        read_tokens(out / "train")
    flat.write_bytes(data[:-1])  # not even whole ids
    with pytest.raises(GptpipeError, match="not whole uint16 ids: cut short"):
        read_tokens(out / "train")
    swapped = bytearray(data)
    swapped[2:4], swapped[4:6] = data[4:6], data[2:4]  # the same length, other tokens
    flat.write_bytes(bytes(swapped))
    with pytest.raises(GptpipeError, match="its tokens differ from the shards'"):
        read_tokens(out / "train")
    flat.unlink()
    with pytest.raises(GptpipeError, match=r"tokens\.bin: missing"):
        read_tokens(out / "train")


def test_tokens_are_the_same_with_one_thread_or_two(tmp_path, setup):
    split, tok_path, _ = setup
    for workers in (1, 2):
        run(tokenize_params(workers=workers), input=split, tokenizer=tok_path,
            out=tmp_path / f"t{workers}", metrics=tmp_path / f"m{workers}.json")
    for name in ("train", "val", "test", "train/tokens.bin", "meta.json"):
        one, two = tmp_path / "t1" / name, tmp_path / "t2" / name
        if one.is_dir():
            assert [p.read_bytes() for p in sorted(one.iterdir())] == [
                p.read_bytes() for p in sorted(two.iterdir())]
        else:
            assert one.read_bytes() == two.read_bytes()


def test_a_corpus_too_big_for_the_free_disk_is_one_line_and_writes_nothing(
        tmp_path, setup, monkeypatch):
    import shutil
    from collections import namedtuple

    split, tok_path, _ = setup
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(GptpipeError) as caught:
        run(tokenize_params(), input=split, tokenizer=tok_path, out=tmp_path / "tokens",
            metrics=tmp_path / "m.json")
    message = str(caught.value)
    assert "the flat token files need at least" in message and "GiB free" in message
    assert "\n" not in message
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "m.json").exists()
