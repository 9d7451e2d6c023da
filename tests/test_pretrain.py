"""The pretrain stage: outputs, resume after a crash or a kill, DDP, and its guards."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from conftest import BIN, REPO_ROOT, synthetic_documents

from pipeline.core.device import Runtime, cpu_has_native_bf16
from pipeline.core.errors import GptpipeError
from pipeline.core.params import parse_params
from pipeline.data.shards import read_meta, read_tokens
from pipeline.lm.training import NonFiniteLoss, Trainer

TINY_MODEL = {"context": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_TRAIN = {
    # Absolute: the stage runs in a temporary folder, not the repository.
    "init_from": str(REPO_ROOT / "data/builtin/random.init"),
    "device": "cpu", "batch_size": 4, "steps": 24, "warmup_steps": 4, "lr": 3e-3,
    "min_lr": 3e-4, "eval_every": 6, "eval_windows": 8, "checkpoint_every": 6, "log_every": 1,
}


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """Real data stages on a small corpus with a char vocabulary: tokens + tokenizer."""
    from pipeline.stages import clean, ingest, split, tokenize, vocab

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as handle:
        for text in synthetic_documents(300, seed=3):
            handle.write(json.dumps({"text": text}) + "\n")
    params = parse_params({
        "data": {"corpus": str(corpus)},
        "clean": {"min_bytes": 10, "workers": 1},
        "vocab": {"kind": "char", "min_freq": 1},
    })
    ingest.run(params, out=root / "raw", metrics=root / "m-ingest.json")
    clean.run(params, input=root / "raw", out=root / "clean", metrics=root / "m-clean.json")
    split.run(params, input=root / "clean", out=root / "split", metrics=root / "m-split.json")
    vocab.run(params, input=root / "split", out=root / "tokenizer.json",
              metrics=root / "m-vocab.json")
    tokenize.run(params, input=root / "split", tokenizer=root / "tokenizer.json",
                 out=root / "tokens", metrics=root / "m-tokenize.json")
    return root


def _write_params(path: Path, model: dict | None = None, train: dict | None = None) -> Path:
    raw = {"model": {**TINY_MODEL, **(model or {})}, "train": {**TINY_TRAIN, **(train or {})}}
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli_args(data: Path, work: Path, params: Path) -> list[str]:
    return [
        "pretrain", "--params", str(params), "--tokens", str(data / "tokens"),
        "--tokenizer", str(data / "tokenizer.json"), "--out", str(work / "models"),
        "--checkpoint", str(work / "ckpt"), "--live", str(work / "live"),
        "--metrics", str(work / "metrics.json"), "--speed", str(work / "speed.json"),
    ]


def _gptpipe(
    args: list[str], cwd: Path, check: bool = True, env: dict | None = None, **popen
) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(BIN / "gptpipe"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, **popen)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _losses(work: Path) -> list[tuple[int, float]]:
    rows = (work / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows]


def test_pretrain_writes_models_metrics_and_plots(token_data, tmp_path):
    params = _write_params(tmp_path / "params.yaml")
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path)
    assert "pretrain: device cpu" in result.stdout
    for which in ("best", "last"):
        files = sorted(p.name for p in (tmp_path / "models" / which).iterdir())
        assert files == ["gptpipe.json", "model.safetensors", "tokenizer.json"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 24
    assert metrics["tokens_seen"] == 24 * 4 * 32
    assert metrics["best_val_loss"] < math.log(read_meta(token_data / "tokens")["vocab_size"])
    meta = read_meta(token_data / "tokens")
    val = meta["splits"]["val"]
    # bits per byte = nats/token / ln 2 * predicted tokens / bytes; every val token but
    # the first is predicted once
    assert metrics["val_bpb"] == pytest.approx(
        metrics["val_loss"] / math.log(2) * (val["tokens"] - 1) / val["bytes"], rel=1e-6
    )
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["tokens_per_second"] > 0 and speed["gflops_per_second"] > 0
    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == list(range(1, 25))
    assert losses[-1][1] < losses[0][1]
    val_rows = (tmp_path / "live/plots/metrics/val/loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in val_rows] == [6, 12, 18, 24]


def _trainer(data: Path, state_dir: Path, precision: torch.dtype = torch.float32,
             init_from: Path | None = None, **train) -> Trainer:
    """A Trainer on the tiny model, in this process; ``init_from``: a base model folder."""
    if init_from is not None:
        train = {**train, "init_from": str(init_from)}
    params = parse_params({"model": TINY_MODEL, "train": {**TINY_TRAIN, **train}})
    meta = read_meta(data / "tokens")
    inputs = {"tokens": data / "tokens",
              **({"init_from": init_from} if init_from else
                 {"tokenizer": data / "tokenizer.json"})}
    return Trainer(params.model, params.train, Runtime(torch.device("cpu"), precision),
                   read_tokens(data / "tokens/train"), read_tokens(data / "tokens/val"),
                   meta["vocab_size"], inputs, state_dir, {}, init_from=init_from)


class _Crash(Exception):
    pass


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_autocast_trains_on_a_cpu_that_runs_it_natively(token_data, tmp_path):
    losses: dict[int, float] = {}
    trainer = _trainer(token_data, tmp_path / "bf16", precision=torch.bfloat16, steps=12)
    trainer.fit(lambda log: losses.update({log.step: log.train_loss}), lambda s, v: None)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[12] < losses[1] - 0.5
    reference: dict[int, float] = {}
    _trainer(token_data, tmp_path / "fp32", steps=12).fit(
        lambda log: reference.update({log.step: log.train_loss}), lambda s, v: None)
    # Autocast, not float32 under another name: bfloat16 rounding moves the loss a little,
    # while the weights (and so the snapshot) stay float32.
    assert losses[1] != reference[1] and abs(losses[1] - reference[1]) < 0.05
    assert trainer.model.blocks[0].mlp.down.weight.dtype == torch.float32


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(token_data, tmp_path):
    straight: dict[int, float] = {}
    _trainer(token_data, tmp_path / "a").fit(
        lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)

    resumed: dict[int, float] = {}

    def crash_at_15(log):
        resumed[log.step] = log.train_loss
        if log.step == 15:
            raise _Crash  # dies between the snapshots at steps 12 and 18

    with pytest.raises(_Crash):
        _trainer(token_data, tmp_path / "b").fit(crash_at_15, lambda s, v: None)
    second = _trainer(token_data, tmp_path / "b")
    assert second.resumed_from == 12
    second.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert sorted(resumed) == list(range(1, 25))
    # Bit-for-bit the same loss at every step, including the three steps run twice.
    assert resumed == straight


def _crashed_at(data: Path, state_dir: Path, step: int, **train) -> dict[int, float]:
    """A run stopped by a crash after ``step`` (a snapshot every 6 steps); its losses."""
    losses: dict[int, float] = {}

    def log(entry):
        losses[entry.step] = entry.train_loss
        if entry.step == step:
            raise _Crash

    with pytest.raises(_Crash):
        _trainer(data, state_dir, **train).fit(log, lambda s, v: None)
    return losses


def test_a_param_change_sets_an_interrupted_run_aside_and_setting_it_back_resumes_it(
        token_data, tmp_path, capsys):
    """Never delete training progress the user did not ask to delete (the stage did)."""
    _crashed_at(token_data, tmp_path / "s", 15)
    capsys.readouterr()
    other = _trainer(token_data, tmp_path / "s", lr=1e-3)
    assert other.resumed_from is None
    said = capsys.readouterr().out
    assert "(step 12 of 24) is of another run (train.lr = 0.003 there, 0.001 here)" in said
    assert "setting those params back resumes it" in said
    other.fit(lambda log: None, lambda s, v: None)  # the other run, to its end
    capsys.readouterr()
    back = _trainer(token_data, tmp_path / "s")
    assert back.resumed_from == 12
    assert "resuming from step 12 of 24 (the run set aside in" in capsys.readouterr().out


def test_where_and_how_a_run_is_computed_never_makes_it_another_run(token_data, tmp_path,
                                                                   capsys):
    """train.device, dtype, threads, compile and nproc_per_node say where and how, not
    what: an interrupted run goes on (saying so when the rounding changes with them)."""
    from pipeline.lm.pretrain_run import pretrain_run_id

    threads = torch.get_num_threads()
    _crashed_at(token_data, tmp_path / "s", 15, device="cpu", dtype="float32")
    capsys.readouterr()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        again = _trainer(token_data, tmp_path / "s", device="auto", dtype="auto",
                         threads=torch.get_num_threads(), nproc_per_node=4, peer_timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert again.resumed_from == 12
    said = capsys.readouterr().out
    assert f"resuming from step 12 of 24; written with threads {threads} there, " in said
    assert "the remaining steps round as this machine does" in said
    # What the process count changes is the global batch: the world size, part of the run.
    params = parse_params({"model": TINY_MODEL, "train": TINY_TRAIN})
    inputs = {"tokens": token_data / "tokens"}
    one, two = (pretrain_run_id(params.model, params.train, size, inputs) for size in (1, 2))
    assert list(two.differences(one)) == ["world_size"]


def test_a_longer_budget_resumes_only_where_the_steps_done_had_the_same_learning_rates(
        token_data, tmp_path, capsys):
    """More steps stretch the cosine decay, so the steps done were another run's; with
    train.min_lr = train.lr (no decay) they were this run's, and resuming is exact."""
    _crashed_at(token_data, tmp_path / "cosine", 15)
    capsys.readouterr()
    assert _trainer(token_data, tmp_path / "cosine", steps=30).resumed_from is None
    said = capsys.readouterr().out
    assert ("train.steps = 24 there, 30 here: the learning rates of the 12 steps done differ "
            "between 24 and 30 steps") in said
    assert "set aside in" in said
    flat = {"min_lr": TINY_TRAIN["lr"]}
    straight: dict[int, float] = {}
    _trainer(token_data, tmp_path / "straight", steps=30, **flat).fit(
        lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)
    resumed = _crashed_at(token_data, tmp_path / "flat", 15, **flat)
    capsys.readouterr()
    longer = _trainer(token_data, tmp_path / "flat", steps=30, **flat)
    assert longer.resumed_from == 12
    assert ("a budget of 24 steps there, 30 here, and resuming is exact: each of the 12 steps "
            "done had the same learning rate") in capsys.readouterr().out
    longer.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert resumed == straight  # bit for bit the run of 30 steps


