"""Faults under `dvc repro`: a stage killed mid-write, a full disk, a killed pretraining.

Each output is written under a temporary sibling and renamed into place when complete
(pipeline/core/io.py), so whatever moment a kill lands, an output is either absent or a
complete version, `dvc repro` afterwards finishes the job, and DVC's cache never holds a
corrupt object. The kills hit the whole process group (dvc and the stage under it), as
`kill -9` of a terminal's job would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, REPO_ROOT, make_dvc_repo, run_cmd, synthetic_documents
from test_pipeline_dvc import TINY

from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.io import find_temporaries

pytestmark = pytest.mark.slow

DATA_STAGES = ("ingest", "clean", "split", "vocab", "tokenize")
DATA_OUTS = ("data/raw", "data/clean", "data/split", "data/vocab/tokenizer.json", "data/tokens")
# Long enough to kill pretraining between its snapshots (about 3 s of training on 2 cores).
FAULT_PARAMS = {**TINY, "train.steps": 60, "train.checkpoint_every": 10, "train.eval_every": 10}
UP_TO_DATE = "Data and pipelines are up to date."


# ------------------------------------------------------------------------------ helpers


def _write_corpus(corpus: Path, count: int = 240) -> None:
    """The tiny_corpus fixture's documents (module-scoped fixtures cannot use it)."""
    corpus.mkdir(parents=True)
    for index, text in enumerate(synthetic_documents(count)):
        (corpus / f"doc{index:04d}.txt").write_text(text + "\n", encoding="utf-8")


def _clone(repo: Path, dest: Path) -> Path:
    """A copy of a repository with its workspace, dvc.lock and cache: a second run's base."""
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def _start(args: list[str], repo: Path, log: Path) -> subprocess.Popen:
    """``args`` in their own process group, stdout and stderr to ``log``."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as handle:
        return subprocess.Popen(args, cwd=repo, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL dvc and every process under it at once; return when none of them runs."""
    try:
        members = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        members = []
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    for member in members:
        while time.monotonic() < deadline:
            try:
                if member.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.005)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str,
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _digest(path: Path) -> str | None:
    """A hash of a file's or a folder's names and bytes; None when the path is absent."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _assert_readable(repo: Path) -> None:
    """Every data output that exists reads cleanly: tables, tokenizer, meta.json and shards."""
    for table_dir in ("data/raw", "data/clean", "data/split"):
        for part in sorted((repo / table_dir).rglob("*.parquet")):
            pq.read_table(part)
    tokenizer = repo / "data/vocab/tokenizer.json"
    if tokenizer.exists():
        json.loads(tokenizer.read_text(encoding="utf-8"))
    tokens = repo / "data/tokens"
    if tokens.exists():
        meta = json.loads((tokens / "meta.json").read_text())
        for split, counts in meta["splits"].items():
            shards = sorted((tokens / split).glob("shard-*.parquet"))
            assert len(shards) == counts["shards"]
            assert sum(len(pq.read_table(s)) for s in shards) == counts["tokens"]
    for metrics in (repo / "metrics").glob("*.json"):
        json.loads(metrics.read_text())


def _lock_outs(repo: Path, stages) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages for out in lock[stage]["outs"]}


def _assert_cache_sound(repo: Path) -> None:
    """No corrupt object in DVC's cache, and every cached output of dvc.lock is there.

    This DVC has no ``dvc fsck``: each object under .dvc/cache/files/md5/xx/yyyy is
    re-hashed instead (its name is the md5 of its bytes; a ``.dir`` object is the JSON
    listing of a folder, and its name is the md5 of that listing).
    """
    cache = repo / ".dvc/cache/files/md5"
    objects = [p for p in cache.rglob("*") if p.is_file()]
    assert objects
    for obj in objects:
        name = (obj.parent.name + obj.name).removesuffix(".dir")
        assert hashlib.md5(obj.read_bytes()).hexdigest() == name, f"corrupt cache object {obj}"
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, entry in lock.items():
        declared = [o for kind in ("outs", "metrics", "plots")
                    for o in dvc_yaml[stage].get(kind, []) if isinstance(o, dict)]
        uncached = {path for o in declared for path, opts in o.items()
                    if not (opts or {}).get("cache", True)}
        for out in entry.get("outs", []):
            if out["path"] in uncached:
                continue
            md5 = out["md5"]
            obj = cache / md5[:2] / md5[2:]
            assert obj.is_file(), f"{out['path']}: {md5} is not in the cache"
            if md5.endswith(".dir"):
                for item in json.loads(obj.read_text()):
                    assert (cache / item["md5"][:2] / item["md5"][2:]).is_file(), item


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory) -> Path:
    """A DVC repository (FAULT_PARAMS) whose data stages ran; copied by each test."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("faults") / "base", FAULT_PARAMS)
    _write_corpus(repo / "corpus")
    run_cmd(["dvc", "repro", "tokenize"], repo)
    return repo


