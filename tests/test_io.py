"""Atomic outputs: temporaries of dead writers swept at every stage start, data flushed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, run_cmd

from pipeline.cli import cli
from pipeline.core import io
from pipeline.core.errors import GptpipeError
from pipeline.core.stage import output_folders


def _dead_pid() -> int:
    """The pid of a process that has exited (and, checked, not been reused since)."""
    for _ in range(20):
        process = subprocess.Popen(["true"])
        process.wait()
        if not io._alive(process.pid):
            return process.pid
    raise AssertionError("no dead pid found")


def test_sweep_removes_only_the_temporaries_of_dead_writers(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".tokens.tmp-{dead}").mkdir()
    (tmp_path / f".tokens.tmp-{dead}" / "part-0.parquet").write_bytes(b"half")
    (tmp_path / f".ingest.json.tmp-{dead}").write_text("{")
    # An aside copy whose replacement is in place: the old version, no longer needed.
    (tmp_path / f".tokens.tmp-old-{dead}").mkdir()
    # A live writer's, an output, other files, and names whose tail is no pid (a date
    # above pid_max, non-ASCII digits): none of them is a dead writer's temporary.
    kept = [f".vocab.tmp-{alive}", "tokens", ".gitignore", ".notes.tmp-draft",
            ".notes.tmp-20240101999", ".x.tmp-\u00b2", ".y.tmp-0"]
    for name in kept:
        (tmp_path / name).mkdir()
    removed = io.sweep_dead_temporaries([tmp_path, tmp_path / "absent"])
    assert sorted(p.name for p in removed) == sorted(
        [f".tokens.tmp-{dead}", f".ingest.json.tmp-{dead}", f".tokens.tmp-old-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_sweep_puts_back_an_aside_copy_whose_replacement_never_arrived(tmp_path):
    aside = tmp_path / f".snapshot.tmp-old-{_dead_pid()}"
    aside.mkdir()
    (aside / "state.json").write_text("the only copy")
    assert io.sweep_dead_temporaries([tmp_path]) == [aside]
    assert (tmp_path / "snapshot" / "state.json").read_text() == "the only copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot"]


def test_output_folders_are_every_declared_output_and_its_parent():
    folders = {p.relative_to(REPO_ROOT).as_posix()
               for p in output_folders(REPO_ROOT / "dvc.yaml")}
    for expected in ("data", "data/tokens", "models", "checkpoints/pretrain",
                     "checkpoints/rlhf", "metrics", "dvclive/rlhf", "evaluation"):
        assert expected in folders, expected
    assert not any("${" in name for name in folders)
    assert output_folders(REPO_ROOT / "no-such-dvc.yaml") == []


def test_output_folders_of_an_unusual_dvc_yaml_never_crash(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    for text in ("", "[1, 2]", "stages: [a, b]", "stages:\n  s: 3\n",
                 "stages:\n  s:\n    outs: [{}, 7, null]\n", "{{{"):
        dvc_yaml.write_text(text)
        assert output_folders(dvc_yaml) == [], text
    dvc_yaml.write_text("stages:\n  s:\n    wdir: sub\n    outs: [out/x]\n"
                        "  t:\n    foreach: [1, 2]\n    do: {cmd: c, outs: [y]}\n")
    assert output_folders(dvc_yaml) == [tmp_path / "sub/out", tmp_path / "sub/out/x"]


def test_a_stage_start_sweeps_what_a_killed_stage_left(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tokenize:\n    cmd: gptpipe tokenize\n    outs:\n      - data/tokens\n")
    leftover = tmp_path / "data" / f".tokens.tmp-{_dead_pid()}"
    leftover.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["generate", "--help"])
    assert result.exit_code == 0 and leftover.exists()  # not a stage: sweeps nothing
    # A stage that starts (and here stops at once: no params file) sweeps first.
    args = ["split", "--params", "absent.yaml", "--input", "a", "--out", "b", "--metrics", "c"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "params file not found" in result.output
    assert not leftover.exists()


def test_atomic_dir_flushes_every_file_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        temporary = tmp
    names = {Path(p).relative_to(temporary).as_posix() for p in synced
             if p.startswith(str(temporary))}
    assert {"a.bin", "sub/b.bin", "sub"} <= names
    assert (out / "sub" / "b.bin").read_bytes() == b"b"


def test_the_source_digest_covers_every_module_of_the_package(tmp_path, monkeypatch):
    package = io.source_root()
    assert (package / "cli.py").is_file() and (package / "stages" / "pretrain.py").is_file()
    # A copy of the package whose model code differs by one byte digests differently.
    copy = tmp_path / "pipeline"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(io, "source_root", lambda: copy)
    digest = io.source_digest.__wrapped__  # uncached: the cached one is the real package's
    before = digest()
    model = copy / "lm" / "model.py"
    model.write_bytes(model.read_bytes() + b"\n")
    assert digest() != before


# ------------------------------------------------------------------ hostile JSON


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 200 levels"),
    ('{"a": ' + "[" * 300 + "]" * 300 + "}", "nested deeper than 200 levels"),
    ('{"n": ' + "7" * 5000 + "}", "not valid JSON"),
    ('{"a": 1', "not valid JSON"),
])
def test_hostile_json_is_one_line_not_a_traceback(text, expected):
    with pytest.raises(GptpipeError) as caught:
        io.parse_json(text, "f.json")
    message = caught.value.format_message()
    assert message.startswith("f.json: ") and expected in message
    assert "\n" not in message


def test_deep_brackets_inside_strings_are_text_not_nesting():
    text = '{"a": "' + "[" * 1000 + '", "b": [[1]]}'
    assert io.parse_json(text, "f.json") == {"a": "[" * 1000, "b": [[1]]}


def test_a_jsonl_line_over_the_limit_is_refused_naming_the_file_and_limit(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"t": "' + b"x" * 5000 + b'"}\n')
    lines = io.numbered_lines(path, "file", limit=1000)
    assert next(lines) == (1, b'{"a": 1}')
    with pytest.raises(GptpipeError, match=r"big.jsonl: line 2 is longer than the limit of "
                                           r"1,000 bytes"):
        next(lines)


def test_a_json_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(GptpipeError, match=r"config.json: file of 2,\d{3} bytes is over the "
                                           r"limit of 1,000 bytes"):
        io.read_json(path, limit=1000)


# ------------------------------------------------ replacing a folder without an atomic swap

# A writer on a file system without an atomic directory swap (NFS: the shared checkout of
# several machines). It replaces the folder argv[1] with one whose state.json says "new",
# and is killed right after its rename number argv[2] (``kill``), or that rename fails
# (``fail``: a disk error, say) instead of happening.
_FALLBACK_WRITER = """
import os, signal, sys
from pipeline.core import io