def test_a_finished_snapshot_is_not_trained_again(token_data, tmp_path, capsys):
    """Killed after the last snapshot: the re-run only writes the outputs, same weights."""
    first = _trainer(token_data, tmp_path / "s", steps=12)
    first.fit(lambda log: None, lambda s, v: None)
    capsys.readouterr()
    again = _trainer(token_data, tmp_path / "s", steps=12)
    assert again.resumed_from == again.step == 12
    assert "holds this run, finished at step 12: writing its outputs" in capsys.readouterr().out
    logged = []
    again.fit(logged.append, lambda s, v: logged.append(s))
    assert logged == []  # not one step trained
    assert again.best_step == first.best_step and again.best_val_loss == first.best_val_loss
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_a_snapshot_records_what_produced_it(token_data, tmp_path):
    _trainer(token_data, tmp_path / "s", steps=6).fit(lambda log: None, lambda s, v: None)
    machine = json.loads((tmp_path / "s/snapshot/state.json").read_text())["machine"]
    assert machine["torch"] == torch.__version__ and machine["precision"] == "float32"
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads() and machine["compile"] is False
    assert isinstance(machine["cpu_flags"], list) and machine["cpu"]


def test_a_snapshot_written_by_other_code_is_set_aside(token_data, tmp_path, capsys,
                                                       monkeypatch):
    """DVC re-runs pretrain when gptpipe's code changes; the old code's snapshot must not
    stand in for what the new code would train."""
    import pipeline.core.run_id

    _crashed_at(token_data, tmp_path / "s", 9)
    monkeypatch.setattr(pipeline.core.run_id, "source_digest", lambda: "edited code")
    capsys.readouterr()
    assert _trainer(token_data, tmp_path / "s").resumed_from is None
    out = capsys.readouterr().out
    assert "is of another run (gptpipe's code): set aside in" in out
    assert "starting afresh" in out


