"""An output folder replaces only what gptpipe wrote: an empty folder, a previous output of
the same kind, or an output that the working directory's dvc.yaml declares; never a
user's folder named by mistake (``--out models``, ``--out ~/hf-models``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, run_cmd, save_tiny_checkpoint, synthetic_documents

from pipeline.core import io
from pipeline.core.errors import GptpipeError


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _users_folder(path: Path) -> Path:
    (path / "llama-7b").mkdir(parents=True)
    (path / "llama-7b" / "model.safetensors").write_bytes(b"years of work")
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("known_up_front", [True, False], ids=["names-given", "names-found"])
def test_a_folder_holding_other_things_is_refused_and_left_as_it_was(tmp_path, known_up_front):
    out = _users_folder(tmp_path / "hf-models")
    before = _tree(tmp_path)
    ran = []
    writes = ("config.json", "model.safetensors") if known_up_front else ()
    with pytest.raises(GptpipeError) as caught, io.atomic_dir(out, writes=writes) as tmp:
        ran.append(True)
        (tmp / "config.json").write_text("{}")
    message = caught.value.format_message()
    assert message.startswith(f"{out}: refusing to replace a folder that gptpipe did not write")
    assert "'llama-7b'" in message and "\n" not in message
    assert _tree(tmp_path) == before  # nothing replaced, no temporary left
    # Names known up front: refused before the (possibly long) work, not after it.
    assert ran == ([] if known_up_front else [True])


def test_a_previous_output_of_the_same_kind_is_replaced(tmp_path):
    out = tmp_path / "tokens"
    with io.atomic_dir(out) as tmp:
        for name in ("train", "val", "meta.json"):
            (tmp / name).write_text("old")
    with io.atomic_dir(out) as tmp:  # the same entries and one more
        for name in ("train", "val", "test", "meta.json"):
            (tmp / name).write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == dict.fromkeys(
        ["train", "val", "test", "meta.json"], "new")


def test_a_previous_output_with_more_numbered_parts_is_replaced(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    for index in range(3):
        (out / f"part-{index:05d}.parquet").write_text("old")
    with io.atomic_dir(out) as tmp:  # a smaller corpus: one part
        (tmp / "part-00000.parquet").write_text("new")
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    # A name of another family is not the output's, numbered or not.
    (out / "model-00001-of-00002.safetensors").write_text("mine")
    with pytest.raises(GptpipeError, match=r"'model-00001-of-00002\.safetensors'"), \
            io.atomic_dir(out) as tmp:
        (tmp / "part-00000.parquet").write_text("new")


def test_an_empty_folder_is_replaced_and_a_file_in_its_place_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with io.atomic_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").read_text() == "a"
    mine = tmp_path / "mine"
    mine.write_text("a user's file")
    refused = "mine: refusing to replace a file or a link that gptpipe did not write"
    with pytest.raises(GptpipeError, match=refused), io.atomic_dir(mine) as tmp:
        (tmp / "a").write_text("a")
    assert mine.read_text() == "a user's file"


def test_a_declared_output_of_the_dvc_yaml_here_is_dvcs_to_replace(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "pretrain": {"cmd": "gptpipe pretrain", "outs": [
            "models/pretrain", {"checkpoints/pretrain": {"persist": True}}]},
    }}))
    monkeypatch.chdir(tmp_path)
    for out in (Path("models/pretrain"), tmp_path / "checkpoints/pretrain/snapshot"):
        out.mkdir(parents=True)
        (out / "from-another-version").write_text("x")
        with io.atomic_dir(out) as tmp:
            (tmp / "best").write_text("new")
        assert sorted(p.name for p in out.iterdir()) == ["best"]
    # A folder above a declared output is no output.
    with pytest.raises(GptpipeError, match=r"models: refusing .* holds 'pretrain'"), \
            io.atomic_dir(Path("models")) as tmp:
        (tmp / "best").write_text("new")
    assert (tmp_path / "models" / "pretrain" / "best").read_text() == "new"


def test_declared_outputs_are_every_out_metric_and_plot_beside_its_wdir(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  s:\n    wdir: sub\n    outs: [out/x, {y: {cache: false}}]\n"
                        "    metrics: [m.json]\n    plots: [{p: {x: step}}, '${v}']\n"
                        "  t:\n    foreach: [1, 2]\n    do: {cmd: c, outs: [z]}\n")
    assert io.declared_outputs(dvc_yaml) == [tmp_path / "sub" / name
                                            for name in ("out/x", "y", "m.json", "p")]
    for text in ("", "[1, 2]", "stages: [a, b]", "stages:\n  s:\n    outs: [{}, 7, null]\n"):
        dvc_yaml.write_text(text)
        assert io.declared_outputs(dvc_yaml) == [], text
    assert io.declared_outputs(tmp_path / "absent.yaml") == []


def test_every_output_of_the_projects_dvc_yaml_is_declared():
    outputs = {p.relative_to(REPO_ROOT).as_posix()
               for p in io.declared_outputs(REPO_ROOT / "dvc.yaml")}
    assert {"data/tokens", "models/pretrain", "checkpoints/pretrain", "models/hf/pretrain",
            "dvclive/pretrain/plots/metrics"} <= outputs


# --------------------------------------------------------------------- by hand, for real


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    save_tiny_checkpoint(root, synthetic_documents(20), "word", n_layer=1)
    (root / "params.yaml").write_text("export:\n  dtype: float32\n")
    return root


def _export(model: Path, out: Path, cwd: Path):
    return run_cmd(["gptpipe", "export", "--params", str(model / "params.yaml"), "--model",
                    str(model / "model"), "--out", str(out)], cwd, check=False)


def test_export_by_hand_never_deletes_a_folder_of_models(model, tmp_path):
    """``gptpipe export --out models`` (meant: models/hf/pretrain) used to delete every
    model; ``--out ~/hf-models`` that folder for good."""
    models = tmp_path / "models"
    save_tiny_checkpoint(models / "pretrain", synthetic_documents(20), "word", n_layer=1)
    for out in (models, _users_folder(tmp_path / "hf-models")):
        before = _tree(out)
        result = _export(model, out, tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith(f"Error: {out}: refusing to replace")
        assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-models", "models"]


def test_export_by_hand_replaces_its_own_previous_export(model, tmp_path):
    out = tmp_path / "hf"
    for _ in range(2):
        result = _export(model, out, tmp_path)
        assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # An empty folder made for it is fine too.
    (tmp_path / "empty").mkdir()
    assert _export(model, tmp_path / "empty", tmp_path).returncode == 0
