"""A weighted list of rewards (``rlhf.reward: [{reward: ..., weight: ...}, ...]``): RL
maximizes the weighted sum, each component is logged apart (a weight of 0: logged, not
optimized), and a bad list is one line with nothing written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_rlhf import (
    DOCUMENTS,
    make_stage_inputs,
    rlhf_params,
    stage_args,
    tiny_gpt,
    toy_prompts,
)

from pipeline.alignment.policy_eval import PolicyEval, component_metrics, mean_and_se
from pipeline.alignment.preference_data import Pair, write_pairs_jsonl
from pipeline.alignment.rewards import Component, WeightedReward, make_reward, weighted_sum
from pipeline.alignment.rollout import score_with_components
from pipeline.alignment.tuner import Tuner
from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.params import RewardTerm, load_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULE = "data/builtin/example_rewards.py"


def _constant(*values: float):
    """A scorer giving row i the value values[i % len(values)]."""

    def score(prompt_ids, completion_ids):
        return torch.tensor([values[i % len(values)] for i in range(len(completion_ids))])

    return score


def _length(prompt_ids, completion_ids):
    return torch.tensor([float(len(ids)) for ids in completion_ids])


# ------------------------------------------------------------------------- the arithmetic


def test_the_weighted_sum_is_the_hand_computed_one():
    values = {"a": torch.tensor([1.0, 2.0, -4.0]), "b": torch.tensor([4.0, -8.0, 0.5]),
              "c": torch.tensor([100.0, 7.0, 3.0])}
    total = weighted_sum(values, {"a": 1.0, "b": 0.25, "c": 0.0})
    # a + b / 4, c left out: [1 + 1, 2 - 2, -4 + 0.125]
    assert total.dtype == torch.float32
    assert total.tolist() == [2.0, 0.0, -3.875]


def test_a_zero_weight_adds_nothing_not_even_an_infinity():
    values = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([math.inf, -math.inf])}
    assert weighted_sum(values, {"a": 2.0, "b": 0.0}).tolist() == [2.0, 4.0]


def test_a_weighted_reward_scores_the_sum_and_gives_every_component():
    reward = WeightedReward([Component("a", 1.0, _constant(1.0, 3.0)),
                             Component("length", 0.5, _length),
                             Component("off", 0.0, _constant(-10.0))])
    prompts, completions = [[5], [6]], [[7, 8, 9, 10], []]
    total, parts = score_with_components(reward, prompts, completions)
    # 1 + 0.5 * 4 and 3 + 0.5 * 0; "off" is scored but adds nothing.
    assert total.tolist() == [3.0, 3.0]
    assert reward(prompts, completions).tolist() == [3.0, 3.0]
    assert {name: v.tolist() for name, v in parts.items()} == {
        "a": [1.0, 3.0], "length": [4.0, 0.0], "off": [-10.0, -10.0]}


def test_a_single_reward_has_no_components():
    total, parts = score_with_components(_constant(2.0), [[5]], [[7]])
    assert total.tolist() == [2.0] and parts == {}


def test_make_reward_builds_one_scorer_per_list_entry():
    terms = [RewardTerm("model", 1.0), RewardTerm("gold", 0.0)]
    sources = {"reward_model_scorer": _constant(0.5), "judge": _ConstantJudge(0.25),
               "tokenizer": None, "pretrained": None, "likelihood_per_token": True}
    single = make_reward("model", {}, **sources)
    assert single is sources["reward_model_scorer"]  # one reward: the scorer as before
    listed = make_reward(terms, {}, **sources)
    assert isinstance(listed, WeightedReward)
    assert [(c.name, c.weight) for c in listed.components] == [("model", 1.0), ("gold", 0.0)]


class _ConstantJudge:
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, prompt: str, completion: str) -> float:
        return self.value


def test_mean_and_se_are_the_hand_computed_ones():
    # mean 2; sample variance (1 + 1 + 0 + 0) / 3; se = sqrt(2 / 3 / 4)
    mean, error = mean_and_se([1.0, 3.0, 2.0, 2.0])
    assert mean == 2.0 and error == pytest.approx(math.sqrt(1 / 6), rel=1e-12)
    assert mean_and_se([5.0]) == (5.0, None)


def test_component_metrics_are_flat_keys_with_standard_errors():
    start = _evaluation({"a": [1.0, 3.0], "off": [0.0, 0.0]})
    best = _evaluation({"a": [4.0, 4.0], "off": [1.0, 2.0]})
    assert component_metrics(start, best) == {
        "reward_a_before": 2.0, "reward_a_before_se": 1.0,
        "reward_a_after": 4.0, "reward_a_after_se": 0.0,
        "reward_off_before": 0.0, "reward_off_before_se": 0.0,
        "reward_off_after": 1.5, "reward_off_after_se": 0.5}
    assert component_metrics(_evaluation({}), _evaluation({})) == {}


def _evaluation(components: dict[str, list[float]]) -> PolicyEval:
    return PolicyEval(0.0, 0.0, 0.0, 0.0, 0.0, [[4]], components)


def test_a_single_rewards_snapshot_record_is_as_before():
    assert "components" not in _evaluation({}).to_json()
    listed = _evaluation({"a": [1.5]})
    assert PolicyEval.from_json(json.loads(json.dumps(listed.to_json()))) == listed


# ------------------------------------------------------------------------- in the RL loop


def test_the_tuner_logs_each_component_of_every_rollout_and_evaluation():
    reward = WeightedReward([Component("a", 1.0, _constant(1.0, 3.0)),
                             Component("off", 0.0, _length)])
    logged: dict[str, list[float]] = {}
    params = rlhf_params(algo="reinforce", steps=2, eval_every=1, batch_size=4,
                         minibatch_size=4, eval_prompts=4)
    tuner = Tuner(tiny_gpt(), params, reward, lambda p, c: 0.0, toy_prompts(4, 1),
                  toy_prompts(4, 2))
    result = tuner.run(log=lambda step, m: [logged.setdefault(k, []).append(v)
                                            for k, v in m.items()])
    assert logged["reward/a"] == [2.0, 2.0]  # rows alternate 1 and 3
    assert logged["eval/rewards/a"] == [2.0, 2.0, 2.0]  # steps 0, 1, 2
    # The weight-0 component is logged (completion lengths), yet adds nothing: the sum
    # RL maximizes is component a's.
    assert len(logged["reward/off"]) == 2 and len(logged["eval/rewards/off"]) == 3
    assert logged["eval/reward"] == [2.0, 2.0, 2.0]
    lengths = result.best.components["off"]
    assert len(lengths) == 4 and all(0 <= n <= params.max_new_tokens for n in lengths)


@pytest.mark.parametrize(("rising_weight", "best_step"), [(0.0, 0), (1.0, 10)])
def test_select_by_reward_reads_the_weighted_sum(rising_weight, best_step):
    # By construction, not by learning: one component rises with every call of the
    # reward (each rollout and evaluation batch calls it once), the other falls as much;
    # the weights say which one the sum, and so the best policy, follows.
    calls: list[int] = []

    def rising(prompt_ids, completion_ids):
        calls.append(1)
        return torch.full((len(completion_ids),), float(len(calls)))

    def falling(prompt_ids, completion_ids):
        return torch.full((len(completion_ids),), -float(len(calls)))

    reward = WeightedReward([Component("rising", rising_weight, rising),
                             Component("falling", 1.0 - rising_weight, falling)])
    params = rlhf_params(algo="reinforce", steps=10, eval_every=5, batch_size=4,
                         minibatch_size=4, select_by="reward")
    result = Tuner(tiny_gpt(), params, reward, lambda p, c: 0.0, toy_prompts(4, 1),
                   toy_prompts(4, 2)).run()
    assert result.best_step == best_step
    # Both components are logged whatever their weight.
    rising_means = [result.start.components["rising"], result.last.components["rising"]]
    assert rising_means[1][0] > rising_means[0][0]


# ------------------------------------------------------------------------ the rlhf stage


def _list(*terms: tuple[str, float]) -> list[dict]:
    return [{"reward": reward, "weight": weight} for reward, weight in terms]


def _four_heldout_prompts(root) -> None:
    """Four evaluation prompts instead of one, so that every mean has a standard error."""
    pairs = [Pair(text[:12], text[12:30], text[30:40]) for text in DOCUMENTS[:4]]
    write_pairs_jsonl(root / "prefs/heldout.jsonl", pairs)


def test_a_weighted_list_runs_and_reports_every_component(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "mine.py"
    module.write_text("def length(prompts, completions, **kwargs):\n"
                      "    return [float(len(c)) for c in completions]\n")
    reward = _list(("model", 1.0), (f"python:{module}:length", 0.25), ("gold", 0.0))
    root = make_stage_inputs(tmp_path, rlhf={"reward": reward,
                                             "reward_module": str(module)})["root"]
    _four_heldout_prompts(root)
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    assert "reward 1*model + 0.25*length + 0*gold" in result.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["reward"] == "1*model + 0.25*length + 0*gold"
    for name in ("model", "length", "gold"):
        for when in ("before", "after"):
            assert isinstance(metrics[f"reward_{name}_{when}"], float)
            assert metrics[f"reward_{name}_{when}_se"] >= 0
    # The reward is the weighted sum of the components' means (gold adds nothing), up to
    # the 6-decimal rounding; the reward model's own score is the model component.
    for when in ("before", "after"):
        expected = metrics[f"reward_model_{when}"] + 0.25 * metrics[f"reward_length_{when}"]
        assert metrics[f"reward_{when}"] == pytest.approx(expected, abs=1e-5)
        assert metrics[f"reward_model_{when}"] == pytest.approx(metrics[f"rm_{when}"],
                                                                abs=1e-6)
        assert metrics[f"reward_gold_{when}"] == pytest.approx(metrics[f"gold_{when}"],
                                                               abs=1e-6)
    # dvclive: each component of every rollout (steps 1-4) and evaluation (0, 2, 4).
    plots = root / "live/plots/metrics"
    for name in ("model", "length", "gold"):
        assert _logged_steps(plots / f"reward/{name}.tsv") == [1, 2, 3, 4], name
        assert _logged_steps(plots / f"eval/rewards/{name}.tsv") == [0, 2, 4], name


def _logged_steps(tsv) -> list[int]:
    """The steps of a dvclive metric's plot file."""
    header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    column = header.index("step")
    return [int(row[column]) for row in rows]