def test_a_finished_snapshot_with_another_cadence_trains_again(token_data, tmp_path, capsys):
    """An unfinished run may go on with another eval cadence; a finished one stands for
    the whole run's outputs (best model, logs), so another cadence means training again."""
    first = _trainer(token_data, tmp_path / "s", steps=12)
    first.fit(lambda log: None, lambda s, v: None)
    capsys.readouterr()
    other = _trainer(token_data, tmp_path / "s", steps=12, eval_every=3)
    assert other.resumed_from is None
    assert ("holds this run, finished at step 12 with other settings (train.eval_every = 6 "
            "there, 3 here): training it again") in capsys.readouterr().out


def test_float16s_loss_scale_is_resumed(token_data, tmp_path):
    """float16 (GPUs without bfloat16; here autocast on the CPU) scales its loss with a
    GradScaler whose scale is state: a resumed run must go on with it, not start over."""
    def fp16(state_dir: Path) -> Trainer:
        trainer = _trainer(token_data, state_dir, precision=torch.float16)
        if trainer.resumed_from is None:  # a scale a fresh scaler would not start from
            trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 1024.0})
        return trainer

    straight: dict[int, float] = {}
    first = fp16(tmp_path / "a")
    first.fit(lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)
    crashed = fp16(tmp_path / "b")
    resumed: dict[int, float] = {}

    def crash_at_15(log):
        resumed[log.step] = log.train_loss
        if log.step == 15:
            raise _Crash

    with pytest.raises(_Crash):
        crashed.fit(crash_at_15, lambda s, v: None)
    snapshot = json.loads((tmp_path / "b/snapshot/state.json").read_text())
    assert snapshot["step"] == 12 and snapshot["scaler"]["scale"] <= 1024.0
    again = fp16(tmp_path / "b")
    assert again.resumed_from == 12 and again.scaler.get_scale() == snapshot["scaler"]["scale"]
    again.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert resumed == straight
    assert again.scaler.state_dict() == first.scaler.state_dict()


def test_a_nan_gradient_stops_before_the_weights_change_and_the_run_resumes(token_data,
                                                                            tmp_path):
    """A NaN gradient with a finite loss: old code took the step, saved a NaN snapshot,
    and every resume failed. Now the step is named, the snapshot is the last good one."""
    straight: dict[int, float] = {}
    _trainer(token_data, tmp_path / "a", checkpoint_every=1).fit(
        lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)
    trainer = _trainer(token_data, tmp_path / "b", checkpoint_every=1)
    weight = trainer.model.blocks[0].mlp.down.weight
    weight.register_hook(lambda grad: grad * math.nan if trainer.step == 4 else grad)
    resumed: dict[int, float] = {}
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.fit(lambda log: resumed.__setitem__(log.step, log.train_loss),
                    lambda s, v: None)
    assert str(caught.value).startswith("pretrain: the gradient norm is nan at step 5; "
                                        "stopped before the weights changed; the last good "
                                        "snapshot (step 4)")
    assert json.loads((tmp_path / "b/snapshot/state.json").read_text())["step"] == 4
    again = _trainer(token_data, tmp_path / "b", checkpoint_every=1)
    assert again.resumed_from == 4
    again.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert resumed == straight


@pytest.fixture(scope="module")
def tiny_run(token_data, tmp_path_factory) -> Path:
    """The stage's uninterrupted run on TINY_TRAIN, to compare recovered runs against."""
    work = tmp_path_factory.mktemp("tiny")
    _gptpipe(_cli_args(token_data, work, _write_params(work / "p.yaml")), work)
    return work


def _same_outputs(work: Path, reference: Path) -> None:
    assert _losses(work) == _losses(reference)
    assert (work / "metrics.json").read_text() == (reference / "metrics.json").read_text()
    for which in ("best", "last"):
        for name in ("model.safetensors", "gptpipe.json"):
            assert (work / "models" / which / name).read_bytes() == (
                reference / "models" / which / name).read_bytes(), (which, name)


def test_the_stage_keeps_an_interrupted_run_through_a_param_change(token_data, tmp_path):
    """The stage as DVC runs it: another train.steps sets the interrupted run aside (the
    cosine decay would give its steps other learning rates), the old value resumes it."""
    _crashed_at(token_data, tmp_path / "ckpt", 15)
    longer = _write_params(tmp_path / "longer.yaml", train={"steps": 30})
    result = _gptpipe(_cli_args(token_data, tmp_path, longer), tmp_path)
    assert ("(step 12 of 24) is of another run (train.steps = 24 there, 30 here: the learning "
            "rates of the 12 steps done differ") in result.stdout
    (aside,) = (tmp_path / "ckpt/aside").iterdir()
    assert json.loads((aside / "snapshot/state.json").read_text())["step"] == 12
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 30
    result = _gptpipe(_cli_args(token_data, tmp_path, _write_params(tmp_path / "p.yaml")),
                      tmp_path)
    assert f"resuming from step 12 of 24 (the run set aside in {aside})" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 24
    assert not aside.exists()


