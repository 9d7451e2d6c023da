"""The resumable-run component: run ids, the run folder's decisions (resume, reuse, set
aside, afresh), its layout, snapshots that are never non-finite, best weights, stop
signals; and the output guards beside it."""

from __future__ import annotations

import json
import math
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
from pipeline.core.run_id import describe_changes
from pipeline.core.runs import NonFiniteWeights, Run, RunId, StopSignals, run_fingerprint
from pipeline.lm.checkpoint import save_model

MACHINE = {"cpu": "a CPU", "torch": "2.13.0", "precision": "float32"}
RNG = torch.Generator().manual_seed(7).get_state()


def _run_id(lr: float = 0.1, steps: int = 10, tokens: str = "aa") -> RunId:
    return RunId({"train": {"lr": lr, "steps": steps}}, {"tokens": tokens}, "code")


def _run(path: Path, run_id: RunId | None = None, total: int = 10, **kwargs) -> Run:
    kwargs.setdefault("machine", MACHINE)
    return Run("stage", path, run_id or _run_id(), total, torch.nn.Linear(2, 2), **kwargs)


def _optimizer(run: Run) -> torch.optim.Optimizer:
    return torch.optim.AdamW(run.best.module.parameters())


def _snapshot(path: Path, step: int, run_id: RunId | None = None, total: int = 10,
              **kwargs) -> Run:
    """A run of ``run_id`` that saved a snapshot at ``step``."""
    run = _run(path, run_id, total, **kwargs)
    run.save(step, run.best.module, _optimizer(run), {"torch": RNG}, {})
    return run


def _start(path: Path, run_id: RunId | None = None, total: int = 10, **kwargs):
    run = _run(path, run_id, total, **kwargs)
    return run.start(run.best.module, _optimizer(run))


def _state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_run_id_covers_params_and_every_input_byte_and_names_what_differs(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "tok.json").write_text("{}")
    inputs = {"data": data, "tokenizer": tmp_path / "tok.json"}
    base = run_fingerprint({"train": {"lr": 1.0}}, inputs)
    assert run_fingerprint({"train": {"lr": 1.0}}, inputs) == base
    other = run_fingerprint({"train": {"lr": 2.0}}, inputs)
    assert other.digest != base.digest
    assert describe_changes(other.differences(base)) == "train.lr = 1.0 there, 2.0 here"
    (data / "sub" / "a.bin").write_bytes(b"abd")  # same length, other bytes
    edited = run_fingerprint({"train": {"lr": 1.0}}, inputs)
    assert list(edited.differences(base)) == ["the bytes of its input 'data'"]
    # Where the inputs live does not matter: a copy elsewhere is the same run.
    elsewhere = tmp_path / "moved"
    (elsewhere / "data" / "sub").mkdir(parents=True)
    (elsewhere / "data" / "sub" / "a.bin").write_bytes(b"abd")
    (elsewhere / "tok.json").write_text("{}")
    moved = {"data": elsewhere / "data", "tokenizer": elsewhere / "tok.json"}
    assert run_fingerprint({"train": {"lr": 1.0}}, moved).digest == edited.digest
    with pytest.raises(GptpipeError, match="the run's input 'data' must exist"):
        run_fingerprint({}, {"data": tmp_path / "absent"})


def test_resume_and_reuse_each_say_why(tmp_path, capsys):
    assert _start(tmp_path / "run") is None  # nothing there: afresh, silently
    assert capsys.readouterr().out == ""
    _snapshot(tmp_path / "run", 4)
    rng, info = _start(tmp_path / "run")
    assert info["step"] == 4 and torch.equal(rng["torch"], RNG)
    assert capsys.readouterr().out == "stage: resuming from step 4 of 10\n"
    _snapshot(tmp_path / "run", 10)
    assert _start(tmp_path / "run")[1]["step"] == 10
    assert ("stage: the checkpoint folder holds this run, finished at step 10: writing its "
            "outputs") in capsys.readouterr().out


@pytest.mark.parametrize("change", ["settings", "machine"])
def test_a_finished_run_is_trained_again_with_another_cadence_or_elsewhere(tmp_path, capsys,
                                                                           change):
    """What `dvc repro -f` does: a finished run is only written out where training it again
    would compute the same thing; another cadence or machine trains it again."""
    _snapshot(tmp_path / "run", 10, settings={"train.eval_every": 5})
    capsys.readouterr()
    other = {"settings": {"settings": {"train.eval_every": 2}},
             "machine": {"machine": {**MACHINE, "torch": "2.14.0"}}}[change]
    assert _start(tmp_path / "run", **{"settings": {"train.eval_every": 5}, **other}) is None
    said = capsys.readouterr().out
    assert "holds this run, finished at step 10" in said and "training it again" in said
    assert {"settings": "with other settings (train.eval_every = 5 there, 2 here)",
            "machine": "on another machine or software (torch '2.13.0' there, '2.14.0' here)"
            }[change] in said
    assert _entries(tmp_path / "run") == []