# ----------------------------------------------- a: a data stage killed in the middle


def test_data_stages_killed_mid_write_leave_old_or_new_outputs_and_recover(
    data_repo, tmp_path
):
    repo = _clone(data_repo, tmp_path / "killed")
    before = {out: _digest(repo / out) for out in DATA_OUTS}
    # A corpus change re-runs every data stage.
    (repo / "corpus/doc0000.txt").write_text("A brand new first document about rivers.\n")
    (repo / "corpus/doc9999.txt").write_text("One more document, added after the first run.\n")
    reference = _clone(repo, tmp_path / "reference")
    run_cmd(["dvc", "repro", "tokenize"], reference)  # the uninterrupted run
    after = {out: _digest(reference / out) for out in DATA_OUTS}
    assert all(before[out] != after[out] for out in ("data/raw", "data/clean"))

    log = tmp_path / "repro.log"
    rng = random.Random(20261126)

    def check_after_kill() -> list[str]:
        for out in DATA_OUTS:  # absent, the previous complete version, or the new one
            assert _digest(repo / out) in {None, before[out], after[out]}, out
        _assert_readable(repo)
        return find_temporaries(repo)

    # Kills at seeded random moments after the first stage started.
    for _ in range(3):
        process = _start(["dvc", "repro", "tokenize"], repo, log)
        _wait_for(lambda: "Running stage" in log.read_text(), process, "a stage started")
        time.sleep(rng.uniform(0.0, 0.8))
        assert process.poll() is None, "the run ended before the kill"
        _kill_group(process)
        check_after_kill()
    # And one kill the moment tokenize's temporary folder appears: mid-write for sure.
    process = _start(["dvc", "repro", "tokenize"], repo, log)
    _wait_for(lambda: any((repo / "data").glob(".tokens.tmp-*")), process, "tokenize writes")
    _kill_group(process)
    assert not (repo / "data/tokens").exists()  # DVC removed it; the stage never renamed
    left = check_after_kill()
    assert any(t.startswith("data/.tokens.tmp-") for t in left), left

    result = run_cmd(["dvc", "repro", "tokenize"], repo)
    assert "Running stage 'tokenize'" in result.stdout
    assert find_temporaries(repo) == []  # the re-run removed what the kills left
    assert UP_TO_DATE in run_cmd(["dvc", "status", "--with-deps", "tokenize"], repo).stdout
    assert _lock_outs(repo, DATA_STAGES) == _lock_outs(reference, DATA_STAGES)
    assert {out: _digest(repo / out) for out in DATA_OUTS} == after
    _assert_cache_sound(repo)


def test_a_kill_of_a_forced_rerun_is_restored_from_the_run_cache(data_repo, tmp_path):
    """A forced re-run killed mid-write: DVC restores the outputs from its run cache.

    The stage does not run again then, so its own clean-up never sees the temporary folder
    the kill left; the next stage that starts (any stage) sweeps it, since every stage
    start removes the temporaries of dead writers beside all declared outputs.
    """
    repo = _clone(data_repo, tmp_path / "killed")
    before = _lock_outs(repo, DATA_STAGES)
    log = tmp_path / "repro.log"
    process = _start(["dvc", "repro", "-s", "-f", "tokenize"], repo, log)
    _wait_for(lambda: any((repo / "data").glob(".tokens.tmp-*")), process, "tokenize writes")
    _kill_group(process)
    assert not (repo / "data/tokens").exists()

    result = run_cmd(["dvc", "repro", "tokenize"], repo)
    assert "Stage 'tokenize' is cached - skipping run, checking out outputs" in result.stdout
    assert UP_TO_DATE in run_cmd(["dvc", "status", "--with-deps", "tokenize"], repo).stdout
    assert _lock_outs(repo, DATA_STAGES) == before
    _assert_readable(repo)
    _assert_cache_sound(repo)
    left = find_temporaries(repo)
    assert any(t.startswith("data/.tokens.tmp-") for t in left), left

    result = run_cmd(["dvc", "repro", "-s", "-f", "split"], repo)  # the next stage run
    assert "Running stage 'split'" in result.stdout
    assert find_temporaries(repo) == []
    assert _lock_outs(repo, DATA_STAGES) == before