def test_a_checkpoint_folder_holding_a_model_is_refused_and_the_model_kept(
        token_data, base_model, tmp_path):
    """--checkpoint models/pretrain by mistake: a trained model must not be taken over."""
    models = base_model.parent
    before = {p: p.read_bytes() for p in models.rglob("*") if p.is_file()}
    args = _cli_args(token_data, tmp_path, _write_params(tmp_path / "p.yaml"))
    args[args.index("--checkpoint") + 1] = str(models)
    result = _gptpipe(args, tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr == (f"Error: {models}: not a run folder: it holds best, last, which "
                             "gptpipe did not write there (a run folder holds only snapshot/ "
                             "and aside/); name a new or empty folder as --checkpoint "
                             "(checkpoints/<stage>)\n")
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    for output in ("models", "live", "metrics.json"):
        assert not (tmp_path / output).exists()


def test_a_damaged_snapshot_is_set_aside_and_the_run_trained_afresh(token_data, tiny_run,
                                                                    tmp_path):
    """Bytes flipped inside the weights: the file still parses, and the run used to resume
    from garbage without a word. Its recorded sha256 finds it out."""
    _crashed_at(token_data, tmp_path / "ckpt", 15)
    tensors = tmp_path / "ckpt/snapshot/state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    result = _gptpipe(_cli_args(token_data, tmp_path, _write_params(tmp_path / "p.yaml")),
                      tmp_path)
    aside = tmp_path / "ckpt/aside/damaged-1"
    assert (f"pretrain: the snapshot in {tmp_path / 'ckpt'} is damaged ({tensors}: damaged "
            f"(its sha256 is not the one it was saved with)): set aside in {aside}; rm -r "
            f"{aside} discards it; starting afresh") in result.stdout
    assert (aside / "snapshot/state.safetensors").read_bytes() == bytes(data)
    _same_outputs(tmp_path, tiny_run)


