"""RLHF: PPO, REINFORCE and DPO raise a toy gold score; health checks; the rlhf stage.

The toy task: a tiny random GPT (vocabulary 32) and a judge that likes token 7 (the
score is the share of 7s in the completion). The starting policy writes a 7 about once
in 32 tokens; every algorithm, with fixed seeds, must make 7s clearly more common.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.alignment.inputs import EncodedPair, prompt_tensors
from pipeline.alignment.policy import PolicyWithValue, frozen_copy, make_optimizer
from pipeline.alignment.policy_eval import PolicyEval, evaluate_policy, sequence_kl, win_rate
from pipeline.alignment.preference_data import Pair, read_pairs_jsonl, write_pairs_jsonl
from pipeline.alignment.report import BitsPerByte, WinRates, rlhf_metrics, summary_line
from pipeline.alignment.reward_model import RewardModel, save_reward_model
from pipeline.alignment.rollout import collect_rollout
from pipeline.alignment.tuner import Tuner, TuneResult
from pipeline.alignment.updates import (
    completion_logprob_sums,
    dpo_update,
    grpo_update,
    leave_one_out_baseline,
    ppo_update,
    reinforce_update,
)
from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_json
from pipeline.core.params import VocabParams, parse_params
from pipeline.data.shards import ShardWriter, token_dtype, write_meta
from pipeline.data.tokenizer import BOS_ID, EOS_ID, train_tokenizer
from pipeline.lm.checkpoint import load_model, save_model
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.sampling import SamplingConfig

LIKED = 7
VOCAB = 32
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two cores are shared with other work:
    with more threads than free cores a step waits on spinning threads (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def liked_share(completion: list[int]) -> float:
    return sum(t == LIKED for t in completion) / max(len(completion), 1)


def toy_scorer(prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    return torch.tensor([liked_share(c) for c in completions])


def toy_gold(prompt: list[int], completion: list[int]) -> float:
    return liked_share(completion)


def tiny_gpt(seed: int = 0, vocab: int = VOCAB, context: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, context=context, n_layer=1, n_head=2, n_embd=32))


def toy_prompts(count: int, seed: int) -> torch.Tensor:
    """(count, 4): <bos> + 3 random ordinary tokens."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(4, VOCAB, (count, 3), generator=generator)
    return torch.cat((torch.full((count, 1), BOS_ID), body), dim=1)


