"""The resumable-run component: fingerprints, the run folder's decisions, deleting only
what gptpipe wrote, stop signals; and the output guards beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.live import clear_live
from pipeline.core.parallel import ordered_map
from pipeline.core.runs import RunFolder, StopSignals, run_fingerprint


def _snapshot(folder: RunFolder, step: int) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    folder.save(model, optimizer, {"torch": torch.get_rng_state()}, {"step": step})


def test_the_fingerprint_covers_params_every_input_byte_and_nothing_else(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "tok.json").write_text("{}")
    inputs = {"data": data, "tokenizer": tmp_path / "tok.json"}
    base = run_fingerprint({"lr": 1.0}, inputs)
    assert run_fingerprint({"lr": 1.0}, inputs) == base
    assert run_fingerprint({"lr": 2.0}, inputs) != base
    (data / "sub" / "a.bin").write_bytes(b"abd")  # same length, other bytes
    edited = run_fingerprint({"lr": 1.0}, inputs)
    assert edited != base
    # Where the inputs live does not matter: a copy elsewhere has the same fingerprint.
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    (elsewhere / "data" / "sub").mkdir(parents=True)
    (elsewhere / "data" / "sub" / "a.bin").write_bytes(b"abd")
    (elsewhere / "tok.json").write_text("{}")
    moved = {"data": elsewhere / "data", "tokenizer": elsewhere / "tok.json"}
    assert run_fingerprint({"lr": 1.0}, moved) == edited
    with pytest.raises(GptpipeError, match="the run's input 'data' must exist"):
        run_fingerprint({}, {"data": tmp_path / "absent"})


def test_resume_reuse_or_afresh_each_with_its_reason(tmp_path, capsys):
    folder = RunFolder("stage", tmp_path / "run", "fp", total_steps=10, finished="fp-all")
    assert folder.start() is None  # nothing there: afresh, silently
    assert capsys.readouterr().out == ""
    _snapshot(folder, 4)
    assert folder.start()["step"] == 4
    assert "stage: resuming from step 4 of 10" in capsys.readouterr().out
    _snapshot(folder, 10)
    assert folder.start()["step"] == 10
    assert "finished at step 10: writing its outputs" in capsys.readouterr().out
    other_cadence = RunFolder("stage", tmp_path / "run", "fp", total_steps=10, finished="x")
    assert other_cadence.start() is None
    assert "another eval, log or snapshot cadence: starting afresh" in capsys.readouterr().out
    _snapshot(folder, 4)
    assert folder.start(check=lambda info: "no best weights") is None
    assert "stage: no best weights: starting afresh" in capsys.readouterr().out
    _snapshot(folder, 4)
    other = RunFolder("stage", tmp_path / "run", "other", total_steps=10)
    assert other.start() is None
    assert "a snapshot of a different run" in capsys.readouterr().out
    assert not (tmp_path / "run" / "snapshot").exists()


def test_an_unreadable_snapshot_starts_afresh(tmp_path, capsys):
    folder = RunFolder("stage", tmp_path / "run", "fp", total_steps=10)
    _snapshot(folder, 4)
    (tmp_path / "run" / "snapshot" / "state.json").write_text("{cut sho")
    assert folder.start() is None
    assert "unreadable snapshot: starting afresh" in capsys.readouterr().out


def test_starting_afresh_deletes_only_what_gptpipe_wrote(tmp_path):
    """--checkpoint pointed at a parent folder, or at a folder holding a user's files:
    only the run's own snapshot/ and best/ go, everything else stays."""
    parent = tmp_path / "checkpoints"
    for name in ("pretrain", "rlhf"):
        _snapshot(RunFolder(name, parent / name, "fp", 10), 3)
    (parent / "notes.txt").write_text("mine")
    RunFolder("pretrain", parent, "fp", 10).start()
    assert (parent / "notes.txt").read_text() == "mine"
    for name in ("pretrain", "rlhf"):
        assert (parent / name / "snapshot" / "state.json").is_file()
    own = parent / "pretrain"
    (own / "best").mkdir()
    (own / "user.txt").write_text("mine too")
    RunFolder("pretrain", own, "another run", 10).start()
    assert sorted(p.name for p in own.iterdir()) == ["user.txt"]


def test_the_working_tree_survives_a_checkpoint_folder_of_dot(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "params.yaml").write_text("train: {}\n")
    monkeypatch.chdir(tmp_path)
    folder = RunFolder("pretrain", Path("."), "fp", 10)
    assert folder.start() is None
    _snapshot(folder, 2)
    RunFolder("pretrain", Path("."), "another", 10).start()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "params.yaml"]


def test_clearing_a_live_folder_keeps_a_users_files(tmp_path):
    live = tmp_path / "live"
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    (live / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n")
    (live / "plots" / "metrics" / "lr.tsv").write_text("step\tlr\n")
    (live / "metrics.json").write_text("{}")
    (live / "README.md").write_text("mine")
    clear_live(live)
    assert sorted(p.name for p in live.iterdir()) == ["README.md"]
    clear_live(tmp_path / "absent")  # nothing there: nothing to do


@pytest.mark.parametrize("where", ["cwd", "parent", "repo"])
def test_an_output_never_replaces_the_working_tree_or_a_repository(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub" if where == "parent" else work)
    target = {"cwd": Path("."), "parent": Path(".."), "repo": tmp_path / "repo"}[where]
    if where == "repo":
        (target / ".git").mkdir(parents=True)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(GptpipeError, match="refusing to replace"), atomic_dir(target) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == before


def test_stop_signals_ask_to_stop_once_then_abort():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal: abort at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_sigterm_ends_the_process():
    code = textwrap.dedent("""
        import os, signal, time
        from pipeline.core.runs import StopSignals
        with StopSignals() as s:
            os.kill(os.getpid(), signal.SIGTERM)
            print(s.requested, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "SIGTERM\n"
    assert result.returncode == -signal.SIGTERM


def _square(x: int) -> int:
    return x * x


def _die(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return x


def test_ordered_map_keeps_the_order_with_several_workers():
    items = ((i, i) for i in range(20))
    assert list(ordered_map(_square, items, workers=2)) == [(i, i * i) for i in range(20)]


def test_a_worker_that_dies_is_one_line_not_a_hang():
    with pytest.raises(GptpipeError, match="clean: a worker process died"):
        list(ordered_map(_die, ((i, i) for i in range(8)), workers=2, what="clean"))
