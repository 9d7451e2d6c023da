"""gptpipe compare's arithmetic on runs written by hand: paired and unpaired differences,
verdicts, and what it refuses (real files in folders read as workspaces)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.compare.command import compare_pair
from pipeline.compare.differences import Units, pairable, paired_interval
from pipeline.compare.sources import RunSource
from pipeline.compare.tables import Spread, spreads
from pipeline.core.errors import GptpipeError
from pipeline.core.item_scores import write_item_scores

FINGERPRINT = {"fingerprint.corpus": "c0ffee", "fingerprint.split": "seed 1, 0.8/0.1/0.1",
               "fingerprint.tokenizer": "70ken"}


def write_run(root: Path, nats: np.ndarray, bytes_: np.ndarray, se: float = 0.01,
              **fingerprint: str) -> RunSource:
    """A run whose test split's documents hold ``nats`` over ``bytes_`` (its metrics
    computed from them, as evaluate does), read like a workspace."""
    root.mkdir(parents=True, exist_ok=True)
    count = len(nats)
    tokens = np.full(count, 10)
    write_item_scores(root / "evaluation/documents.parquet", "documents", {
        "split": ["test"] * count, "document": list(range(count)),
        "id": list(range(count)), "text_sha256": [f"doc{i:04d}" for i in range(count)],
        "source": ["s"] * count, "tokens": tokens, "bytes": bytes_, "nats": nats,
        "correct": np.zeros(count, np.int64)})
    metrics = {"test.bpb": float(nats.sum() / bytes_.sum() / math.log(2)),
               "test.bpb_se": se, "test.loss": float(nats.sum() / tokens.sum()),
               "test.loss_se": se, **FINGERPRINT, **fingerprint}
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/evaluate.json").write_text(json.dumps(metrics))
    return RunSource(root.name, root.name, root)


def documents(seed: int = 0, count: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Documents of very different difficulty: per-document bits per byte from 1 to 3."""
    rng = np.random.default_rng(seed)
    bytes_ = rng.integers(100, 2000, count).astype(np.float64)
    return bytes_ * rng.uniform(1, 3, count) * math.log(2), bytes_


def by_name(differences) -> dict:
    return {d.headline.name: d for d in differences}


def test_a_run_against_itself_differs_by_exactly_zero(tmp_path):
    nats, bytes_ = documents()
    run = write_run(tmp_path / "a", nats, bytes_)
    differences, notes = compare_pair(run, run, [])
    found = by_name(differences)["evaluate.test.bpb"]
    assert found.difference == 0.0 and found.interval == (0.0, 0.0)
    assert found.verdict == "within noise" and found.how == "paired, 200 documents"
    assert notes == []


def test_a_planted_difference_beyond_the_noise_is_better_or_worse(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_)
    # 2% fewer nats on every document: tiny beside the spread between documents (their
    # bits per byte run from 1 to 3), far beyond it once paired.
    new = write_run(tmp_path / "new", nats * 0.98, bytes_)
    found = by_name(compare_pair(old, new, [])[0])["evaluate.test.bpb"]
    assert found.difference < 0 and found.interval[1] < 0
    assert found.verdict == "better" and found.how.startswith("paired")
    assert by_name(compare_pair(new, old, [])[0])["evaluate.test.bpb"].verdict == "worse"


def test_a_difference_inside_the_noise_is_within_noise(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_)
    # Each document moved up or down by 20%, the moves cancelling on average.
    rng = np.random.default_rng(5)
    new = write_run(tmp_path / "new", nats * rng.choice([0.8, 1.2], len(nats)), bytes_)
    found = by_name(compare_pair(old, new, [])[0])["evaluate.test.bpb"]
    assert found.interval[0] < 0 < found.interval[1]
    assert found.verdict == "within noise"


def test_paired_is_tighter_than_unpaired(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_, se=0.05)
    new = write_run(tmp_path / "new", nats * 0.98, bytes_, se=0.05)
    paired = by_name(compare_pair(old, new, [])[0])["evaluate.test.bpb"]
    (new.root / "evaluation/documents.parquet").unlink()  # no per-item table: unpaired
    new = RunSource("new", "new", new.root)
    unpaired = by_name(compare_pair(old, new, [])[0])["evaluate.test.bpb"]
    assert unpaired.how == "unpaired (no per-item table)"
    # 1.96 * sqrt(0.05^2 + 0.05^2) on each side.
    width = unpaired.interval[1] - unpaired.interval[0]
    assert width == pytest.approx(2 * 1.959964 * math.hypot(0.05, 0.05), rel=1e-6)
    assert unpaired.verdict == "within noise"
    assert paired.interval[1] - paired.interval[0] < width / 10