def test_a_dvc_lock_cut_by_a_kill_is_recovered_from_the_run_cache(data_repo, tmp_path):
    """DVC rewrites dvc.lock in place: a kill between its truncate and its write leaves it
    empty (seen once in bench/kill_loop.py). `dvc repro` then refuses to start; the
    remedy of docs/reproducibility.md, removing the file, restores every stage from the
    run cache."""
    repo = _clone(data_repo, tmp_path / "cut")
    before = _lock_outs(repo, DATA_STAGES)
    (repo / "dvc.lock").write_text("")
    refused = run_cmd(["dvc", "repro", "tokenize"], repo, check=False)
    assert refused.returncode != 0
    assert "dvc.lock' validation failed" in refused.stdout + refused.stderr
    (repo / "dvc.lock").unlink()
    result = run_cmd(["dvc", "repro", "tokenize"], repo)
    assert "Running stage" not in result.stdout  # every stage restored, none re-run
    assert _lock_outs(repo, DATA_STAGES) == before
    assert UP_TO_DATE in run_cmd(["dvc", "status", "--with-deps", "tokenize"], repo).stdout


# ------------------------------------------------------------------- b: a full disk

_ENOSPC_MESSAGE = "Error writing bytes to file. Detail: [errno 28] No space left on device"


def _enospc(*_args, **_kwargs):
    # What pyarrow and Python raise when the disk fills (checked on a full tmpfs).
    raise OSError(errno.ENOSPC, _ENOSPC_MESSAGE)


