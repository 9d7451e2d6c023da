"""Token shards: size bound, dtype, round trip, deterministic bytes and reader errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import GptpipeError
from pipeline.data.shards import (
    ShardWriter,
    iter_shards,
    made_with,
    read_meta,
    read_tokens,
    shard_paths,
    token_dtype,
    write_meta,
)
from pipeline.data.tokenizer import require_tokenizer


def write_stream(
    directory: Path, arrays: list[np.ndarray], dtype: type, shard_tokens: int
) -> ShardWriter:
    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, np.dtype(dtype), shard_tokens) as writer:
        for array in arrays:
            writer.append(array)
    return writer


def random_arrays(seed: int, count: int = 20, high: int = 5000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=rng.integers(0, 300)) for _ in range(count)]


def meta(**overrides: object) -> dict:
    base = {
        "tokenizer_sha256": "a" * 64,
        "kind": "bpe",
        "vocab_size": 512,
        "dtype": "uint16",
        "bos_id": 2,
        "eos_id": 3,
        "shard_tokens": 100,
        "splits": {"train": {"documents": 1, "tokens": 2, "bytes": 3, "shards": 1}},
    }
    return {**base, **overrides}


class FakeTokenizer:
    def __init__(self, sha256: str, vocab_size: int, path: str = "data/vocab/tokenizer.json"):
        self.sha256, self.vocab_size, self.path = sha256, vocab_size, path


def test_token_dtype_switches_above_65536() -> None:
    assert token_dtype(261) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shards_hold_at_most_shard_tokens_and_round_trip(tmp_path: Path) -> None:
    arrays = random_arrays(0)
    expected = np.concatenate(arrays).astype(np.uint16)
    writer = write_stream(tmp_path / "train", arrays, np.uint16, shard_tokens=500)
    sizes = [len(a) for a in iter_shards(tmp_path / "train")]
    assert all(size == 500 for size in sizes[:-1]) and 0 < sizes[-1] <= 500
    assert len(sizes) == writer.shards == -(-len(expected) // 500)
    assert writer.tokens == len(expected) == sum(sizes)
    tokens = read_tokens(tmp_path / "train")
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, expected)
    assert [p.name for p in shard_paths(tmp_path / "train")][:2] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]


def test_one_array_larger_than_several_shards(tmp_path: Path) -> None:
    big = np.arange(1050) % 7
    write_stream(tmp_path / "s", [big], np.uint16, shard_tokens=100)
    assert [len(a) for a in iter_shards(tmp_path / "s")] == [100] * 10 + [50]
    np.testing.assert_array_equal(read_tokens(tmp_path / "s"), big)


def test_uint32_is_preserved_and_large_ids_survive(tmp_path: Path) -> None:
    ids = np.array([0, 3, 65535, 65536, 100_000, 2**31 - 1], dtype=np.int64)
    write_stream(tmp_path / "s", [ids], np.uint32, shard_tokens=4)
    tokens = read_tokens(tmp_path / "s")
    assert tokens.dtype == np.uint32
    np.testing.assert_array_equal(tokens, ids)
    assert pq.read_schema(shard_paths(tmp_path / "s")[0]).field("ids").type == pa.uint32()


def test_ids_too_large_for_the_dtype_are_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s", np.dtype(np.uint16), 10)
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        writer.append(np.array([1, 70000]))


def test_empty_stream_writes_one_empty_shard(tmp_path: Path) -> None:
    writer = write_stream(tmp_path / "s", [], np.uint16, shard_tokens=10)
    assert writer.shards == 1
    tokens = read_tokens(tmp_path / "s")
    assert tokens.dtype == np.uint16 and tokens.size == 0


def test_same_tokens_give_the_same_bytes(tmp_path: Path) -> None:
    arrays = random_arrays(1)
    write_stream(tmp_path / "a", arrays, np.uint16, 700)
    # The same stream cut into different appends must not change a byte.
    write_stream(tmp_path / "b", [np.concatenate(arrays)], np.uint16, 700)
    a, b = shard_paths(tmp_path / "a"), shard_paths(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_missing_split_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(GptpipeError, match=rf"{tmp_path / 'val'}: no token shards"):
        read_tokens(tmp_path / "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptpipeError, match="run gptpipe tokenize first"):
        read_tokens(tmp_path / "empty")


def test_a_shard_without_the_ids_column_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / "shard-00000.parquet"
    pq.write_table(pa.table({"tokens": pa.array([1, 2], pa.uint16())}), path)
    with pytest.raises(GptpipeError, match=rf"{path}: not a token shard"):
        read_tokens(tmp_path / "s")
    pq.write_table(pa.table({"ids": pa.array([1.5])}), path)
    with pytest.raises(GptpipeError, match=rf"{path}: column 'ids' is double"):
        read_tokens(tmp_path / "s")


def test_meta_round_trip_and_errors(tmp_path: Path) -> None:
    write_meta(tmp_path, meta())
    assert read_meta(tmp_path) == meta()
    with pytest.raises(GptpipeError, match=rf"{tmp_path / 'nowhere' / 'meta.json'}: .*not found"):
        read_meta(tmp_path / "nowhere")
    broken = meta()
    del broken["vocab_size"]
    write_meta(tmp_path, broken)
    with pytest.raises(GptpipeError, match=r"meta.json: key 'vocab_size' missing"):
        read_meta(tmp_path)
    write_meta(tmp_path, meta(splits={"val": {"documents": 1}}))
    with pytest.raises(GptpipeError, match=r"splits.val.tokens missing"):
        read_meta(tmp_path)


def test_require_tokenizer_names_the_shards_and_both_tokenizers(tmp_path: Path) -> None:
    require_tokenizer(FakeTokenizer("a" * 64, 512), made_with(meta(), tmp_path))  # same: no error
    for other, recorded in ((FakeTokenizer("b" * 64, 512), "sha256 aaaaaaaaaaaa"),
                            (FakeTokenizer("a" * 64, 513), "512 tokens")):
        with pytest.raises(GptpipeError) as err:
            require_tokenizer(other, made_with(meta(), tmp_path))
        message = str(err.value)
        assert message.startswith(f"{tmp_path / 'meta.json'}: the token shards were made with "
                                  f"another tokenizer ({recorded})")
        assert "data/vocab/tokenizer.json" in message
