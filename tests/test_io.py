"""Atomic outputs: temporaries of dead writers swept at every stage start, data flushed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

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
    (tmp_path / f".snapshot.tmp-old-{dead}").mkdir()
    # A live writer's, an output, other files, and names whose tail is no pid (a date
    # above pid_max, non-ASCII digits): none of them is a dead writer's temporary.
    kept = [f".vocab.tmp-{alive}", "tokens", ".gitignore", ".notes.tmp-draft",
            ".notes.tmp-20240101999", ".x.tmp-\u00b2", ".y.tmp-0"]
    for name in kept:
        (tmp_path / name).mkdir()
    removed = io.sweep_dead_temporaries([tmp_path, tmp_path / "absent"])
    assert sorted(p.name for p in removed) == sorted(
        [f".tokens.tmp-{dead}", f".ingest.json.tmp-{dead}", f".snapshot.tmp-old-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


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
