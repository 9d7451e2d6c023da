"""The per-item tables of reward, sft and rlhf: what their figures average, with the
figures' intervals beside them; and the RL final evaluation's prompts and errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_reward import _pairs_dir, _run_stage, setup  # noqa: F401 - setup is a fixture
from test_rlhf import make_stage_inputs, stage_args

from pipeline.alignment.policy_eval import PromptScores, opening_prompts
from pipeline.alignment.report import FinalEvaluation, WinRates, final_errors, prompt_table
from pipeline.cli import cli
from pipeline.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_opening_prompts_take_each_long_enough_document_once():
    docs = [[5, 6, 7, 8], [5, 6, 7, 9], [10, 11], [5, 6, 7, 1], [12, 13, 14]]
    stream = np.concatenate([[BOS_ID, *d, EOS_ID] for d in docs]).astype(np.uint16)
    # Openings of 3 ids: [5 6 7] twice (once kept), [10 11] too short, then [12 13 14].
    assert opening_prompts(stream, 3, 10).tolist() == [[BOS_ID, 5, 6, 7], [BOS_ID, 12, 13, 14]]
    assert opening_prompts(stream, 3, 1).tolist() == [[BOS_ID, 5, 6, 7]]
    assert opening_prompts(stream, 9, 5).shape == (0, 10)


def _scores(gold: list[float], kl: list[float]) -> PromptScores:
    values = np.array(gold)
    return PromptScores(values, values + 1, values, np.array(kl), 0.5, [[5]] * len(gold))


def test_final_errors_and_table_by_hand():
    best = _scores([1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5])
    start = _scores([0.0, 0.0, 0.0, 0.0], [0.0] * 4)
    wins = WinRates(0.625, 1.0, ([1.0, 0.5, 0.0, 1.0], [1.0] * 4))
    final = FinalEvaluation(["a", "b", "c", "d"], start, start, best, wins)
    errors = final_errors(final, bpb=type("B", (), {"errors": (0.1, 0.2, 0.3)})())
    # [1, 2, 3, 4]: sample variance 5/3, se sqrt(5/12); outcomes [1, .5, 0, 1]: sample
    # variance 0.6875 / 3, se sqrt(0.229167) / 2.
    assert errors["gold_after_se"] == pytest.approx(math.sqrt(5 / 12), abs=1e-6)
    assert errors["gold_before_se"] == 0.0 and errors["kl_best_se"] == 0.0
    assert errors["win_rate_se"] == pytest.approx(math.sqrt(0.6875 / 3) / 2, abs=1e-6)
    assert errors["win_rate_vs_start_se"] == 0.0
    assert errors["val_bpb_after_se"] == 0.3
    table = prompt_table(final)
    assert table["best_gold"] == [1.0, 2.0, 3.0, 4.0] and table["win"] == [1.0, 0.5, 0.0, 1.0]
    assert len(set(table["prompt_sha256"])) == 4


def test_reward_stage_writes_the_held_out_pairs(setup, tmp_path):  # noqa: F811
    sha = load_tokenizer(setup / "tokenizer.json").sha256
    pairs = _pairs_dir(tmp_path, sha)
    result = _run_stage(setup, tmp_path, pairs)
    assert result.exit_code == 0, result.output
    table_path = tmp_path / "pairs.parquet"
    params = tmp_path / "params.yaml"
    result = CliRunner().invoke(cli, [
        "reward", "--params", str(params), "--model", str(setup / "model"), "--pairs",
        str(pairs), "--out", str(tmp_path / "rm2"), "--metrics", str(tmp_path / "m2.json"),
        "--pair-scores", str(table_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m2.json").read_text())
    rows = pq.read_table(table_path).to_pandas()
    assert len(rows) == metrics["pairs.heldout"] == rows.pair_sha256.nunique()
    for model in ("gpt", "baseline"):
        accuracy = metrics[f"{model}.heldout_accuracy"]
        assert rows[f"{model}_outcome"].mean() == pytest.approx(accuracy, abs=1e-6)
        assert (metrics[f"{model}.heldout_accuracy_lo"] <= accuracy
                <= metrics[f"{model}.heldout_accuracy_hi"])
        assert metrics[f"{model}.heldout_margin_se"] > 0
    margins = rows.gpt_chosen - rows.gpt_rejected
    assert margins.mean() == pytest.approx(metrics["gpt.heldout_margin"], abs=1e-5)
    # The table is optional (a stage run by hand); the figures are the same either way.
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())


def _with_test_split(root: Path) -> None:
    """The val tokens again as the test split (openings for the final evaluation)."""
    shutil.copytree(root / "tokens/val", root / "tokens/test")
    meta = json.loads((root / "tokens/meta.json").read_text())
    meta["splits"]["test"] = meta["splits"]["val"]
    (root / "tokens/meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("final_prompts", [0, 3])
def test_rlhf_stage_writes_its_final_evaluation(tmp_path, monkeypatch, final_prompts):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"final_prompts": final_prompts})["root"]
    _with_test_split(root)
    table_path = tmp_path / "prompts.parquet"
    result = CliRunner().invoke(cli, [*stage_args(root), "--prompt-scores", str(table_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics.json").read_text())
    rows = pq.read_table(table_path).to_pandas()
    # 0: the one distinct held-out prompt; 3: three openings of the (test) documents.
    assert len(rows) == (1 if final_prompts == 0 else 3)
    assert rows.best_gold.mean() == pytest.approx(metrics["gold_after"], abs=1e-6)
    assert rows.pretrained_gold.mean() == pytest.approx(metrics["gold_pretrained"], abs=1e-6)
    assert rows.win.mean() == pytest.approx(metrics["win_rate"], abs=1e-6)
    assert rows.start_kl.abs().max() < 1e-5  # the starting policy is its own reference
    if final_prompts:
        assert metrics["gold_after_se"] is not None and metrics["win_rate_se"] is not None
    else:  # one prompt says nothing of the spread
        assert metrics["gold_after_se"] is None


def test_rlhf_final_prompts_need_a_test_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"final_prompts": 3})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2
    assert "test" in result.output and not (root / "metrics.json").exists()


def test_sft_loss_is_the_ratio_of_its_per_example_sums():
    from pipeline.alignment.sft import EncodedExample, example_losses, sft_loss
    from pipeline.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context=16, n_layer=1, n_head=2, n_embd=16))
    examples = [EncodedExample([BOS_ID, 5, 6, 7, 8, EOS_ID], 3),
                EncodedExample([BOS_ID, 9, 10, 11, EOS_ID], 2),
                EncodedExample([BOS_ID, 12, 13, 14, 15, 16, 17, EOS_ID], 4)]
    nats, tokens = example_losses(model, examples, batch_size=2)
    assert tokens.tolist() == [3, 3, 4]  # targets from the response's first token on
    assert nats.sum() / tokens.sum() == pytest.approx(sft_loss(model, examples), rel=1e-6)
