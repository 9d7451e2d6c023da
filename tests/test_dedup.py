"""Exact dedup in bounded memory: spilled keys decide as the in-memory set does, and the
clean stage keeps the very same documents when its keys spill."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import BIN, REPO_ROOT, synthetic_documents

from pipeline.core.io import sha256_file
from pipeline.core.params import parse_params
from pipeline.data.dedup import (
    BYTES_PER_KEY,
    MIN_BUFFER_BYTES,
    RECORD,
    SeenKeys,
    SpilledKeys,
    partitions_needed,
    scratch_folder,
    scratch_path,
)
from pipeline.data.doctable import PART_NAME, RAW_SCHEMA, DocumentWriter
from pipeline.data.text import dedup_key
from pipeline.stages.clean import run

MB = 2**20


def keys_with_copies(count: int, distinct: int, seed: int = 0) -> list[bytes]:
    """``count`` keys drawn from ``distinct`` ones: many repeated, some far apart."""
    rng = random.Random(seed)
    pool = [dedup_key(f"text {i}") for i in range(distinct)]
    return [rng.choice(pool) for _ in range(count)]


def in_memory_duplicates(keys: list[bytes]) -> list[int]:
    seen = SeenKeys()
    return [ordinal for ordinal, key in enumerate(keys) if seen.seen_before(key)]


def test_partitions_needed_counts_a_set_entry_per_document() -> None:
    per_mb = MB // BYTES_PER_KEY  # 8192 keys a MiB
    assert partitions_needed(0, MB) == 1
    assert partitions_needed(per_mb, MB) == 1
    assert partitions_needed(per_mb + 1, MB) == 2
    assert partitions_needed(10 * per_mb, 2 * MB) == 5


def test_seen_keys_answers_true_from_the_second_copy_on() -> None:
    a, b = dedup_key("a"), dedup_key("b")
    assert in_memory_duplicates([a, b, a, a, b]) == [2, 3, 4]


def test_spilled_keys_give_the_same_duplicates_as_the_set(tmp_path: Path) -> None:
    keys = keys_with_copies(6000, distinct=2500)
    # A tiny budget: 7 partitions, each flushed to its file many times (4 KiB buffers).
    spilled = SpilledKeys(tmp_path, partitions=7, memory_bytes=1000)
    for key in keys:
        spilled.add(key)
    assert spilled.count == len(keys)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == [f"keys-{p:05d}.bin" for p in range(7)]  # every partition got keys
    written = [path.stat().st_size for path in tmp_path.iterdir()]
    assert max(written) > MIN_BUFFER_BYTES  # flushed more than once
    assert len(keys) * RECORD.itemsize - sum(written) < 7 * MIN_BUFFER_BYTES  # the rest buffered

    expected = in_memory_duplicates(keys)
    assert len(expected) == len(keys) - len(set(keys)) > 3000
    assert list(spilled.duplicates()) == expected
    # The keys are read back and gone; what is left is each partition's later copies.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"duplicates-{p:05d}.bin" for p in range(7)]


def test_spilled_keys_with_no_copies_and_with_one_partition(tmp_path: Path) -> None:
    distinct = [dedup_key(str(i)) for i in range(50)]
    for partitions, keys in ((3, distinct), (1, distinct + distinct[::-1])):
        folder = tmp_path / str(partitions)
        folder.mkdir()
        spilled = SpilledKeys(folder, partitions, memory_bytes=MB)
        for key in keys:
            spilled.add(key)
        assert list(spilled.duplicates()) == in_memory_duplicates(keys)


def test_a_key_of_another_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes, got 3"):
        SpilledKeys(tmp_path, 2, MB).add(b"abc")


def test_the_scratch_folder_is_a_temporary_the_sweep_knows_and_is_deleted(tmp_path: Path
                                                                           ) -> None:
    path = scratch_path(tmp_path / "data" / "clean")
    assert path == tmp_path / "data" / f".clean-dedup.tmp-{os.getpid()}"
    with pytest.raises(RuntimeError), scratch_folder(path) as folder:
        (folder / "keys-00000.bin").write_bytes(b"x")
        raise RuntimeError("a failure mid-run")
    assert not path.exists()


# ------------------------------------------------------------------- the clean stage


def raw_corpus(directory: Path, distinct: int, copies: int) -> Path:
    """A raw table of ``distinct * copies`` documents and some short ones, in a shuffled
    order: each text repeated, some copies spelled differently but equal once cleaned
    (extra spaces, a zero-width space, a Windows line end)."""
    rng = random.Random(5)
    base = synthetic_documents(distinct, seed=11, sentences=1)
    variants = [lambda t: t, lambda t: t.replace(" ", "  "), lambda t: "\u200b" + t,
                lambda t: t + " \r\n"]
    texts = [rng.choice(variants)(text) for text in base for _ in range(copies)]
    texts += ["short"] * 50
    rng.shuffle(texts)
    directory.mkdir(parents=True)
    with DocumentWriter(directory, RAW_SCHEMA) as writer:
        for index, text in enumerate(texts):
            writer.append(id=index, source=f"doc{index}.txt", text=text, invalid_bytes=0)
    return directory


@pytest.mark.parametrize("near_dup", [0.0, 0.8])
def test_clean_keeps_the_same_documents_when_its_keys_spill(tmp_path: Path, near_dup: float,
                                                            capsys) -> None:
    # 9,050 documents: more than the 8,192 keys that 1 MiB holds, so the keys spill.
    raw = raw_corpus(tmp_path / "raw", distinct=3000, copies=3)
    outputs = {}
    for name, memory in (("memory", 256), ("spilled", 1)):
        params = parse_params({"clean": {"min_bytes": 10, "workers": 1, "dedup_memory_mb": memory,
                                         "near_dup_threshold": near_dup}})
        metrics = run(params, input=raw, out=tmp_path / name / "clean",
                      metrics=tmp_path / name / "clean.json")
        outputs[name] = sha256_file(tmp_path / name / "clean" / PART_NAME), metrics
        assert sorted(path.name for path in (tmp_path / name).iterdir()) == [
            "clean", "clean.json"]  # the spill folder is gone
    assert "spilling them to 2 partitions" in capsys.readouterr().out
    assert outputs["memory"] == outputs["spilled"]
    metrics = outputs["spilled"][1]
    assert metrics["dropped_too_short"] == 50
    assert metrics["dropped_exact_duplicate"] == 6000
    kept = pq.read_table(tmp_path / "spilled" / "clean" / PART_NAME).column("id").to_pylist()
    assert kept == sorted(kept)  # document order


def test_a_killed_spilling_clean_leaves_a_temporary_the_next_run_deletes(tmp_path: Path
                                                                           ) -> None:
    work = tmp_path / "work"
    raw_corpus(work / "data" / "raw", distinct=6000, copies=2)
    shutil.copy(REPO_ROOT / "dvc.yaml", work / "dvc.yaml")  # the sweep reads its outputs
    (work / "params.yaml").write_text(
        "clean:\n  dedup_memory_mb: 1\n  workers: 1\n  min_bytes: 10\n")
    command = [str(BIN / "gptpipe"), "clean", "--params", "params.yaml", "--input", "data/raw",
               "--out", "data/clean", "--metrics", "metrics/clean.json"]
    first = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    scratch = work / "data" / f".clean-dedup.tmp-{first.pid}"
    deadline = time.monotonic() + 60
    while not scratch.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert scratch.exists(), "the run ended before its spill folder could be seen"

    second = subprocess.run(command, cwd=work, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert sorted(path.name for path in (work / "data").iterdir()) == ["clean", "raw"]
    metrics = json.loads((work / "metrics" / "clean.json").read_text())
    assert metrics["documents_out"] == 6000