def test_a_single_reward_logs_no_components(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"steps": 2})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["reward"] == "model"
    assert not [key for key in metrics if key.startswith("reward_model")]
    assert not (root / "live/plots/metrics/reward").exists()


def test_a_list_with_dpo_is_evaluated_not_optimized(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"algo": "dpo", "steps": 2, "reward": _list(
        ("model", 1.0), ("gold", 0.0))})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    assert "the reward is evaluated and reported, not optimized" in result.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert "reward_gold_after_se" in metrics


def test_a_batched_reward_in_a_list_returning_too_few_values_is_one_line(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "mine.py"
    module.write_text("def short(prompts, completions, **kwargs):\n"
                      "    return [1.0] * (len(completions) - 1)\n")
    root = make_stage_inputs(tmp_path, rlhf={
        "reward": _list(("model", 1.0), (f"python:{module}:short", 0.0)),
        "reward_module": str(module)})["root"]
    _four_heldout_prompts(root)
    # Weight 0: not optimized, yet scored, so what it returns is checked all the same.
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"rlhf.reward = python:{module}:short returned 3 values " \
        "for 4 completions" in lines[0], lines
    for output in ("out", "ckpt", "metrics.json"):
        assert not (root / output).exists(), output


def test_the_functions_of_one_file_are_imported_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    imports = tmp_path / "imports.txt"
    module = tmp_path / "counted.py"
    module.write_text(f"with open({str(imports)!r}, 'a') as log:\n"
                      "    log.write('imported\\n')\n"
                      "def one(prompt, completion):\n    return 1.0\n"
                      "def two(prompts, completions):\n    return [2.0] * len(completions)\n")
    root = make_stage_inputs(tmp_path, rlhf={
        "reward": _list((f"python:{module}:one", 1.0), (f"python:{module}:two", 1.0)),
        "reward_module": str(module), "steps": 2})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    assert imports.read_text().splitlines() == ["imported"]
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["reward_one_after"] == 1.0 and metrics["reward_two_after"] == 2.0
    assert metrics["reward_after"] == 3.0


# ------------------------------------------------------------------------- bad lists


@pytest.mark.parametrize(("reward", "needle"), [
    ("[]", "rlhf.reward = []; allowed: a reward name or a non-empty list"),
    ("[{reward: model, wieght: 1}]",
     "rlhf.reward[0]: unknown key 'wieght'; allowed: reward, weight"),
    ("[{weight: 1}]", "rlhf.reward[0]: key 'reward' missing"),
    ("[{reward: model, weight: .nan}]", "rlhf.reward[0].weight = nan; allowed: a finite number"),
    ("[{reward: model, weight: .inf}]", "rlhf.reward[0].weight = inf; allowed: a finite number"),
    ("[{reward: model, weight: -0.5}]", "rlhf.reward[0].weight = -0.5; allowed: a number >= 0"),
    ("[{reward: model, weight: 0}, {reward: gold, weight: -0.0}]",
     "rlhf.reward = '0*model + -0*gold'; allowed: weights with a sum > 0"),
    ("[{reward: modle, weight: 1}]",
     "rlhf.reward[0].reward = 'modle'; allowed: model, gold, likelihood or python:"),
    ("[{reward: model}, {reward: model, weight: 2}]",
     "rlhf.reward[1].reward = 'model'; allowed: each reward once in the list"),
    ("[model, gold]", "rlhf.reward[0] = 'model' (str); allowed: {reward: ..., weight: ...}"),
    (f"[{{reward: 'python:{MODULE}:gold'}}]",
     "allowed: a function not named gold"),
    ("[{reward: 'python:rewards/other.py:score'}]",
     "set rlhf.reward_module to the same file"),
], ids=["empty", "unknown key", "no reward", "nan", "inf", "negative", "zero sum",
        "unknown reward", "twice", "not a mapping", "builtin name", "other file"])
def test_a_bad_list_is_one_line(tmp_path, reward, needle):
    path = tmp_path / "params.yaml"
    path.write_text(f"rlhf:\n  reward: {reward}\n")
    with pytest.raises(GptpipeError) as raised:
        load_params(path)
    message = str(raised.value)
    assert needle in message and message.startswith(f"{path}: ") and "\n" not in message


def test_a_list_of_good_terms_reads_as_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(f"rlhf:\n  reward:\n    - {{reward: model, weight: 1.0}}\n"
                    f"    - {{reward: 'python:{MODULE}:concise', weight: 0.2}}\n"
                    "    - {reward: gold, weight: 0}   # logged, not optimized\n"
                    "    - {reward: likelihood}\n")
    rlhf = load_params(path).rlhf
    assert rlhf.weighted and [(t.name, t.weight) for t in rlhf.reward_terms()] == [
        ("model", 1.0), ("concise", 0.2), ("gold", 0.0), ("likelihood", 1.0)]
    assert rlhf.python_rewards() == {f"python:{MODULE}:concise": (MODULE, "concise")}
    assert rlhf.reward_label() == "1*model + 0.2*concise + 0*gold + 1*likelihood"


def test_a_bad_list_stops_the_stage_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_stage_inputs(tmp_path, rlhf={"reward": _list(("model", 0.0))})["root"]
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "weights with a sum > 0" in lines[0], lines
    for output in ("out", "ckpt", "live", "metrics.json"):
        assert not (root / output).exists(), output


def test_the_documented_list_and_error_are_what_gptpipe_reads_and_says(tmp_path,
                                                                        monkeypatch):
    docs = (Path(__file__).parents[1] / "docs/trl.md").read_text(encoding="utf-8")
    section = docs[docs.index("## A weighted list of rewards"):]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(block)
    rlhf = load_params("params.yaml").rlhf
    assert [(t.name, t.weight) for t in rlhf.reward_terms()] == [
        ("model", 1.0), ("concise", 0.2), ("gold", 0.0)]
    (error,) = re.findall(r"^    Error: (.*)$", section, re.MULTILINE)
    (tmp_path / "params.yaml").write_text(
        "rlhf:\n  reward:\n    - {reward: model}\n    - {reward: gold, weight: .nan}\n")
    with pytest.raises(GptpipeError, match=re.escape(error)):
        load_params("params.yaml")