def test_a_nan_gradient_stops_the_stage_with_one_line_and_the_next_run_resumes(
        token_data, tiny_run, tmp_path):
    """The testing hook poisons a gradient at step 9: the stage stops naming it, the
    snapshot of step 6 is kept, and the next run ends as the uninterrupted one."""
    args = _cli_args(token_data, tmp_path, _write_params(tmp_path / "p.yaml"))
    result = _gptpipe(args, tmp_path, check=False, env={
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GPTPIPE_FAULT_NAN_GRAD_AT_STEP": "9"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert lines == [f"Error: pretrain: the gradient norm is nan at step 9; stopped before the "
                     f"weights changed; the last good snapshot (step 6) in {tmp_path / 'ckpt'} "
                     "is kept, and the next run resumes from it; try a lower train.lr, or "
                     "train.grad_clip > 0"]
    assert json.loads((tmp_path / "ckpt/snapshot/state.json").read_text())["step"] == 6
    result = _gptpipe(args, tmp_path)
    assert "resuming from step 6 of 24" in result.stdout
    _same_outputs(tmp_path, tiny_run)


def _edited_copy(data: Path, root: Path) -> Path:
    """``data`` with one train document edited so that every count stays the same (two
    characters swapped: same documents, tokens and bytes; the same char vocabulary), then
    tokenized again with the same tokenizer."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.data.doctable import DOCUMENT_SCHEMA, DocumentWriter, table_path
    from pipeline.stages import tokenize

    shutil.copytree(data / "split", root / "split")
    shutil.copy(data / "tokenizer.json", root / "tokenizer.json")
    rows = pq.read_table(table_path(root / "split/train")).to_pylist()
    text = rows[0]["text"]
    first = text[0]
    second = next(c for c in text if c != first)
    rows[0]["text"] = text.replace(first, "\0").replace(second, first).replace("\0", second)
    shutil.rmtree(root / "split/train")
    (root / "split/train").mkdir()
    with DocumentWriter(root / "split/train", DOCUMENT_SCHEMA) as writer:
        for row in rows:
            writer.append(**row)
    params = parse_params({"tokenize": {}})
    tokenize.run(params, input=root / "split", tokenizer=root / "tokenizer.json",
                 out=root / "tokens", metrics=root / "m-tokenize.json")
    return root


def test_a_corpus_edit_that_keeps_every_count_trains_afresh(token_data, tmp_path, capsys):
    """The fingerprint holds the bytes of the token shards, not their counts: an edit that
    keeps the counts is another run, never the finished snapshot of the old one."""
    first = _trainer(token_data, tmp_path / "s", steps=12)
    first.fit(lambda log: None, lambda s, v: None)
    edited = _edited_copy(token_data, tmp_path / "edited")
    old, new = read_meta(token_data / "tokens"), read_meta(edited / "tokens")
    assert old["splits"] == new["splits"] and old["tokenizer_sha256"] == new["tokenizer_sha256"]
    assert not np.array_equal(read_tokens(token_data / "tokens/train"),
                              read_tokens(edited / "tokens/train"))
    capsys.readouterr()
    again = _trainer(edited, tmp_path / "s", steps=12)
    assert again.resumed_from is None
    assert ("holds another run, finished at step 12 (the bytes of its input 'tokens'): "
            "replacing it") in capsys.readouterr().out
    trained = []
    again.fit(lambda log: trained.append(log.step), lambda s, v: None)
    assert trained == list(range(1, 13))  # every step trained on the edited tokens


LONG_TRAIN = {"steps": 400, "checkpoint_every": 20, "eval_every": 100}
WIDER = {"n_embd": 64}


@pytest.fixture(scope="module")
def straight_run(token_data, tmp_path_factory) -> Path:
    """An uninterrupted 400-step run to compare interrupted ones against."""
    work = tmp_path_factory.mktemp("straight")
    _gptpipe(_cli_args(token_data, work, _write_params(work / "p.yaml", WIDER, LONG_TRAIN)),
             work)
    return work


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_stopped_stage_resumes_and_matches_an_uninterrupted_run(
    token_data, straight_run, tmp_path, sig
):
    args = _cli_args(token_data, tmp_path, _write_params(tmp_path / "p.yaml", WIDER, LONG_TRAIN))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen([str(BIN / "gptpipe"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "ckpt/snapshot/state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 60:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (tmp_path / "models").exists()
    step = json.loads(state.read_text())["step"]
    assert 60 <= step < 400
    if sig != signal.SIGKILL:
        # Ctrl-C or SIGTERM (what schedulers and `timeout` send): the step in hand
        # finishes, a snapshot is saved at it, one clear line.
        how = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
        assert f"interrupted by {how} at step {step}; a snapshot was saved" in stderr
        assert "Traceback" not in stderr

    result = _gptpipe(args, tmp_path)
    assert f"resuming from step {step}" in result.stdout
    assert _losses(tmp_path) == _losses(straight_run)
    metrics = (tmp_path / "metrics.json").read_text()
    assert metrics == (straight_run / "metrics.json").read_text()
    weights = (tmp_path / "models/best/model.safetensors").read_bytes()
    assert weights == (straight_run / "models/best/model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_gloo_processes_follow_the_one_process_loss_curve(token_data, tmp_path):
    """torchrun with 2 CPU processes of batch 4 against 1 process of batch 8.

    Both see the same 8 windows per step (WindowSampler draws the global batch and each
    rank keeps its slice), so the curves differ only by floating-point summation order:
    DDP averages two half-batch gradients where one process averages the whole batch,
    and 1 vs 2 threads change MKL's reduction order. Those differences are ~1e-7
    relative per step; Adam's normalization can amplify them, but over 16 steps they stay
    far below 1e-3, while a real sampling or averaging bug moves the loss by 1e-2 or more.
    """
    train = {"steps": 16, "eval_every": 8, "checkpoint_every": 8}
    one = tmp_path / "one"
    one.mkdir()
    _gptpipe(_cli_args(token_data, one,
                       _write_params(one / "p.yaml", train={**train, "batch_size": 8})), one)
    two = tmp_path / "two"
    two.mkdir()
    args = _cli_args(token_data, two,
                     _write_params(two / "p.yaml", train={**train, "batch_size": 4}))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
         *args], cwd=two, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 of 2" in result.stdout
    ones, twos = _losses(one), _losses(two)
    assert [s for s, _ in ones] == [s for s, _ in twos] == list(range(1, 17))
    np.testing.assert_allclose([v for _, v in twos], [v for _, v in ones], rtol=1e-3)
    # Not trivially equal because nothing trained: the loss did fall.
    assert ones[-1][1] < ones[0][1] - 0.3
    speed = json.loads((two / "speed.json").read_text())
    assert speed["world_size"] == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_snapshot(token_data, tmp_path):
    params = _write_params(tmp_path / "p.yaml", train={
        "lr": 1e6, "min_lr": 0.0, "warmup_steps": 0, "grad_clip": 0.0, "checkpoint_every": 1,
        "steps": 50})
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path, check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    found = re.search(r"the (training loss|gradient norm) is (nan|-?inf) at step (\d+);", message)
    assert found, message
    bad_step = int(found.group(3))
    info = json.loads((tmp_path / "ckpt/snapshot/state.json").read_text())
    assert info["step"] == bad_step - 1
    assert not (tmp_path / "models").exists()
    assert "Traceback" not in result.stderr


def test_nan_guard_in_process(token_data, tmp_path):
    trainer = _trainer(token_data, tmp_path / "n")
    with torch.no_grad():
        trainer.model.blocks[0].mlp.down.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        trainer.fit(lambda log: None, lambda s, v: None)


@pytest.mark.parametrize(
    ("model", "train", "needle"),
    [
        ({"context": 100_000}, {}, "model.context = 100000 needs at least 100001"),
        ({}, {"device": "cuda"}, "no CUDA GPU"),
        ({}, {"device": "tpu"}, "train.device = 'tpu'"),
        ({}, {"batch_size": 10**6}, "do not fit in cpu memory"),
        ({}, {"dtype": "float16"}, "train.dtype = 'float16' on cpu"),
    ],
)
def test_bad_settings_give_one_clear_line(token_data, tmp_path, model, train, needle):
    if train.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = _write_params(tmp_path / "p.yaml", model, train)
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path, check=False)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()


def test_shards_from_another_tokenizer_are_refused(token_data, tmp_path):
    other = tmp_path / "other-tokenizer.json"
    text = (token_data / "tokenizer.json").read_text()
    other.write_text(text.replace('"version"', '"version" ', 1))
    params = _write_params(tmp_path / "p.yaml")
    args = _cli_args(token_data, tmp_path, params)
    args[args.index("--tokenizer") + 1] = str(other)
    result = _gptpipe(args, tmp_path, check=False)
    assert result.returncode != 0
    assert "made with another tokenizer" in result.stderr
    assert "other-tokenizer.json" in result.stderr


def test_missing_val_split_is_refused(token_data, tmp_path):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(token_data / "tokens", tokens)
    meta = json.loads((tokens / "meta.json").read_text())
    del meta["splits"]["val"]
    (tokens / "meta.json").write_text(json.dumps(meta))
    params = _write_params(tmp_path / "p.yaml")
    args = _cli_args(token_data, tmp_path, params)
    args[args.index("--tokens") + 1] = str(tokens)
    result = _gptpipe(args, tmp_path, check=False)
    assert result.returncode != 0
    assert "has no 'val' split" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_more_processes_than_gpus_are_refused_before_launching(monkeypatch):
    from pipeline.core.errors import GptpipeError
    from pipeline.stages.pretrain import _check_gpus_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # As seen on a one-GPU machine, where each rank would otherwise fail on its own.
    with pytest.raises(GptpipeError, match=r"^train.nproc_per_node = 2 but only 1 GPU\(s\) "
                                           r"are visible; allowed: 1 \.\. 1"):
        _check_gpus_for(2, "cuda")
    with pytest.raises(GptpipeError, match=r"train\.nproc_per_node = 2 but only 1"):
        _check_gpus_for(2, "auto")
    with pytest.raises(GptpipeError, match="'cuda:0' names one GPU"):
        _check_gpus_for(2, "cuda:0")
    _check_gpus_for(2, "cpu")  # gloo processes on the CPU: allowed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    _check_gpus_for(4, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _check_gpus_for(2, "auto")  # auto without a GPU means CPU processes
    _check_gpus_for(2, "cuda")  # no GPU at all: the device check says so, in each rank


# ------------------------------------------------------------------ continued pretraining


@pytest.fixture(scope="module")
def base_model(token_data, tmp_path_factory) -> Path:
    """A finished tiny run's best model: what a user would continue training."""
    work = tmp_path_factory.mktemp("base")
    _gptpipe(_cli_args(token_data, work, _write_params(work / "p.yaml", train={"steps": 6})),
             work)
    return work / "models" / "best"


def test_init_from_starts_from_the_base_weights_exactly(token_data, base_model, tmp_path):
    from pipeline.lm.checkpoint import load_model

    trainer = _trainer(token_data, tmp_path / "s", init_from=base_model)
    source, _ = load_model(base_model)
    meta = read_meta(token_data / "tokens")
    ids = torch.randint(0, meta["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(ids)[0], source.eval()(ids)[0])


def test_continued_pretraining_through_the_stage(token_data, base_model, tmp_path):
    params = _write_params(tmp_path / "p.yaml", train={"steps": 6, "init_from": str(base_model)})
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path)
    assert f"pretrain: continuing {base_model}" in result.stdout
    config = json.loads((tmp_path / "models/best/gptpipe.json").read_text())
    assert config["init_from"] == str(base_model)
    # It went on from the base model: its first step, on the same first batch as the base
    # run's (same seed), has a lower loss than the base run's first, from random weights.
    base_losses = _losses(base_model.parent.parent)
    assert _losses(tmp_path)[0][1] < base_losses[0][1]


def test_vocab_from_model_copies_the_base_tokenizer_byte_for_byte(token_data, base_model,
                                                                   tmp_path):
    from pipeline.stages import vocab

    params = parse_params({"vocab": {"kind": "from_model"},
                           "train": {"init_from": str(base_model)}})
    metrics = vocab.run(params, input=token_data / "split", out=tmp_path / "tokenizer.json",
                        metrics=tmp_path / "m.json")
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        base_model / "tokenizer.json").read_bytes()
    assert metrics["kind"] == "char" and metrics["val_tokens"] > 0
    with pytest.raises(GptpipeError, match=r"train.init_from = data/builtin/random\.init means "
                                           "random weights"):
        vocab.run(parse_params({"vocab": {"kind": "from_model"}}), input=token_data / "split",
                  out=tmp_path / "t2.json", metrics=tmp_path / "m2.json")
    assert not (tmp_path / "t2.json").exists()


@pytest.fixture(scope="module")
def hf_base(base_model, tmp_path_factory) -> Path:
    """The base model exported as a Transformers folder (a Llama), as a user would bring
    one from elsewhere."""
    from pipeline.stages import export

    out = tmp_path_factory.mktemp("hf") / "llama"
    export.run(parse_params({}), model=base_model, out=out)
    return out


def test_init_from_a_transformers_folder_starts_from_its_weights_exactly(token_data, base_model,
                                                                         hf_base, tmp_path):
    from pipeline.lm.checkpoint import load_model

    trainer = _trainer(token_data, tmp_path / "s", init_from=hf_base)
    source, _ = load_model(base_model)
    for name, tensor in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_continued_pretraining_of_a_transformers_folder_through_the_stages(
        token_data, base_model, hf_base, tmp_path):
    from pipeline.stages import vocab

    before = sorted(p.name for p in hf_base.iterdir())
    # vocab.kind from_model: the folder's tokenizer.json less the post-processor that puts
    # <bos> first for Transformers, which is the base model's tokenizer byte for byte.
    params = parse_params({"vocab": {"kind": "from_model"}, "train": {"init_from": str(hf_base)}})
    vocab.run(params, input=token_data / "split", out=tmp_path / "tokenizer.json",
              metrics=tmp_path / "m.json")
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        base_model / "tokenizer.json").read_bytes()
    # So the data's shards are the base model's, and pretraining goes on from it.
    params = _write_params(tmp_path / "p.yaml", train={"steps": 6, "init_from": str(hf_base)})
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path)
    assert f"pretrain: continuing {hf_base}" in result.stdout
    base_losses = _losses(base_model.parent.parent)  # the same first batch, random weights
    assert _losses(tmp_path)[0][1] < base_losses[0][1]
    assert sorted(p.name for p in hf_base.iterdir()) == before  # converted in memory only


