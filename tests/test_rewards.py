"""What RL maximizes: each builtin reward and a user's function raise a toy target; early
stopping; and the bad inputs of a python: reward, each one line with nothing written.

The toy policy is a tiny random GPT over a char vocabulary of exactly 32 ids (4 special
tokens and 28 characters), so its texts can be judged as text.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from test_rlhf import make_stage_inputs, rlhf_params, stage_args, tiny_gpt, toy_prompts

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.policy import frozen_copy
from pipeline.alignment.rewards import (
    completion_logprob,
    is_batched,
    load_function,
    make_scorer,
)
from pipeline.alignment.tuner import Tuner
from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.params import GoldParams, VocabParams
from pipeline.data.tokenizer import BOS_ID, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


@pytest.fixture(scope="module")
def tokenizer():
    made = train_tokenizer(VocabParams(kind="char", min_freq=1), [ALPHABET])
    assert made.vocab_size == 32  # the toy policy's vocabulary
    return made


def _dot_share(prompt: str, completion: str) -> float:
    return completion.count(".") / max(len(completion), 1)


def _tune(scorer, gold, **settings):
    params = rlhf_params(algo="reinforce", lr=1e-2, steps=30, **settings)
    return Tuner(tiny_gpt(), params, scorer, gold, toy_prompts(16, 1), toy_prompts(32, 2)).run()


def _text_gold(tokenizer, function):
    scorer = make_scorer("gold", None, reward_model_scorer=None,
                         judge=_FunctionJudge(function), tokenizer=tokenizer, pretrained=None,
                         likelihood_per_token=True)

    def gold(prompt: list[int], completion: list[int]) -> float:
        return float(scorer([prompt], [completion])[0])

    return gold


class _FunctionJudge:
    """A judge whose score is a function of the texts (what the gold reward calls)."""

    def __init__(self, function) -> None:
        self.score = function


@pytest.mark.parametrize("source", [
    "def dots(prompt, completion):\n"
    "    return completion.count('.') / max(len(completion), 1)\n",
    # TRL's reward function: the batch's texts by name, one value per completion.
    "def dots(prompts, completions, **kwargs):\n"
    "    return [c.count('.') / max(len(c), 1) for c in completions]\n",
], ids=["one sample", "batched"])
def test_a_python_reward_from_a_file_is_raised(tokenizer, tmp_path, source):
    module = tmp_path / "my_rewards.py"
    module.write_text(source)
    name = f"python:{module}:dots"
    scorer = make_scorer(name, load_function(str(module), "dots", name),
                         reward_model_scorer=None, judge=None, tokenizer=tokenizer,
                         pretrained=None, likelihood_per_token=True)
    result = _tune(scorer, _text_gold(tokenizer, _dot_share))
    assert result.start.reward < 0.1  # about one character in 31 is a "."
    assert result.best.reward > result.start.reward + 0.2
    assert result.best.gold_score == result.best.reward  # the gold here is the same rule


def test_the_gold_reward_optimizes_the_judge_itself(tokenizer):
    # A judge that only rewards a complete sentence: RL learns to end on a ".".
    params = GoldParams(repetition_weight=0.0, complete_sentence_weight=1.0, unk_weight=0.0,
                        length_weight=0.0, overlap_weight=0.0, empty_weight=0.0)
    judge = GoldJudge(params)
    scorer = make_scorer("gold", None, reward_model_scorer=None, judge=judge,
                         tokenizer=tokenizer, pretrained=None, likelihood_per_token=True)
    result = _tune(scorer, _text_gold(tokenizer, judge.score), max_new_tokens=6)
    assert result.best.reward > result.start.reward + 0.2


def test_the_likelihood_reward_raises_the_pretrained_models_likelihood(tokenizer):
    # A "pretrained" model with sharp preferences (its tied embedding scaled up makes its
    # next-token distributions peaked), and a policy that starts near uniform.
    pretrained = tiny_gpt(seed=4)
    with torch.no_grad():
        pretrained.wte.weight.mul_(30.0)
    scorer = make_scorer("likelihood", None, reward_model_scorer=None, judge=None,
                         tokenizer=tokenizer, pretrained=frozen_copy(pretrained),
                         likelihood_per_token=True)
    result = _tune(scorer, lambda p, c: 0.0, select_by="reward")
    assert result.best.reward > result.start.reward + 0.5, (result.start.reward,
                                                            result.best.reward)


def test_completion_logprob_is_each_rows_own_log_probability():
    model = frozen_copy(tiny_gpt(seed=3))
    prompts, completions = [[5, 6], [7]], [[8, 9, 10], []]
    per_token = completion_logprob(model, prompts, completions, per_token=True)
    total = completion_logprob(model, prompts, completions, per_token=False)
    ids = torch.tensor([[BOS_ID, 5, 6, 8, 9, 10]])
    logp = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)[0]  # (5, V)
    expected = sum(float(logp[position - 1, ids[0, position]]) for position in (3, 4, 5))
    assert total[0] == pytest.approx(expected, abs=1e-5)
    assert per_token[0] == pytest.approx(expected / 3, abs=1e-5)
    # No completion token: the log-probability of a uniform guess, never 0 (the best).
    assert per_token[1] == total[1] == pytest.approx(-math.log(32))


def test_early_stopping_stops_after_patience_evaluations_without_progress(tmp_path, capsys):
    # A gold score that never moves: nothing beats step 0, so with an evaluation every
    # 2 steps and patience 3 the run stops at the third evaluation after it, step 6.
    params = rlhf_params(algo="reinforce", lr=1e-2, steps=30, eval_every=2, patience=3)
    tuner = Tuner(tiny_gpt(), params, lambda p, c: torch.zeros(len(c)), lambda p, c: 0.0,
                  toy_prompts(16, 1), toy_prompts(8, 2), state_dir=tmp_path, fingerprint="f")
    result = tuner.run()
    assert result.stopped_early and result.steps == 6 and result.best_step == 0
    snapshot = json.loads((tmp_path / "snapshot/state.json").read_text())
    assert snapshot["step"] == 6 and snapshot["stopped_early"] is True
    # Run again on the same folder: the run is over, nothing is trained.
    capsys.readouterr()
    again = Tuner(tiny_gpt(), params, lambda p, c: torch.zeros(len(c)), lambda p, c: 0.0,
                  toy_prompts(16, 1), toy_prompts(8, 2), state_dir=tmp_path, fingerprint="f")
    assert "finished at step 6: writing its outputs" in capsys.readouterr().out
    assert again.run().steps == 6


def test_a_better_evaluation_resets_the_patience(tmp_path):
    # Gold rises at every evaluation (a counter): patience 1 never runs out.
    calls = []

    def rising(prompt, completion):
        calls.append(1)
        return float(len(calls))

    params = rlhf_params(algo="reinforce", steps=6, eval_every=2, patience=1)
    result = Tuner(tiny_gpt(), params, lambda p, c: torch.zeros(len(c)), rising,
                   toy_prompts(16, 1), toy_prompts(8, 2)).run()
    assert not result.stopped_early and result.steps == 6 and result.best_step == 6


def test_select_by_reward_keeps_the_best_reward(tmp_path):
    # By construction, not by learning: the reward rises with every call of the scorer
    # (each rollout and each evaluation batch calls it once) and the gold score falls
    # with every evaluation, so by reward the last evaluation is the best and by gold
    # the first would be.
    golds, rewards = [], []

    def falling_gold(prompt, completion):
        golds.append(1)
        return -float(len(golds))

    def rising_reward(prompts, completions):
        rewards.append(1)
        return torch.full((len(completions),), float(len(rewards)))

    params = rlhf_params(algo="reinforce", lr=1e-2, steps=20, eval_every=5, select_by="reward")
    result = Tuner(tiny_gpt(), params, rising_reward, falling_gold, toy_prompts(16, 1),
                   toy_prompts(32, 2)).run()
    assert result.best_step == 20  # by gold it would stay 0
    assert result.best.reward > result.start.reward
    assert result.best.gold_score < result.start.gold_score


def _python_scorer(tokenizer, module, function):
    name = f"python:{module}:{function}"
    return make_scorer(name, load_function(str(module), function, name),
                       reward_model_scorer=None, judge=None, tokenizer=tokenizer,
                       pretrained=None, likelihood_per_token=True)


def test_a_batched_reward_is_told_apart_by_the_names_trl_passes():
    def one(prompt, completion): ...
    def trl(prompts, completions, **kwargs): ...
    def texts(completions, **kwargs): ...
    def ids(completion_ids, **kwargs): ...
    def named_alike(prompt, completion, **kwargs): ...

    assert [is_batched(f) for f in (one, trl, texts, ids, named_alike)] == [
        False, True, True, True, False]


def test_a_trl_reward_function_gets_the_batch_by_name_once(tokenizer, tmp_path):
    module = tmp_path / "trl_style.py"
    module.write_text(
        "calls = []\n"
        "def lengths(prompts, completions, **kwargs):\n"
        "    calls.append((prompts, completions, kwargs))\n"
        "    return [float(len(c)) for c in completions]\n"
        "def prompt_is_ab(prompts, completions):\n"  # no **kwargs: given only these two
        "    return [float(p == 'ab') for p in prompts]\n")
    prompts = tokenizer.encode_batch(["ab", "c"])
    completions = tokenizer.encode_batch([" x.", "yz"])
    values = _python_scorer(tokenizer, module, "lengths")(prompts, completions)
    assert values.tolist() == [3.0, 2.0]
    import gptpipe_reward_trl_style as loaded  # the module load_function ran

    assert loaded.calls == [(["ab", "c"], [" x.", "yz"], {"completion_ids": completions})]
    values = _python_scorer(tokenizer, module, "prompt_is_ab")(prompts, completions)
    assert values.tolist() == [1.0, 0.0]


def test_trls_own_reward_functions_score_as_they_do_in_trl(tokenizer, tmp_path):
    pytest.importorskip("trl")
    module = tmp_path / "from_trl.py"
    module.write_text("from trl.rewards import get_repetition_penalty_reward\n"
                      "repetition = get_repetition_penalty_reward(ngram_size=2, "
                      "max_penalty=-1.0)\n")
    # TRL's own example: no 2-gram repeats in [5, 6, 7, 8]; 3 of 4 do in five 9s.
    values = _python_scorer(tokenizer, module, "repetition")([[4], [4]],
                                                             [[5, 6, 7, 8], [9] * 5])
    assert values.tolist() == [0.0, -0.75]


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("body", "needle"), [
    ("def score(prompt, completion:\n", "importing"),
    ("import not_a_module_anywhere\n", "raised ModuleNotFoundError"),
    ("def other(prompt, completion):\n    return 1.0\n", "has no function 'score'"),
    ("def score(prompt, completion):\n    return 1 / 0\n", "raised ZeroDivisionError"),
    ("def score(prompt, completion):\n    return float('nan')\n",
     "returned nan for the completion"),
    ("def score(prompt, completion):\n    return 'good'\n",
     "returned 'good' for the completion"),
    ("def score(prompt, completion):\n    return True\n", "returned True"),
    ("def score(text):\n    return 1.0\n", "score cannot be called with (prompt, completion)"),
    # TRL's batched form: one finite number per completion, or one line.
    ("def score(prompts, completions, **kwargs):\n    return [1.0] * (len(completions) + 1)\n",
     "returned 2 values for 1 completion; allowed: a list of one finite number per"),
    ("def score(prompts, completions, **kwargs):\n    return 1.0\n", "returned a float for"),
    ("def score(completions, **kwargs):\n    return [float('inf')] * len(completions)\n",
     "returned inf for the completion"),
    ("def score(prompts, completions, **kwargs):\n    return [None for c in completions]\n",
     "returned None for the completion"),
    ("def score(prompts, completions, **kwargs):\n    raise KeyError('answer')\n",
     "raised KeyError ('answer') on a batch of"),
], ids=["syntax", "import", "no function", "raises", "nan", "not a number", "bool",
        "one argument", "batched count", "batched scalar", "batched inf", "batched None",
        "batched raises"])
def test_a_bad_python_reward_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, body,
                                                                needle):
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "mine.py"
    module.write_text(body)
    root = make_stage_inputs(tmp_path, rlhf={"reward": f"python:{module}:score",
                                             "reward_module": str(module)})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "rlhf.reward = python:" in lines[0]
    for output in ("out", "ckpt", "metrics.json"):
        assert not (root / output).exists(), output


def test_a_python_reward_module_is_imported_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    imports = tmp_path / "imports.txt"
    module = tmp_path / "counted.py"
    # Each import of the module appends one line: its top level runs once per import.
    module.write_text(f"with open({str(imports)!r}, 'a') as log:\n"
                      "    log.write('imported\\n')\n"
                      "def score(prompt, completion):\n"
                      "    return float(len(completion))\n")
    root = make_stage_inputs(tmp_path, rlhf={"reward": f"python:{module}:score",
                                             "reward_module": str(module), "steps": 2})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    assert imports.read_text().splitlines() == ["imported"]


def test_a_group_algorithm_with_one_sample_per_prompt_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"algo": "grpo", "samples_per_prompt": 1})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2
    assert "rlhf.samples_per_prompt = 1; allowed: 2 or more for rlhf.algo = 'grpo'" in (
        result.output)
    assert not (root / "ckpt").exists()


def test_the_group_algorithms_run_as_a_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"algo": "rloo", "samples_per_prompt": 2,
                                             "reward": "gold"})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["algo"] == "rloo" and metrics["reward"] == "gold"
    # The gold reward is what RL maximizes, and the reward model is still reported.
    assert metrics["reward_before"] == metrics["gold_before"]
    assert metrics["rm_before"] != metrics["reward_before"]


def test_a_python_reward_names_the_module_dvc_tracks():
    with pytest.raises(GptpipeError, match=r"set rlhf\.reward_module to the same file"):
        rlhf_params(reward="python:rewards/mine.py:score")