def toy_pairs(prompts: torch.Tensor, count: int, seed: int) -> list[EncodedPair]:
    """Chosen: 8 tokens with two 7s; rejected: 8 tokens with none."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index in range(count):
        others = [t for t in torch.randint(4, VOCAB, (12,), generator=generator).tolist()
                  if t != LIKED]
        chosen = [*others[:4], LIKED, LIKED, *others[4:6]]
        pairs.append(EncodedPair(prompts[index % len(prompts)].tolist(), chosen, others[:8]))
    return pairs


def rlhf_params(**overrides):
    settings = {"steps": 30, "batch_size": 16, "minibatch_size": 8, "max_new_tokens": 8,
                "eval_every": 10, "eval_prompts": 32, "device": "cpu", **overrides}
    return parse_params({"rlhf": settings}).rlhf


# ---------------------------------------------------------------------- the three algorithms


@pytest.mark.parametrize(
    ("algo", "lr"), [("ppo", 3e-3), ("reinforce", 1e-2), ("dpo", 1e-2), ("grpo", 3e-3),
                     ("rloo", 1e-2)],
)
def test_each_algorithm_raises_the_toy_gold_score(algo, lr):
    gpt = tiny_gpt()
    train, held_out = toy_prompts(16, seed=1), toy_prompts(32, seed=2)
    logged: dict[str, list[int]] = {}
    tuner = Tuner(gpt, rlhf_params(algo=algo, lr=lr), toy_scorer, toy_gold, train, held_out,
                  toy_pairs(train, 32, seed=3))
    result = tuner.run(log=lambda step, m: [logged.setdefault(k, []).append(step) for k in m])
    start = result.start.gold_score
    assert start < 0.05  # about 1/32 of the tokens are 7s at the start
    assert result.best.gold_score > start + 0.2, (start, result.best.gold_score)
    assert result.best_step > 0
    assert result.last.gold_score > start + 0.1
    # Evaluations at steps 0, 10, 20, 30; the per-update statistics every step.
    assert logged["eval/gold_score"] == [0, 10, 20, 30]
    assert logged["eval/kl"] == [0, 10, 20, 30]
    per_step = {"ppo": ["rm_score", "kl", "entropy", "clip_fraction", "approx_kl",
                        "value_loss", "policy_loss"],
                "reinforce": ["rm_score", "kl", "entropy", "policy_loss"],
                "rloo": ["rm_score", "kl", "entropy", "policy_loss"],
                "grpo": ["rm_score", "kl", "entropy", "policy_loss", "clip_fraction",
                         "kl_term", "advantage_std"],
                "dpo": ["dpo_loss", "reward_accuracy"]}[algo]
    for name in per_step:
        assert logged[name] == list(range(1, 31)), name
    # The kept state is the evaluated best policy: the same fixed-seed samples again.
    best_gpt = tiny_gpt(seed=5)
    best_gpt.load_state_dict(result.best_state)
    again = evaluate_policy(best_gpt, frozen_copy(tiny_gpt()), held_out,
                            SamplingConfig(max_new_tokens=8), 13 + 2, toy_scorer, toy_gold, 16)
    assert again.gold_score == result.best.gold_score
    assert again.completions == result.best.completions


def test_a_kl_penalty_holds_the_policy_nearer_the_reference():
    kls = {}
    for coef in (0.0, 1.0):
        result = Tuner(tiny_gpt(), rlhf_params(lr=3e-3, kl_coef=coef, steps=20), toy_scorer,
                       toy_gold, toy_prompts(16, 1), toy_prompts(32, 2)).run()
        kls[coef] = result.last.kl
    assert kls[1.0] < 0.5 * kls[0.0], kls


def test_evaluation_samples_are_the_same_for_the_same_seed_and_policy():
    gpt, prompts = tiny_gpt(), toy_prompts(8, 4)
    config = SamplingConfig(max_new_tokens=8)
    first, second, other = (
        evaluate_policy(gpt, frozen_copy(gpt), prompts, config, seed, toy_scorer, toy_gold, 3)
        for seed in (3, 3, 4))
    assert first.completions == second.completions
    assert first.completions != other.completions
    assert first.kl == pytest.approx(0.0, abs=1e-6)  # the policy is its own reference


# ------------------------------------------------------------------------- health checks


def _rollout(gpt: GPT, policy: PolicyWithValue, scorer=toy_scorer):
    return collect_rollout(policy, frozen_copy(gpt), toy_prompts(16, 1),
                           SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0),
                           scorer, kl_coef=0.05)


@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_ratio_check_fires_when_rollout_logprobs_are_perturbed(algo):
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    params = rlhf_params(algo=algo)
    optimizer = make_optimizer(policy, params, CPU)

    def update(rollout, number):
        if algo == "ppo":
            return ppo_update(policy, optimizer, rollout, params,
                              torch.Generator().manual_seed(0), number)
        return reinforce_update(policy, optimizer, rollout, params, number)

    rollout = _rollout(gpt, policy)
    assert update(rollout, 1)["ratio_error"] < 1e-5  # in step: the ratio starts at 1
    rollout = _rollout(gpt, policy)
    rollout.logprobs = rollout.logprobs + 0.01 * rollout.mask
    before = [p.detach().clone() for p in gpt.parameters()]
    with pytest.raises(GptpipeError, match="policy and rollout out of step at update 2"):
        update(rollout, 2)
    # Raised before any optimizer step.
    assert all(torch.equal(a, b) for a, b in zip(before, gpt.parameters(), strict=True))


def test_an_entropy_bonus_is_trained_and_reported():
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    rollout = _rollout(gpt, policy)
    for coef in (0.0, 0.01):
        params = rlhf_params(entropy_coef=coef)
        stats = ppo_update(policy, make_optimizer(policy, params, CPU), rollout, params,
                           torch.Generator().manual_seed(0), 1)
        # Without the bonus the rollout's entropy is reported; with it, the minibatches'
        # (the same policy at the first minibatch, a few small steps later after that).
        assert stats["entropy"] == pytest.approx(rollout.entropy, rel=0.05 if coef else 0)
        rollout = _rollout(gpt, policy)


def test_ratio_check_fires_when_the_policy_changed_after_the_rollout():
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    params = rlhf_params()
    rollout = _rollout(gpt, policy)
    with torch.no_grad():
        gpt.blocks[0].mlp.down.weight.mul_(1.5)  # a stale rollout
    with pytest.raises(GptpipeError, match="out of step at update 1"):
        ppo_update(policy, make_optimizer(policy, params, CPU), rollout, params,
                   torch.Generator().manual_seed(0), 1)


@pytest.mark.parametrize("algo", ["ppo", "reinforce", "dpo"])
def test_kl_ceiling_stops_the_run(algo):
    params = rlhf_params(algo=algo, lr=3e-2, kl_ceiling=1e-3, eval_every=2, steps=10)
    train = toy_prompts(16, 1)
    with pytest.raises(GptpipeError, match=r"above rlhf.kl_ceiling = 0.001") as caught:
        Tuner(tiny_gpt(), params, toy_scorer, toy_gold, train, toy_prompts(32, 2),
              toy_pairs(train, 32, 3)).run()
    assert "\n" not in str(caught.value)


def test_nan_loss_stops_ppo_and_reinforce_with_the_update_number():
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    params = rlhf_params()
    optimizer = make_optimizer(policy, params, CPU)

    def nan_scorer(prompts, completions):
        return torch.full((len(completions),), float("nan"))

    rollout = _rollout(gpt, policy, nan_scorer)
    with pytest.raises(GptpipeError, match="the PPO loss is nan at update 5"):
        ppo_update(policy, optimizer, rollout, params, torch.Generator().manual_seed(0), 5)
    with pytest.raises(GptpipeError, match="the REINFORCE loss is nan at update 6"):
        reinforce_update(policy, optimizer, rollout, params, 6)


def test_nan_loss_stops_dpo():
    gpt = tiny_gpt()
    with torch.no_grad():
        gpt.blocks[0].mlp.down.weight.fill_(float("nan"))
    policy = PolicyWithValue(gpt).eval()
    params = rlhf_params(algo="dpo")
    with pytest.raises(GptpipeError, match="the DPO loss is nan at update 1"):
        dpo_update(policy, frozen_copy(tiny_gpt()), make_optimizer(policy, params, CPU),
                   toy_pairs(toy_prompts(16, 1), 8, 3), params, 1)


@pytest.mark.parametrize("algo", ["ppo", "reinforce", "grpo", "dpo"])
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nan_gradient_of_a_finite_loss_stops_the_update_before_the_step(algo, grad_clip):
    gpt = tiny_gpt()
    policy = PolicyWithValue(gpt).eval()
    params = rlhf_params(algo=algo, grad_clip=grad_clip, samples_per_prompt=2)
    optimizer = make_optimizer(policy, params, CPU)
    rollout = _rollout(gpt, policy)
    # The loss stays finite; one weight's gradient turns NaN on its way back.
    gpt.blocks[0].mlp.down.weight.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in policy.parameters()]
    name = {"ppo": "PPO", "reinforce": "REINFORCE", "grpo": "GRPO", "dpo": "DPO"}[algo]
    with pytest.raises(GptpipeError, match=f"at update 4 the {name} loss's gradient in the "
                                           "policy has norm nan; stopped before the "
                                           "optimizer step") as caught:
        if algo == "ppo":
            ppo_update(policy, optimizer, rollout, params, torch.Generator().manual_seed(0), 4)
        elif algo == "grpo":
            grpo_update(policy, optimizer, rollout, params, torch.Generator().manual_seed(0), 4)
        elif algo == "reinforce":
            reinforce_update(policy, optimizer, rollout, params, 4)
        else:
            dpo_update(policy, frozen_copy(gpt), optimizer, toy_pairs(toy_prompts(16, 1), 8, 3),
                       params, 4)
    assert "\n" not in str(caught.value)
    # No weight took the step (Adam's would have turned every one it touched into NaN).
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert not optimizer.state  # the optimizer never stepped


# ------------------------------------------------------------------------------- pieces


def test_completion_logprob_sums_match_one_sequence_at_a_time():
    gpt = tiny_gpt()
    prompts = [[BOS_ID, 5, 6], [BOS_ID, 9]]
    completions = [[7, 8], [10, 11, 12, 13]]
    with torch.no_grad():
        batched = completion_logprob_sums(gpt, prompts, completions)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits, _ = gpt(ids[:, :-1])
        logprobs = torch.log_softmax(logits[0], -1)
        expected = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(completion))
        assert float(batched[row]) == pytest.approx(expected, abs=1e-5)


def test_sequence_kl_is_the_exact_kl_summed_over_real_positions():
    logits = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]])  # (1, 2, 2): the second is padding
    ref_logits = torch.tensor([[[float(np.log(3.0)), 0.0], [0.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    # p = (1/2, 1/2), q = (3/4, 1/4): 1/2 ln(2/3) + 1/2 ln 2
    expected = 0.5 * np.log(2 / 3) + 0.5 * np.log(2)
    assert float(sequence_kl(logits, ref_logits, mask)[0]) == pytest.approx(expected, abs=1e-6)


def test_leave_one_out_baseline():
    returns = torch.tensor([1.0, 2.0, 6.0])
    assert leave_one_out_baseline(returns).tolist() == [4.0, 3.5, 1.5]
    assert leave_one_out_baseline(torch.tensor([3.0])).tolist() == [0.0]


class _LengthJudge:
    """Prefers the longer text; noiseless."""

    def score(self, prompt: str, completion: str) -> float:
        return float(len(completion))

    def prefer(self, prompt, a, b, rng) -> int:
        return 0 if len(a) > len(b) else 1


def test_win_rate_counts_ties_as_half():
    rng = np.random.default_rng(0)
    rate = win_rate(_LengthJudge(), ["p"] * 4, ["aaa", "a", "bb", "same"],
                    ["b", "bbb", "cc", "same"], rng)
    assert rate == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_the_metrics_summary_by_hand():
    def scored(gold: float, rm: float, reward: float, kl: float) -> PolicyEval:
        return PolicyEval(reward, rm, gold, kl, 1.0, [[5]])

    start, best, last = scored(0.5, 1.0, 1.0, 0.0), scored(1.25, 3.0, 3.0, 0.5), scored(
        1.0, 4.0, 4.0, 2.0)
    result = TuneResult({}, 20, start, best, last, 30, stopped_early=True)
    metrics = rlhf_metrics(rlhf_params(), result, scored(0.25, -1.0, -1.0, 0.75),
                           WinRates(0.75, 0.625), BitsPerByte(2.0, 2.5, 2.1))
    assert metrics == {
        "algo": "ppo", "reward": "model", "steps": 30, "stopped_early": True,
        "best_step": 20, "gold_pretrained": 0.25, "gold_before": 0.5, "gold_after": 1.25,
        "rm_pretrained": -1.0, "rm_before": 1.0, "rm_after": 3.0, "reward_before": 1.0,
        "reward_after": 3.0, "win_rate": 0.75, "win_rate_vs_start": 0.625, "kl_best": 0.5,
        "kl_final": 2.0, "val_bpb_pretrained": 2.0, "val_bpb_before": 2.5,
        "val_bpb_after": 2.1, "val_bpb_change_pct": 5.0,  # 100 * (2.1 - 2) / 2
    }
    assert summary_line(metrics) == (
        "best step 20 (stopped early): gold 0.250 pretrained, 0.500 at the start -> 1.250; "
        "reward model 1.000 -> 3.000; win rate 0.750 over the pretrained model; val 2.0000 "
        "-> 2.1000 bits/byte")


# -------------------------------------------------------------------------------- stage


DOCUMENTS = [
    "The river runs north to the sea. It is long and wide.",
    "A small city was built on the island in the early years.",
    "Music of the north is known for its ancient songs.",
    "The mountain was first climbed after the war ended.",
] * 4


def _char_tokenizer(path: Path, extra: str = "") -> Path:
    tokenizer = train_tokenizer(VocabParams(kind="char", min_freq=1), [*DOCUMENTS, extra])
    tokenizer.save(path)
    return path


def make_stage_inputs(tmp_path: Path, rlhf: dict | None = None,
                      gold: dict | None = None) -> dict[str, Path]:
    """A tiny pretrained policy, reward model, preference pairs and val tokens, all made
    with one char tokenizer, and params.yaml (settings overridden by ``rlhf``, ``gold``)."""
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer_path = _char_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=1, n_head=2,
                       n_embd=32)
    torch.manual_seed(0)
    meta = {"tokenizer_sha256": tokenizer.sha256, "vocab_kind": "char"}
    save_model(tmp_path / "pretrain", GPT(config), config, meta, tokenizer_path)
    save_reward_model(tmp_path / "reward", RewardModel(GPT(config)), tokenizer_path)
    pairs = [Pair(text[:12], text[12:30], text[30:40]) for text in DOCUMENTS[:4]]
    (tmp_path / "prefs").mkdir()
    write_pairs_jsonl(tmp_path / "prefs/train.jsonl", pairs[:3])
    write_pairs_jsonl(tmp_path / "prefs/heldout.jsonl", pairs[3:])
    write_json(tmp_path / "prefs/meta.json", {"source": "builtin",
                                              "tokenizer_sha256": tokenizer.sha256})
    ids = tokenizer.encode_documents(DOCUMENTS, token_dtype(tokenizer.vocab_size))
    (tmp_path / "tokens/val").mkdir(parents=True)
    with ShardWriter(tmp_path / "tokens/val", ids.dtype, 10_000) as writer:
        writer.append(ids)
    write_meta(tmp_path / "tokens", {
        "tokenizer_sha256": tokenizer.sha256, "kind": "char",
        "vocab_size": tokenizer.vocab_size, "dtype": str(ids.dtype), "bos_id": BOS_ID,
        "eos_id": EOS_ID, "splits": {"val": {"documents": len(DOCUMENTS), "tokens": len(ids),
                                             "bytes": len("".join(DOCUMENTS).encode()),
                                             "shards": 1}},
    })
    (tmp_path / "params.yaml").write_text(json.dumps({"rlhf": {
        "algo": "ppo", "steps": 4, "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 8,
        "eval_every": 2, "eval_prompts": 4, "device": "cpu", "lr": 1e-3, **(rlhf or {})},
        "gold": gold or {}}))
    return {"root": tmp_path, "tokenizer": tokenizer_path}


@pytest.fixture
def stage_inputs(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """:func:`make_stage_inputs` in tmp_path, the cwd, which is outside any repository
    (dvclive looks for one)."""
    monkeypatch.chdir(tmp_path)
    return make_stage_inputs(tmp_path)


def stage_args(root: Path, work: Path | None = None) -> list[str]:
    """The rlhf command on the inputs in ``root``, writing under ``work`` (default root)."""
    work = root if work is None else work
    return ["rlhf", "--params", str(root / "params.yaml"), "--model", str(root / "pretrain"),
            "--pretrained", str(root / "pretrain"), "--reward", str(root / "reward"),
            "--pairs", str(root / "prefs"), "--tokens", str(root / "tokens"),
            "--out", str(work / "out"), "--checkpoint", str(work / "ckpt"),
            "--live", str(work / "live"), "--metrics", str(work / "metrics.json")]


@pytest.mark.parametrize("algo", ["ppo", "dpo"])
def test_stage_writes_loadable_models_metrics_and_plots(stage_inputs, algo):
    root = stage_inputs["root"]
    params = json.loads((root / "params.yaml").read_text())
    params["rlhf"]["algo"] = algo
    (root / "params.yaml").write_text(json.dumps(params))
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) == {
        "algo", "reward", "steps", "stopped_early", "best_step", "gold_pretrained",
        "gold_before", "gold_after", "rm_pretrained", "rm_before", "rm_after",
        "reward_before", "reward_after", "win_rate", "win_rate_vs_start", "kl_best",
        "kl_final", "val_bpb_pretrained", "val_bpb_before", "val_bpb_after",
        "val_bpb_change_pct"} | {f"{key}_se" for key in (
        "gold_pretrained", "gold_before", "gold_after", "rm_pretrained", "rm_before",
        "rm_after", "reward_before", "reward_after", "win_rate", "win_rate_vs_start",
        "kl_best", "val_bpb_pretrained", "val_bpb_before", "val_bpb_after")}
    assert metrics["algo"] == algo and metrics["steps"] == 4
    assert 0.0 <= metrics["win_rate"] <= 1.0
    assert metrics["gold_after"] >= metrics["gold_before"]  # best by gold; step 0 competes
    expected = 100 * (metrics["val_bpb_after"] - metrics["val_bpb_pretrained"])
    assert metrics["val_bpb_change_pct"] == pytest.approx(
        expected / metrics["val_bpb_pretrained"], abs=1e-3)
    # Here the policy starts from the pretrained model itself: the same samples, scores.
    assert metrics["gold_pretrained"] == metrics["gold_before"]
    assert metrics["reward_before"] == metrics["rm_before"]  # reward: model
    for which in ("best", "last"):
        files = sorted(p.name for p in (root / "out" / which).iterdir())
        assert files == ["gptpipe.json", "model.safetensors", "tokenizer.json"]
        _, meta = load_model(root / "out" / which)
        assert meta["tokenizer_sha256"] == json.loads(
            (root / "pretrain/gptpipe.json").read_text())["tokenizer_sha256"]
        assert meta["rlhf_algo"] == algo
    plots = root / "live/plots/metrics"
    assert (plots / "eval/gold_score.tsv").is_file()
    rows = (plots / "eval/gold_score.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [0, 2, 4]
    assert (plots / ("clip_fraction.tsv" if algo == "ppo" else "dpo_loss.tsv")).is_file()
    # The last evaluation's snapshot: a finished run, which a re-run will not resume.
    snapshot = json.loads((root / "ckpt/snapshot/state.json").read_text())
    assert snapshot["step"] == snapshot["steps"] == 4


@pytest.mark.parametrize("broken", ["reward", "pairs", "tokens"])
def test_stage_refuses_inputs_from_another_tokenizer(stage_inputs, broken):
    root = stage_inputs["root"]
    other = _char_tokenizer(root / "other-tokenizer.json", extra="Zebra quilts!")
    from pipeline.data.tokenizer import load_tokenizer

    other_sha = load_tokenizer(other).sha256
    if broken == "reward":
        config = GPTConfig(vocab_size=load_tokenizer(other).vocab_size, context=64,
                           n_layer=1, n_head=2, n_embd=32)
        save_reward_model(root / "reward", RewardModel(GPT(config)), other)
        named = root / "reward/tokenizer.json"
    elif broken == "pairs":
        write_json(root / "prefs/meta.json", {"source": "builtin", "tokenizer_sha256": other_sha})
        named = root / "prefs/meta.json"
    else:
        meta = json.loads((root / "tokens/meta.json").read_text())
        write_json(root / "tokens/meta.json", {**meta, "tokenizer_sha256": other_sha})
        named = root / "tokens/meta.json"
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(named) in lines[0]
    assert "another tokenizer" in lines[0]
    for output in ("out", "ckpt", "live", "metrics.json"):
        assert not (root / output).exists()


def test_prompts_are_cut_to_the_shortest_and_fit_the_context(stage_inputs):
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(stage_inputs["tokenizer"])
    prompts = prompt_tensors(tokenizer, ["The river", "A small city", "The river"],
                             ["Music of"], 64, 8, eval_prompts=4)
    assert prompts.length == 8  # "Music of": 8 characters
    # Duplicates count once.
    assert prompts.train.shape == (2, 9) and prompts.heldout.shape == (1, 9)
    assert (prompts.train[:, 0] == BOS_ID).all() and prompts.empty == 0
    capped = prompt_tensors(tokenizer, ["The river"], ["A small city"], 12, 8, 4)
    assert capped.length == 3  # <bos> + 3 + 8 = 12
    with pytest.raises(GptpipeError, match=r"rlhf\.max_new_tokens = 64"):
        prompt_tensors(tokenizer, ["The river"], ["A small"], 64, 64, 4)


def test_an_empty_prompt_is_left_out_not_cutting_every_prompt_to_nothing(stage_inputs):
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(stage_inputs["tokenizer"])
    prompts = prompt_tensors(tokenizer, ["The river", "", "A small city"],
                             ["", "Music of", "The mountain"], 64, 8, eval_prompts=1)
    assert prompts.length == 8  # "Music of", the shortest prompt with a token
    assert prompts.train.shape == (2, 9) and prompts.heldout.shape == (1, 9)
    assert prompts.empty == 2
    assert tokenizer.decode(prompts.heldout[0, 1:].tolist()) == "Music of"
    # A side with no prompt left is one line naming its file; DPO needs no train prompt.
    with pytest.raises(GptpipeError, match=r"prefs/heldout\.jsonl: no held-out prompt of at "
                                           "least one token"):
        prompt_tensors(tokenizer, ["The river"], ["", ""], 64, 8, 4, "prefs")
    with pytest.raises(GptpipeError, match=r"prefs/train\.jsonl: no train prompt"):
        prompt_tensors(tokenizer, [""], ["Music of"], 64, 8, 4, "prefs")
    dpo = prompt_tensors(tokenizer, [""], ["Music of"], 64, 8, 4, "prefs", need_train=False)
    assert dpo.train.shape == (0, 9) and dpo.length == 8


def test_the_stage_says_how_many_empty_prompts_it_left_out(stage_inputs):
    root = stage_inputs["root"]
    pairs = [*read_pairs_jsonl(root / "prefs/train.jsonl"), Pair("", " the end.", " no")]
    write_pairs_jsonl(root / "prefs/train.jsonl", pairs)
    params = json.loads((root / "params.yaml").read_text())
    params["rlhf"]["steps"] = 2
    (root / "params.yaml").write_text(json.dumps(params))
    result = CliRunner().invoke(cli, stage_args(root))
    assert result.exit_code == 0, result.output
    assert "3 train and 1 held-out prompts of 12 tokens" in result.output
    assert "rlhf: 1 empty prompts (no token) left out" in result.output