def _not_a_model(root: Path) -> Path:
    (root / "config.json").parent.mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["BertModel"]}')
    (root / "model.safetensors").write_bytes(b"")
    return root


def _pickled(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    return root


def _transformers(base: Path, root: Path, drop: str | None = None,
                  drop_tensor: str | None = None, **changes) -> Path:
    """The base model exported as a Transformers folder (a Llama), then spoiled: a file
    or a tensor dropped, config.json keys changed."""
    from safetensors.torch import load_file, save_file

    from pipeline.stages import export

    export.run(parse_params({}), model=base, out=root)
    if drop:
        (root / drop).unlink()
    if drop_tensor:
        state = load_file(root / "model.safetensors")
        del state[drop_tensor]
        save_file(state, root / "model.safetensors", {"format": "pt"})
    hf_config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**hf_config, **changes}))
    return root


def _other_shape(base: Path, root: Path) -> Path:
    import shutil

    shutil.copytree(base, root)
    config = json.loads((root / "gptpipe.json").read_text())
    config["model"]["n_layer"] = 3
    (root / "gptpipe.json").write_text(json.dumps(config))
    return root


def _other_vocabulary(base: Path, root: Path) -> Path:
    import shutil

    shutil.copytree(base, root)
    text = (root / "tokenizer.json").read_text()
    (root / "tokenizer.json").write_text(text.replace('"version"', '"version" ', 1))
    config = json.loads((root / "gptpipe.json").read_text())
    config["tokenizer_sha256"] = None
    (root / "gptpipe.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(("make", "needle"), [
    (lambda base, root: root / "absent", "absent: not found; allowed: a gptpipe model folder"),
    (lambda base, root: _not_a_model(root),
     "architectures = ['BertModel']: not an architecture gptpipe computes"),
    (lambda base, root: _pickled(root),
     "pytorch_model.bin is a pickle, and gptpipe never loads pickles"),
    (lambda base, root: _other_shape(base, root),
     "the model has n_layer = 3 but model.n_layer is 2; set the model section"),
    (lambda base, root: _other_vocabulary(base, root),
     "its tokenizer is not the data's"),
    (lambda base, root: base / "model.safetensors", "a file, not a model folder"),
    (lambda base, root: _transformers(base, root, model_type="bert"),
     "model_type = 'bert': not an architecture gptpipe computes; allowed: llama"),
    (lambda base, root: _transformers(base, root, drop="tokenizer.json"),
     "tokenizer.json: missing; a Transformers folder used by gptpipe holds its tokenizer"),
    (lambda base, root: _transformers(base, root, max_position_embeddings=64),
     "the model has context = 64 but model.context is 32"),
    (lambda base, root: _transformers(base, root,
                                      drop_tensor="model.layers.1.mlp.down_proj.weight"),
     "model.safetensors: weights do not match config.json (missing "
     "model.layers.1.mlp.down_proj.weight)"),
], ids=["missing", "not a model", "pickle", "other shape", "other vocabulary", "a file",
        "hf architecture", "hf no tokenizer", "hf other shape", "hf weights"])
