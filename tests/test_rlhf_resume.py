"""Resuming RLHF: a crashed, killed or Ctrl-C'd run, re-run, ends exactly as an uninterrupted one.

In process (fast, every algorithm): ``tune`` with a checkpoint folder crashes after a
snapshot and a new ``Tuner`` resumes from it; the history, the best and the last weights
must equal those of a run without any checkpoint folder, bit for bit. The gold judge
scores by the step being evaluated (a table), so the best step falls strictly before the
snapshot resumed from on any machine, and the best weights must come back from inside
that snapshot.

As a process (the stage, as DVC runs it): SIGKILL once the first snapshot appears, or
Ctrl-C (SIGINT), then the same command again; metrics, best/last model files and the
dvclive plots must equal those of an uninterrupted run, wherever its best step falls.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN
from safetensors.torch import load_file
from test_rlhf import make_stage_inputs, rlhf_params, stage_args, tiny_gpt, toy_pairs, toy_prompts

from pipeline.alignment.tuner import Tuner


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on two shared cores (see test_rlhf.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- in process


# The gold score of each evaluation, by the step evaluated: the best is step 4, strictly
# inside the run, whatever the samples (which differ between machines' float results).
GOLD_BY_STEP = {0: 0.1, 2: 0.2, 4: 0.9, 6: 0.3, 8: 0.4, 10: 0.5, 12: 0.6}
BEST_STEP = 4


def stepped_gold(tuner_of: list[Tuner]):
    """A gold judge that scores every completion of an evaluation by the step of the
    tuner (``tuner_of[0]``, set once built) being evaluated."""
    return lambda prompt, completion: GOLD_BY_STEP[tuner_of[0].step]


def toy_scorer(prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(t == 7 for t in c) / max(len(c), 1) for c in completions])


ALGOS = [("ppo", 3e-3), ("reinforce", 1e-2), ("dpo", 1e-2)]


def _params(algo: str, lr: float):
    # adaptive_kl: the KL coefficient is state too and must come back.
    return rlhf_params(algo=algo, lr=lr, steps=12, eval_every=2, batch_size=8,
                       minibatch_size=4, eval_prompts=8, adaptive_kl=True, target_kl=0.5)


def _tuner(params, state_dir: Path | None, fingerprint: str = "run") -> Tuner:
    train = toy_prompts(16, 1)
    holder: list[Tuner] = []
    holder.append(Tuner(tiny_gpt(), params, toy_scorer, stepped_gold(holder), train,
                        toy_prompts(8, 2), toy_pairs(train, 32, 3), state_dir, fingerprint))
    return holder[0]


class _Crash(Exception):
    pass


def _crash_at(crash_step: int):
    """A progress callback that dies once ``crash_step`` is done, before its snapshot."""

    def progress(step: int) -> None:
        if step == crash_step:
            raise _Crash

    return progress


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("algo", "lr"), ALGOS, ids=[a for a, _ in ALGOS])
def test_a_crashed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, algo, lr):
    params = _params(algo, lr)
    straight_tuner = _tuner(params, None)
    straight = straight_tuner.run()
    best = straight.best_step
    resume_at = best + params.eval_every  # the first snapshot after the best step
    assert best == BEST_STEP  # by construction (GOLD_BY_STEP)

    with pytest.raises(_Crash):
        _tuner(params, tmp_path).run(progress=_crash_at(resume_at + 1))
    snapshot = json.loads((tmp_path / "snapshot/state.json").read_text())
    assert (snapshot["step"], snapshot["best_step"]) == (resume_at, best)
    # The snapshot's policy is step resume_at's: the best weights ride inside it.
    tensors = load_file(tmp_path / "snapshot/state.safetensors")
    best_weights = {k.removeprefix("best."): v for k, v in tensors.items()
                    if k.startswith("best.")}
    assert best_weights and all(torch.equal(best_weights[k], straight.best_state[k])
                                for k in best_weights)

    tuner = _tuner(params, tmp_path)
    assert tuner.resumed_from == resume_at
    logged: list[int] = []
    resumed = tuner.run(log=lambda step, metrics: logged.append(step))
    assert logged[0] == resume_at + 1 and logged[-1] == params.steps  # nothing logged twice
    # Every step's statistics, all evaluations, and both policies: bit for bit.
    assert resumed.history == straight.history
    assert (resumed.best_step, resumed.start, resumed.best, resumed.last) == (
        straight.best_step, straight.start, straight.best, straight.last)
    _assert_same_state(resumed.best_state, straight.best_state)
    _assert_same_state(tuner.policy.state_dict(), straight_tuner.policy.state_dict())
    assert tuner.controller.value == straight_tuner.controller.value
    if algo != "dpo":  # the adaptive coefficient moved, so restoring it was tested
        assert tuner.controller.value != params.kl_coef


def test_a_finished_snapshot_is_not_tuned_again_and_a_foreign_one_not_resumed(tmp_path,
                                                                                capsys):
    params = _params("dpo", 1e-2)
    done = _tuner(params, tmp_path).run()
    assert json.loads((tmp_path / "snapshot/state.json").read_text())["step"] == 12
    capsys.readouterr()
    # Killed after the last snapshot: the re-run only writes the outputs.
    finished = _tuner(params, tmp_path)
    assert finished.resumed_from == 12
    assert "holds this run, finished at step 12: writing its outputs" in capsys.readouterr().out
    logged = []
    again = finished.run(log=lambda step, metrics: logged.append(step))
    assert logged == []  # not one update, not one evaluation
    assert (again.best_step, again.history) == (done.best_step, done.history)
    assert (again.best.gold_score, again.last.gold_score) == (done.best.gold_score,
                                                               done.last.gold_score)
    for name, tensor in done.best_state.items():
        assert torch.equal(tensor, again.best_state[name]), name
    shutil.rmtree(tmp_path)

    with pytest.raises(_Crash):
        _tuner(params, tmp_path).run(progress=_crash_at(5))  # unfinished: snapshot at 4
    assert _tuner(params, tmp_path, fingerprint="other inputs").resumed_from is None
    said = capsys.readouterr().out
    assert "(step 4 of 12) is of another run (fingerprint = 'run' there, 'other inputs' " \
           "here): set aside in" in said
    assert _tuner(params, tmp_path).resumed_from == 4  # the inputs back: resumed


def test_rl_never_snapshots_non_finite_weights(tmp_path):
    """The run component refuses them for every loop: a policy weight gone NaN after the
    evaluation of step 4 stops the run at its snapshot, and the one of step 2 stays."""
    from pipeline.core.runs import NonFiniteWeights

    tuner = _tuner(_params("dpo", 1e-2), tmp_path)

    def poison(step: int) -> None:
        if step == 4:
            with torch.no_grad():
                tuner.policy.value_head.weight.fill_(math.nan)

    with pytest.raises(NonFiniteWeights, match="rlhf: .*is not finite at step 4: refusing to "
                                               r"save it; the last good snapshot \(step 2\)"):
        tuner.run(progress=poison)
    assert json.loads((tmp_path / "snapshot/state.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------- the stage

STEPS = 24
# A large lr and a gold judge that counts words: the gold score moves within a few steps.
# Where the best step falls depends on the machine's float results; the resume property is
# checked whatever it is (the in-process tests above place it inside the run for sure).
STAGE_RLHF = {"steps": STEPS, "eval_every": 4, "lr": 0.03, "max_new_tokens": 16,
              "adaptive_kl": True, "target_kl": 0.5}
STAGE_GOLD = {"min_words": 3, "max_words": 3}
# One thread: the same float results in every run, and no spinning on shared cores.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_stage_inputs(tmp_path_factory.mktemp("inputs"), STAGE_RLHF, STAGE_GOLD)["root"]


def _run_stage(root: Path, work: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "gptpipe"), *stage_args(root, work)], cwd=work,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory) -> Path:
    """An uninterrupted run to compare the interrupted ones against."""
    work = tmp_path_factory.mktemp("straight")
    _run_stage(inputs, work)
    return work


def _plots(work: Path) -> dict[str, str]:
    folder = work / "live/plots/metrics"
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.tsv"))}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_a_stopped_stage_resumes_and_matches_an_uninterrupted_run(inputs, straight, tmp_path,
                                                                  sig):
    process = subprocess.Popen([str(BIN / "gptpipe"), *stage_args(inputs, tmp_path)],
                               cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    state = tmp_path / "ckpt/snapshot/state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not state.is_file():
        time.sleep(0.002)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()
    step = json.loads(state.read_text())["step"]
    assert 4 <= step < STEPS
    if sig != signal.SIGKILL:
        # Ctrl-C or SIGTERM (what schedulers and `timeout` send): the step in hand
        # finishes, a snapshot is saved at it, one clear line.
        how = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
        assert (f"rlhf: interrupted by {how} at step {step}; a snapshot was saved in "
                f"{tmp_path / 'ckpt'}; run dvc repro again to resume") in stderr
        assert "Traceback" not in stderr

    result = _run_stage(inputs, tmp_path)
    assert f"rlhf: resuming from step {step} of {STEPS}" in result.stdout
    assert (tmp_path / "metrics.json").read_text() == (straight / "metrics.json").read_text()
    # dvclive's summary too, byte for byte (its keys are rewritten in a fixed order).
    summary = "live/metrics.json"
    assert (tmp_path / summary).read_bytes() == (straight / summary).read_bytes()
    for which in ("best", "last"):
        for name in ("model.safetensors", "gptpipe.json"):
            ours = (tmp_path / "out" / which / name).read_bytes()
            assert ours == (straight / "out" / which / name).read_bytes(), (which, name)
    # Every plot: the same rows, so no step twice and none missing, with the same values.
    plots = _plots(tmp_path)
    assert plots == _plots(straight)
    steps = [int(row.split("\t")[0]) for row in plots["kl.tsv"].splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))


def test_a_kill_after_the_last_snapshot_only_writes_the_outputs(inputs, straight, tmp_path):
    """Killed between the final snapshot and the outputs (here: the outputs and dvclive's
    summary removed after a finished run): the re-run trains nothing and writes the same
    bytes as the uninterrupted run, dvclive's summary included."""
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    shutil.rmtree(work / "out")
    (work / "metrics.json").unlink()
    (work / "live/metrics.json").unlink()
    result = _run_stage(inputs, work)
    assert f"rlhf: the checkpoint folder holds this run, finished at step {STEPS}" in (
        result.stdout)
    for name in ("metrics.json", "live/metrics.json"):
        assert (work / name).read_bytes() == (straight / name).read_bytes(), name
    for which in ("best", "last"):
        for name in ("model.safetensors", "gptpipe.json"):
            assert (work / "out" / which / name).read_bytes() == (
                straight / "out" / which / name).read_bytes(), (which, name)
    assert _plots(work) == _plots(straight)


def test_resuming_drops_plot_rows_after_the_snapshot_and_rows_cut_short(tmp_path):
    from pipeline.core.live import truncate_live

    tsv = tmp_path / "plots/metrics/eval/kl.tsv"
    tsv.parent.mkdir(parents=True)
    # The last row was cut short by a kill: "1" of "12\t0.12" would read as step 1.
    tsv.write_text("step\tkl\n" + "".join(f"{s}\t0.{s}\n" for s in range(12)) + "1")
    truncate_live(tmp_path, 4)
    assert tsv.read_text() == "step\tkl\n" + "".join(f"{s}\t0.{s}\n" for s in range(5))