def _fail_after(calls: int, real: Callable) -> Callable:
    """``real`` for the first ``calls`` calls, then ENOSPC: the disk fills mid-output."""
    count = [0]

    def write(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            _enospc()
        return real(*args, **kwargs)

    return write


_STAGE_ARGS = {  # as in dvc.yaml, relative to the fixture's folder
    "ingest": ["ingest", "--out", "raw", "--metrics", "m/ingest.json"],
    "clean": ["clean", "--input", "raw", "--out", "clean", "--metrics", "m/clean.json"],
    "split": ["split", "--input", "clean", "--out", "split", "--metrics", "m/split.json"],
    "vocab": ["vocab", "--input", "split", "--out", "vocab/tokenizer.json",
              "--metrics", "m/vocab.json"],
    "tokenize": ["tokenize", "--input", "split", "--tokenizer", "vocab/tokenizer.json",
                 "--out", "tokens", "--metrics", "m/tokenize.json"],
}


def _args(root: Path, args: list[str]) -> list[str]:
    paths = [str(root / a) if not a.startswith("-") and i else a for i, a in enumerate(args)]
    return [paths[0], "--params", str(root / "params.yaml"), *paths[1:]]


_real_write_bytes = Path.write_bytes


def _half_then_enospc(self: Path, data: bytes) -> int:
    _real_write_bytes(self, data[: len(data) // 2])
    _enospc()
    return 0


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def test_a_full_disk_while_saving_weights_is_one_clear_line(tmp_path, monkeypatch):
    import pipeline.lm.checkpoint as checkpoint
    from pipeline.lm.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=16, context=8, n_layer=1, n_head=1, n_embd=8)
    model = GPT(config)
    target = tmp_path / "best"
    checkpoint.save_model(target, model, config, {})
    before = _digest(target)

    def full_disk(*_args, **_kwargs):
        # The exception and message safetensors gives on a full tmpfs (os error 28).
        raise _safetensors_error()(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    try:
        with pytest.raises(GptpipeError, match="no space left on the device"):
            checkpoint.save_model(target, model, config, {})
    finally:
        assert _digest(target) == before  # holds today: only the message is wrong
        assert list(tmp_path.glob(".best.tmp-*")) == []


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory) -> Path:
    """The data stages' outputs, made in-process with FAULT_PARAMS (tiny corpus)."""
    root = tmp_path_factory.mktemp("enospc")
    _write_corpus(root / "corpus")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in FAULT_PARAMS.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    params["data"]["corpus"] = str(root / "corpus")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in _STAGE_ARGS.values():
        result = CliRunner().invoke(cli, _args(root, args))
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize(
    ("stage", "target", "patch"),
    [
        # pyarrow's ParquetWriter fails while writing the document table (atomic_dir).
        ("ingest", "raw", lambda mp: mp.setattr(pq.ParquetWriter, "write_table", _enospc)),
        # The third token shard fails: two shards were already written (atomic_dir).
        ("tokenize", "tokens",
         lambda mp: mp.setattr(pq, "write_table", _fail_after(2, pq.write_table))),
        # The tokenizer JSON fails half-way through its write (atomic_path).
        ("vocab", "vocab/tokenizer.json",
         lambda mp: mp.setattr(Path, "write_bytes", _half_then_enospc)),
        # Delayed allocation: the write succeeded, fsync reports the full disk (atomic_path).
        ("vocab", "vocab/tokenizer.json",
         lambda mp: mp.setattr(os, "fsync", _enospc)),
    ],
    ids=["ingest-parquet", "tokenize-shards", "vocab-write", "vocab-fsync"],
)
def test_a_full_disk_is_one_clear_line_and_keeps_the_previous_output(
    stage_dir, monkeypatch, stage, target, patch
):
    target_path = stage_dir / target
    before = _digest(target_path)
    assert before is not None
    with monkeypatch.context() as mp:
        patch(mp)
        result = CliRunner().invoke(cli, _args(stage_dir, _STAGE_ARGS[stage]))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"Error: {target_path}: no space left on the device while writing; "
                        "nothing was replaced")
    assert "Traceback" not in result.output
    assert _digest(target_path) == before  # the previous output, byte for byte
    assert list(target_path.parent.glob(f".{target_path.name}.tmp-*")) == []


# -------------------------------------------- c: pretraining killed under dvc repro


def test_pretrain_killed_under_dvc_repro_resumes_and_matches_an_uninterrupted_run(
    data_repo, tmp_path
):
    reference = _clone(data_repo, tmp_path / "reference")
    repo = _clone(data_repo, tmp_path / "killed")
    log = tmp_path / "repro.log"
    state = repo / "checkpoints/pretrain/snapshot/state.json"
    process = _start(["dvc", "repro", "pretrain"], repo, log)
    _wait_for(state.is_file, process, "the first snapshot")
    _kill_group(process)
    step = json.loads(state.read_text())["step"]
    assert 10 <= step < 60, log.read_text()
    assert not (repo / "models/pretrain").exists()
    assert not (repo / "metrics/pretrain.json").exists()

    resumed = run_cmd(["dvc", "repro", "pretrain"], repo).stdout
    assert f"resuming from step {step} of 60" in resumed
    assert find_temporaries(repo) == []
    assert UP_TO_DATE in run_cmd(["dvc", "status", "--with-deps", "pretrain"], repo).stdout

    straight = run_cmd(["dvc", "repro", "pretrain"], reference).stdout
    assert "resuming" not in straight
    metrics = (repo / "metrics/pretrain.json").read_text()
    assert metrics == (reference / "metrics/pretrain.json").read_text()
    assert json.loads(metrics)["steps"] == 60
    ours, theirs = _lock_outs(repo, ["pretrain"]), _lock_outs(reference, ["pretrain"])
    assert ours["models/pretrain"] == theirs["models/pretrain"]  # the same weights
    _assert_cache_sound(repo)


def test_a_forced_rerun_writes_a_finished_run_out_here_and_trains_it_again_elsewhere(
        data_repo, tmp_path):
    """`dvc repro -f pretrain` runs the stage again. Where the run folder holds this very
    run finished on this machine and software, training again would compute the same bits,
    so the outputs are written from it in seconds; a machine that picks other kernels (here
    torch told to use no vector instructions) trains it again rather than pass another
    machine's result off as its own. The kernel pin is lifted for that run, so that torch
    takes the setting."""
    repo = _clone(data_repo, tmp_path / "repo")
    run_cmd(["dvc", "repro", "pretrain"], repo)
    before = _lock_outs(repo, ["pretrain"])
    forced = run_cmd(["dvc", "repro", "-f", "-s", "pretrain"], repo).stdout
    assert "the checkpoint folder holds this run, finished at step 60: writing its outputs" in (
        forced)
    after = _lock_outs(repo, ["pretrain"])
    del before["metrics/pretrain_speed.json"], after["metrics/pretrain_speed.json"]  # times
    assert after == before
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "GPTPIPE_KERNELS": "native", "ATEN_CPU_CAPABILITY": "default"}
    elsewhere = subprocess.run(["dvc", "repro", "-f", "-s", "pretrain"], cwd=repo, env=env,
                               capture_output=True, text=True)
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr
    assert ("the checkpoint folder holds this run, finished at step 60 on another machine or "
            "software (") in elsewhere.stdout
    assert "training it again" in elsewhere.stdout
    live = (repo / "dvclive/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [int(row.split("\t")[0]) for row in live[1:]] == list(range(1, 61))