def test_a_bad_base_model_is_one_line_and_nothing_is_written(token_data, base_model, tmp_path,
                                                            make, needle):
    init_from = make(base_model, tmp_path / "base")
    params = _write_params(tmp_path / "p.yaml", train={"init_from": str(init_from)})
    result = _gptpipe(_cli_args(token_data, tmp_path, params), tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    for output in ("models", "ckpt", "live", "metrics.json"):
        assert not (tmp_path / output).exists()


# ------------------------------------------------------------------ tokens on disk


def test_windows_read_from_disk_are_the_in_memory_windows_bit_for_bit(token_data):
    from pipeline.lm.batching import WindowSampler, eval_windows

    on_disk = read_tokens(token_data / "tokens/train")
    in_memory = np.asarray(on_disk)
    a = WindowSampler(on_disk, 32, 8, seed=5, rank=1, world_size=2)
    b = WindowSampler(in_memory, 32, 8, seed=5, rank=1, world_size=2)
    for _ in range(20):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(eval_windows(on_disk, 32, 16), eval_windows(in_memory, 32, 16))


@pytest.fixture(scope="module")
def small_shards(token_data, tmp_path_factory) -> Path:
    """token_data re-tokenized into shards of 500 tokens: windows straddle shards."""
    import shutil

    from pipeline.stages import tokenize

    root = tmp_path_factory.mktemp("small-shards")
    shutil.copytree(token_data / "split", root / "split")
    shutil.copy(token_data / "tokenizer.json", root / "tokenizer.json")
    tokenize.run(parse_params({"tokenize": {"shard_tokens": 500}}), input=root / "split",
                 tokenizer=root / "tokenizer.json", out=root / "tokens",
                 metrics=root / "m.json")
    assert read_meta(root / "tokens")["splits"]["train"]["shards"] > 20
    return root


def test_a_resume_across_shard_boundaries_continues_bit_for_bit(small_shards, tmp_path):
    straight: dict[int, float] = {}
    _trainer(small_shards, tmp_path / "a").fit(
        lambda log: straight.__setitem__(log.step, log.train_loss), lambda s, v: None)
    resumed: dict[int, float] = {}

    def crash_at_9(log):
        resumed[log.step] = log.train_loss
        if log.step == 9:
            raise _Crash

    with pytest.raises(_Crash):
        _trainer(small_shards, tmp_path / "b").fit(crash_at_9, lambda s, v: None)
    second = _trainer(small_shards, tmp_path / "b")
    assert second.resumed_from == 6
    second.fit(lambda log: resumed.__setitem__(log.step, log.train_loss), lambda s, v: None)
    assert resumed == straight


# --- several machines, simulated on this one -----------------------------------------------

NODE_TRAIN = {"steps": 160, "checkpoint_every": 10, "eval_every": 40, "log_every": 10}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _node_checkout(token_data: Path, root: Path, train: dict | None = None) -> Path:
    """A machine's own checkout: its own copy of the data and params, no shared folder."""
    root.mkdir(parents=True)
    shutil.copytree(token_data / "tokens", root / "data/tokens")
    shutil.copyfile(token_data / "tokenizer.json", root / "data/tokenizer.json")
    _write_params(root / "params.yaml", WIDER, {**NODE_TRAIN, **(train or {})})
    return root


def _launch_nodes(nodes: list[Path], run_id: str) -> list[subprocess.Popen]:
    """The multi-machine command of docs/pretraining.md on each node: torchrun --nnodes=2, a c10d
    rendezvous on localhost, one CPU (gloo) process per node, each in its own checkout."""
    endpoint = f"localhost:{_free_port()}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    args = ["pretrain", "--params", "params.yaml", "--tokens", "data/tokens", "--tokenizer",
            "data/tokenizer.json", "--out", "models", "--checkpoint", "ckpt", "--live", "live",
            "--metrics", "metrics.json", "--speed", "speed.json"]
    return [
        subprocess.Popen(
            [str(BIN / "torchrun"), f"--nnodes={len(nodes)}", "--nproc_per_node=1",
             f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
             f"--rdzv_id={run_id}", "-m", "pipeline.cli", *args],
            cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, node in enumerate(nodes)
    ]


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=240) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]