def test_an_unfinished_run_resumed_elsewhere_says_its_rounding_changes(tmp_path, capsys):
    _snapshot(tmp_path / "run", 4)
    capsys.readouterr()
    assert _start(tmp_path / "run", machine={**MACHINE, "cpu": "another CPU"})[1]["step"] == 4
    said = capsys.readouterr().out
    assert "resuming from step 4 of 10; written with cpu 'a CPU' there, 'another CPU' here" in (
        said)
    assert "not bit for bit an uninterrupted run's" in said


def test_an_interrupted_run_of_other_params_is_set_aside_and_comes_back(tmp_path, capsys):
    """A param change never deletes an interrupted run: it is set aside, named, and the
    params set back resume it, while the other run's snapshot goes aside in its turn."""
    folder = tmp_path / "run"
    _snapshot(folder, 4)
    capsys.readouterr()
    assert _start(folder, _run_id(lr=0.2)) is None
    said = capsys.readouterr().out
    aside = folder / "aside" / _run_id().digest[:12]
    assert said == (f"stage: the snapshot in {folder} (step 4 of 10) is of another run "
                    f"(train.lr = 0.1 there, 0.2 here): set aside in {aside}; setting those "
                    f"params back resumes it, rm -r {aside} discards it; starting afresh\n")
    assert _state(aside / "snapshot")["step"] == 4
    assert _entries(folder) == ["aside"]
    _snapshot(folder, 6, _run_id(lr=0.2))  # the other run goes on, and is interrupted too
    capsys.readouterr()
    assert _start(folder)[1]["step"] == 4  # lr back to 0.1
    said = capsys.readouterr().out
    assert f"(the run set aside in {aside})" in said and "resuming from step 4 of 10" in said
    assert _entries(folder / "aside") == [_run_id(lr=0.2).digest[:12]]
    assert _state(folder / "snapshot")["step"] == 4


def test_a_finished_run_of_other_params_is_replaced(tmp_path, capsys):
    _snapshot(tmp_path / "run", 10)
    capsys.readouterr()
    assert _start(tmp_path / "run", _run_id(lr=0.2)) is None
    assert "holds another run, finished at step 10 (train.lr = 0.1 there, 0.2 here): " \
           "replacing it" in capsys.readouterr().out
    assert _entries(tmp_path / "run") == []


def test_at_most_three_runs_are_kept_aside_then_one_line_says_which_to_delete(tmp_path):
    folder = tmp_path / "run"
    for lr in (0.1, 0.2, 0.3):
        _snapshot(folder, 4, _run_id(lr=lr))
        assert _start(folder, _run_id(lr=lr + 1)) is None
    _snapshot(folder, 4, _run_id(lr=0.4))
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    with pytest.raises(GptpipeError) as caught:
        _start(folder, _run_id(lr=0.5))
    assert "already keeps 3 runs set aside" in str(caught.value)
    assert f"rm -r {folder / 'aside'}/<id>" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


@pytest.mark.parametrize("damage", ["flipped bytes", "cut short", "cut json"])
def test_a_damaged_snapshot_is_set_aside_and_the_run_starts_afresh(tmp_path, capsys, damage):
    folder = tmp_path / "run"
    _snapshot(folder, 4)
    tensors = folder / "snapshot" / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    if damage == "flipped bytes":  # the header still parses: only the sha256 can tell
        data[-10] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "cut short":
        tensors.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (folder / "snapshot" / "state.json").write_text('{"step": 4, "cut sho')
    capsys.readouterr()
    assert _start(folder) is None
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "is damaged (" in said and "starting afresh" in said
    assert f"set aside in {folder / 'aside' / 'damaged-1'}" in said
    assert _entries(folder) == ["aside"]
    assert _entries(folder / "aside" / "damaged-1" / "snapshot") == ["state.json",
                                                                    "state.safetensors"]