io._exchange = lambda a, b: False  # what renameat2 answers there
folder, number, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
renames, real_replace = [], os.replace

def replace(source, target):
    renames.append(target)
    if how == "fail" and len(renames) == number:
        raise OSError(5, "Input/output error")
    real_replace(source, target)
    if how == "kill" and len(renames) == number:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with io.atomic_dir(folder) as tmp:
    (tmp / "state.json").write_text("new")
"""

_SNAPSHOT_DVC_YAML = ("stages:\n  pretrain:\n    cmd: gptpipe pretrain\n    outs:\n"
                      "      - checkpoints/pretrain:\n          persist: true\n")


def _killed_fallback_writer(work: Path, kill_after: int) -> Path:
    """checkpoints/pretrain/snapshot (state.json "old") after the writer above was killed."""
    snapshot = work / "checkpoints" / "pretrain" / "snapshot"
    snapshot.mkdir(parents=True)
    (snapshot / "state.json").write_text("old")
    result = subprocess.run([sys.executable, "-c", _FALLBACK_WRITER, str(snapshot),
                             str(kill_after), "kill"], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return snapshot


@pytest.mark.parametrize("kill_after, kept", [(1, "old"), (2, "new")],
                         ids=["killed-with-the-old-one-aside", "killed-after-the-new-one-moved-in"])
def test_a_kill_inside_the_fallback_swap_never_loses_the_snapshot(tmp_path, kill_after, kept):
    snapshot = _killed_fallback_writer(tmp_path, kill_after)
    left = sorted(p.name for p in snapshot.parent.iterdir())
    if kill_after == 1:  # the previous snapshot is aside, the new one not yet in
        assert "snapshot" not in left and any(".snapshot.tmp-old-" in name for name in left)
    # The next stage start (here one that stops at once: no params file) settles it.
    (tmp_path / "dvc.yaml").write_text(_SNAPSHOT_DVC_YAML)
    result = run_cmd(["gptpipe", "split", "--params", "absent.yaml", "--input", "a", "--out",
                      "b", "--metrics", "c"], tmp_path, check=False)
    assert result.returncode == 2 and "params file not found" in result.stderr
    assert (snapshot / "state.json").read_text() == kept
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["snapshot"]


def test_the_next_writer_puts_an_aside_snapshot_back_before_it_writes(tmp_path):
    snapshot = _killed_fallback_writer(tmp_path, kill_after=1)
    # A stage started by hand elsewhere sweeps nothing; its own write fails half-way.
    with pytest.raises(RuntimeError, match="stopped"), io.atomic_dir(snapshot) as tmp:
        (tmp / "state.json").write_text("half")
        raise RuntimeError("stopped")
    assert (snapshot / "state.json").read_text() == "old"
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["snapshot"]


def test_a_failed_move_in_puts_the_previous_output_back_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "state.json").write_text("old")
    # The move-in (the second rename) fails instead of the process dying.
    result = subprocess.run([sys.executable, "-c", _FALLBACK_WRITER, str(out), "2", "fail"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "could not write (Input/output error)" in result.stderr
    assert (out / "state.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ two writers at once

_SLOW_WRITER = """
import sys
from pipeline.core import io

with io.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "part").write_text("slow")
    print("written", flush=True)
    sys.stdin.readline()  # until the other writer has finished
"""


def test_two_writers_of_one_output_never_delete_each_others_temporary(tmp_path):
    out = tmp_path / "tokens"
    slow = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], cwd=REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert slow.stdout.readline() == "written\n"
        with io.atomic_dir(out) as tmp:  # starts and finishes while the slow one writes
            (tmp / "part").write_text("quick")
        assert (out / "part").read_text() == "quick"
        _, errors = slow.communicate("go\n", timeout=60)
    finally:
        slow.kill()
    assert slow.returncode == 0, errors
    assert (out / "part").read_text() == "slow"  # the last to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