def _outputs(node: Path) -> tuple:
    return (_losses(node), (node / "metrics.json").read_text(),
            (node / "models/best/model.safetensors").read_bytes(),
            (node / "models/last/model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def two_node_run(token_data, tmp_path_factory) -> Path:
    """An uninterrupted two-node run."""
    root = tmp_path_factory.mktemp("two-nodes")
    nodes = [_node_checkout(token_data, root / f"node{rank}") for rank in range(2)]
    for code, out, err in _finish(_launch_nodes(nodes, "straight")):
        assert code == 0, out + err
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_each_keep_the_whole_run(two_node_run):
    first, second = (_outputs(two_node_run / f"node{rank}") for rank in range(2))
    assert first == second
    assert len(first[0]) == NODE_TRAIN["steps"] // NODE_TRAIN["log_every"]
    for rank in range(2):
        speed = json.loads((two_node_run / f"node{rank}/speed.json").read_text())
        assert speed["world_size"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_killed_during_training_resume_and_match_an_uninterrupted_run(
    token_data, two_node_run, tmp_path
):
    nodes = [_node_checkout(token_data, tmp_path / f"node{rank}") for rank in range(2)]
    processes = _launch_nodes(nodes, "killed")
    states = [node / "ckpt/snapshot/state.json" for node in nodes]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if any(s.is_file() and json.loads(s.read_text())["step"] >= 40 for s in states):
            break
        time.sleep(0.005)
    assert all(p.poll() is None for p in processes), "a node ended before it could be killed"
    # A machine going down: torchrun and its worker (in a session of its own) at once.
    doomed = [psutil.Process(p.pid) for p in processes]
    doomed += [child for parent in list(doomed) for child in parent.children(recursive=True)]
    for victim in doomed:
        victim.kill()
    _finish(processes)
    steps = [json.loads(s.read_text())["step"] for s in states]
    assert 40 <= max(steps) < NODE_TRAIN["steps"]
    assert not any((node / "models").exists() for node in nodes)
    # The second machine is replaced by a fresh one: no snapshot at all on its disk.
    shutil.rmtree(nodes[1] / "ckpt")
    results = _finish(_launch_nodes(nodes, "resumed"))
    for code, out, err in results:
        assert code == 0, out + err
    said = "".join(out for _, out, _ in results)
    assert f"resuming from step {steps[0]}" in said
    assert f"holds none: continuing from step {steps[0]} with process" in said
    expected = _outputs(two_node_run / "node0")
    for node in nodes:
        assert _outputs(node) == expected
        assert json.loads((node / "ckpt/snapshot/state.json").read_text())["step"] == 160


def _worker_of(launcher: subprocess.Popen) -> psutil.Process:
    """The gptpipe process a torchrun launcher started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "pipeline.cli" in " ".join(child.cmdline()):
                    return child
        time.sleep(0.05)
    raise AssertionError("no worker started")


PEER_TIMEOUT = 10


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_dead_or_frozen_node_stops_the_other_within_the_timeout_naming_it(
        token_data, tmp_path, how):
    """A machine's process killed, or frozen as by a machine gone without closing its
    connections: the other node stops within train.peer_timeout (not PyTorch's 30 minutes
    of gloo), with one line naming the process; its snapshot stays to resume from."""
    nodes = [_node_checkout(token_data, tmp_path / f"node{rank}",
                            {"peer_timeout": PEER_TIMEOUT}) for rank in range(2)]
    processes = _launch_nodes(nodes, how)
    state = nodes[0] / "ckpt/snapshot/state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not state.is_file():
        assert all(p.poll() is None for p in processes), "a node ended before the fault"
        time.sleep(0.01)
    worker = _worker_of(processes[1])
    rank = int(worker.environ()["RANK"])
    stopped = time.monotonic()
    worker.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        _, err = processes[0].communicate(timeout=PEER_TIMEOUT + 60)
        took = time.monotonic() - stopped
    finally:
        victims = [psutil.Process(processes[1].pid), *psutil.Process(
            processes[1].pid).children(recursive=True)]
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        processes[1].communicate(timeout=60)
    assert processes[0].returncode != 0
    said = [line for line in err.splitlines() if line.startswith("Error: pretrain:")]
    assert len(said) == 1, err
    what = "stopped (killed, crashed" if how == "killed" else "stopped responding (no heartbeat"
    assert f"pretrain: process {rank} of 2 {what}" in said[0]
    assert "run the command again on every machine to resume from the last snapshot" in said[0]
    assert not re.search(r'File ".*/pipeline/', err), err  # no traceback through gptpipe
    assert took < PEER_TIMEOUT + 30
    assert json.loads(state.read_text())["step"] >= 10


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_with_other_params_stops_both_with_one_line(token_data, tmp_path):
    nodes = [_node_checkout(token_data, tmp_path / "node0"),
             _node_checkout(token_data, tmp_path / "node1", {"lr": 1e-3})]
    for code, _, err in _finish(_launch_nodes(nodes, "mixed")):
        assert code != 0
        lines = [line for line in err.splitlines() if "runs another run than process 0" in line]
        assert len(lines) == 1, err
        assert "params, token data, gptpipe code or resolved train.dtype differ" in lines[0]
        assert "give every machine the same commit, params.yaml, data (dvc pull)" in lines[0]
    assert not any((node / "models").exists() for node in nodes)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_with_damaged_data_stops_both_with_its_one_line(token_data, tmp_path):
    """A failure on one machine before any collective must not leave the other waiting."""
    nodes = [_node_checkout(token_data, tmp_path / f"node{rank}") for rank in range(2)]
    flat = nodes[1] / "data/tokens/train/tokens.bin"
    flat.write_bytes(flat.read_bytes()[:-2])
    results = _finish(_launch_nodes(nodes, "damaged"))
    for code, _, err in results:
        assert code != 0
        assert "tokens.bin: " in err and "tokens but the shards hold" in err, err
    assert not any((node / "models").exists() for node in nodes)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_sharing_one_checkout_write_it_once(token_data, two_node_run, tmp_path):
    """A checkout on a network file system: one writer, the same result."""
    shared = _node_checkout(token_data, tmp_path / "shared")
    for code, out, err in _finish(_launch_nodes([shared, shared], "shared")):
        assert code == 0, out + err
    assert _outputs(shared) == _outputs(two_node_run / "node0")
    assert not list((shared / "ckpt").glob(".gptpipe-writer-*"))