def test_a_damaged_run_set_aside_is_not_resumed_and_stays_where_it_is(tmp_path, capsys):
    folder = tmp_path / "run"
    _snapshot(folder, 4)
    assert _start(folder, _run_id(lr=0.2)) is None
    aside = folder / "aside" / _run_id().digest[:12]
    tensors = aside / "snapshot" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"!")
    capsys.readouterr()
    assert _start(folder) is None
    assert (f"stage: the run set aside in {aside} would resume, but {tensors}: damaged (its "
            "sha256 is not the one it was saved with); it stays there\n"
            ) == capsys.readouterr().out
    assert tensors.is_file()


@pytest.mark.parametrize("make", [
    lambda root: (root / "user.txt").write_text("mine"),
    lambda root: save_model(root / "best", *_tiny_gpt(), {}, None) or (root / "last").mkdir(),
    lambda root: [_snapshot(root / name, 3) for name in ("pretrain", "rlhf")],
], ids=["a user's file", "a model folder", "a parent of run folders"])
def test_a_folder_that_is_not_a_run_folder_is_refused_and_left_alone(tmp_path, make):
    """A mistyped --checkpoint (models/pretrain, say) must not lose what it names."""
    folder = tmp_path / "folder"
    folder.mkdir()
    make(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(GptpipeError, match=r"not a run folder: it holds .*name a new or empty "
                                           r"folder as --checkpoint"):
        _start(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_the_working_tree_is_never_taken_for_a_run_folder(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "params.yaml").write_text("train: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptpipeError, match=r"not a run folder: it holds \.git, params\.yaml"):
        _start(Path("."))
    assert _entries(tmp_path) == [".git", "params.yaml"]


def test_an_older_gptpipes_run_folder_is_recognized_and_set_aside(tmp_path, capsys):
    """Before the best weights moved into the snapshot, they sat in best/ beside it."""
    folder = tmp_path / "run"
    _snapshot(folder, 4)
    state = _state(folder / "snapshot")
    del state["run"]
    (folder / "snapshot" / "state.json").write_text(json.dumps(state))
    save_model(folder / "best", *_tiny_gpt(), {})
    capsys.readouterr()
    assert _start(folder) is None
    assert "is of another run (written by an earlier gptpipe)" in capsys.readouterr().out
    (aside,) = (folder / "aside").iterdir()
    assert _entries(aside) == ["best", "snapshot"] and _entries(folder) == ["aside"]


def _tiny_gpt():
    from pipeline.lm.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=16, context=8, n_layer=1, n_head=1, n_embd=8)
    return GPT(config), config


@pytest.mark.parametrize("where", ["a weight", "an optimizer moment"])
def test_non_finite_weights_are_never_saved(tmp_path, where):
    run = _snapshot(tmp_path / "run", 4)
    before = (tmp_path / "run/snapshot/state.safetensors").read_bytes()
    model, optimizer = run.best.module, _optimizer(run)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        if where == "a weight":
            model.weight[0, 0] = math.nan
        else:
            optimizer.state[model.bias]["exp_avg"][0] = math.inf
    with pytest.raises(NonFiniteWeights) as caught:
        run.save(5, model, optimizer, {"torch": RNG}, {})
    assert str(caught.value).startswith("stage: ")
    assert "is not finite at step 5: refusing to save it; the last good snapshot (step 4)" in (
        str(caught.value))
    assert (tmp_path / "run/snapshot/state.safetensors").read_bytes() == before


def test_best_weights_ride_in_the_snapshot_and_come_back(tmp_path):
    """A snapshot after the best step carries the best weights (tied names and all); one
    at the best step needs none beside its own."""
    gpt, _ = _tiny_gpt()
    run = Run("stage", tmp_path / "run", _run_id(), 10, gpt, machine=MACHINE)
    optimizer = torch.optim.AdamW(gpt.parameters())
    run.best.keep(2, score=0.5)
    best = {k: v.clone() for k, v in gpt.state_dict().items()}
    with torch.no_grad():
        for param in gpt.parameters():
            param.add_(1.0)
    run.save(4, gpt, optimizer, {}, {})
    assert run.best.tensors(2) == {}  # at the best step the weights are the snapshot's own
    again = Run("stage", tmp_path / "run", _run_id(), 10, _tiny_gpt()[0], machine=MACHINE)
    _, info = again.start(again.best.module, torch.optim.AdamW(again.best.module.parameters()))
    assert (again.best.step, again.best.record, info["best_step"]) == (2, {"score": 0.5}, 2)
    restored = again.best.state_dict()
    assert restored.keys() == best.keys()  # lm_head.weight too, tied to the embedding
    for name, tensor in best.items():
        assert torch.equal(restored[name], tensor), name


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
    # The handlers found before are put back (a test worker may have SIGINT ignored).
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal: abort at once
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested == "SIGINT"
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]


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