def test_other_test_splits_are_compared_unpaired_and_said_so(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_)
    new = write_run(tmp_path / "new", nats, bytes_, **{"fingerprint.split": "seed 2, ..."})
    differences, notes = compare_pair(old, new, [])
    assert by_name(differences)["evaluate.test.bpb"].how == "unpaired (the test splits differ)"
    assert len(notes) == 1 and "test splits differ" in notes[0]


def test_other_tokenizers_leave_out_per_token_figures(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_)
    new = write_run(tmp_path / "new", nats, bytes_, **{"fingerprint.tokenizer": "other"})
    differences, notes = compare_pair(old, new, [])
    assert set(by_name(differences)) == {"evaluate.test.bpb"}
    assert any("tokenizers differ" in note for note in notes)


def test_units_pair_only_when_they_are_the_same_ones():
    def units(keys: list[str]) -> Units:
        return Units(np.array(keys), np.ones(len(keys)), np.ones(len(keys)))

    many = [f"k{i}" for i in range(40)]
    assert pairable(units(many), units(many[::-1])) is None  # order does not matter
    assert pairable(units(many), units([*many[:-1], "other"])) == "different units"
    assert pairable(units(many), None) == "no per-item table"
    assert pairable(units(many[:5]), units(many[:5])) == "5 units, too few to pair"
    assert pairable(units([*many, "k0"]), units([*many, "k0"])) == "units not named uniquely"


def test_paired_interval_aligns_units_by_key():
    keys = np.array([f"doc{i:02d}" for i in range(60)])
    old = Units(keys, np.arange(60.0) ** 2, np.arange(1.0, 61.0))
    order = np.arange(60)[::-1]  # the same units, listed the other way round
    assert paired_interval(old, Units(keys[order], old.numerator[order],
                                      old.denominator[order]), 1.0) == (0.0, 0.0)
    shifted = Units(keys, old.numerator + old.denominator, old.denominator)  # +1 each
    assert paired_interval(old, shifted, 2.0) == pytest.approx((2.0, 2.0))


def test_a_run_without_metrics_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    nats, bytes_ = documents()
    run = write_run(tmp_path / "a", nats, bytes_)
    with pytest.raises(GptpipeError, match="empty has no metrics"):
        compare_pair(RunSource("empty", "empty", empty), run, [])
    with pytest.raises(GptpipeError, match=r"--fail-on rlhf\.win_rate: a has no win_rate"):
        compare_pair(run, run, ["rlhf.win_rate"])
    with pytest.raises(GptpipeError, match="no such headline metric"):
        compare_pair(run, run, ["test.bpb"])


def test_replicate_spread_by_hand():
    runs = [{"metrics/evaluate.json": {"test.bpb": value, "test.bpb_se": se}}
            for value, se in ((1.0, 0.1), (1.2, 0.3), (1.4, 0.2))]
    (found,) = [s for s in spreads(runs) if s.headline.name == "evaluate.test.bpb"]
    assert found.mean == pytest.approx(1.2)
    assert found.sd == pytest.approx(0.2)  # sample sd of 1.0, 1.2, 1.4
    assert found.mean_within == pytest.approx(0.2)
    assert found.ratio == pytest.approx(1.0)
    # A proportion's within-run error is its Wilson interval's half-width over 1.96.
    proportion = Spread(found.headline, [0.5, 0.6], [])
    assert proportion.mean_within is None and proportion.ratio is None


def test_runs_computed_by_other_kernels_are_said_so_with_the_measured_drift(tmp_path):
    nats, bytes_ = documents()
    old = write_run(tmp_path / "old", nats, bytes_)
    new = write_run(tmp_path / "new", nats, bytes_)
    cpu = "cpu on x86_64, AVX2 kernels, float32, torch 2.13.0+cpu"
    for root, kernels in ((old.root, cpu), (new.root, cpu)):
        (root / "metrics/pretrain_speed.json").write_text(json.dumps({"kernels": kernels}))
    assert compare_pair(old, new, [])[1] == []  # the same kernels: nothing to say
    gpu = "NVIDIA H100 80GB HBM3 on x86_64, AVX2 kernels, bfloat16, torch 2.13.0"
    (new.root / "metrics/pretrain_speed.json").write_text(json.dumps({"kernels": gpu}))
    new = RunSource("new", "new", new.root)  # a source reads each file once
    (note,) = compare_pair(old, new, [])[1]
    assert f"({cpu} there, {gpu} here)" in note and "0.0012 in val bits per byte" in note


def test_a_runs_kernels_name_what_decides_its_bits():
    from pipeline.core.machine import describe_machine, kernels_summary

    found = kernels_summary(describe_machine("cpu"))
    assert found.startswith("cpu on ") and " kernels, float32, torch " in found
    assert kernels_summary({"device": "cuda", "gpu": "NVIDIA H100", "machine": "x86_64",
                            "cpu_capability": "AVX512", "precision": "bfloat16",
                            "torch": "2.13.0"}) == (
        "NVIDIA H100 on x86_64, AVX512 kernels, bfloat16, torch 2.13.0")
