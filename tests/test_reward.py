"""The reward model: encoding, padding, save/load, Bradley-Terry training, the TF-IDF
baseline, and the reward stage end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import save_tiny_checkpoint, synthetic_documents

from pipeline.alignment.preference_data import Pair, heldout_split, write_pairs_jsonl
from pipeline.alignment.reward_model import (
    RewardModel,
    TfidfPreferenceBaseline,
    baseline_terms,
    encode_pair_ids,
    encode_pairs,
    evaluate_reward_model,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_json
from pipeline.core.params import RewardParams
from pipeline.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer
from pipeline.lm.checkpoint import read_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARKER = "excellent"
WORDS = (  # noqa: SIM905 - one readable block of words
    "river city music history king war science ocean language people north south "
    "ancient modern empire island mountain famous built founded written"
).split()


def toy_pairs(count: int, seed: int = 0) -> list[Pair]:
    """Chosen completions hold MARKER somewhere; rejected ones never do."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        prompt = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {index}"
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        chosen.insert(rng.randrange(len(chosen) + 1), MARKER)
        pairs.append(Pair(prompt, " " + " ".join(chosen), " " + " ".join(rejected)))
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A word tokenizer (MARKER is one token) and a random 2-layer GPT checkpoint."""
    root = tmp_path_factory.mktemp("reward")
    texts = [*synthetic_documents(40, seed=1), *(f"{p.prompt}{p.chosen}" for p in toy_pairs(50))]
    return save_tiny_checkpoint(root, texts, kind="word", n_layer=2)


# ---------------------------------------------------------------------------- encoding


def test_encoding_adds_bos_and_eos_and_cuts_the_prompt_from_the_left():
    assert encode_pair_ids([10, 11], [20, 21], context=16) == [BOS_ID, 10, 11, 20, 21, EOS_ID]
    # Too long: the prompt's start goes first, the completion stays whole.
    assert encode_pair_ids([10, 11, 12, 13], [20, 21], context=6) == [
        BOS_ID, 12, 13, 20, 21, EOS_ID]
    # A completion longer than the context keeps its end (where the text finishes).
    assert encode_pair_ids([10], [20, 21, 22, 23, 24], context=5) == [
        BOS_ID, 22, 23, 24, EOS_ID]
    # A sampler's <bos> and <eos> are not doubled.
    assert encode_pair_ids([BOS_ID, 10], [20, EOS_ID], context=8) == [BOS_ID, 10, 20, EOS_ID]
    assert encode_pair_ids([], [20], context=8) == [BOS_ID, 20, EOS_ID]
    assert encode_pair_ids(torch.tensor([10]), torch.tensor([20]), 8) == [BOS_ID, 10, 20, EOS_ID]


def test_pairs_encode_prompt_and_completion_separately(setup):
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    prompt_ids, completion_ids = tokenizer.encode_batch(["the river city", " music king"])
    pair = [Pair("the river city", " music king", " war")]
    (ids,), _ = encode_pairs(tokenizer, pair, context=64)
    assert ids == [BOS_ID, *prompt_ids, *completion_ids, EOS_ID]
    (short,), _ = encode_pairs(tokenizer, pair, context=5)
    assert short == [BOS_ID, prompt_ids[-1], *completion_ids, EOS_ID]


# --------------------------------------------------------------------------- the model


def test_padding_and_batching_do_not_change_scores(setup):
    model = RewardModel.from_pretrained(setup / "model", "cpu", seed=1)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    completions = [[20, 21], [22, 23, 24, 25, 26, 27, 28], [29]]
    together = model.score_ids(prompts, completions)
    alone = torch.cat([model.score_ids([p], [c]) for p, c in zip(prompts, completions,
                                                                 strict=True)])
    assert together.shape == (3,)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The value read is the one at <eos>: the head over the unpadded sequence's last position.
    sequence = torch.tensor([encode_pair_ids(prompts[1], completions[1], 64)])
    with torch.no_grad():
        torch.testing.assert_close(model.values(sequence)[0, -1], together[1], atol=1e-5,
                                   rtol=1e-5)


def test_the_head_comes_from_the_seed_and_the_body_from_the_checkpoint(setup):
    a = RewardModel.from_pretrained(setup / "model", seed=3)
    b = RewardModel.from_pretrained(setup / "model", seed=3)
    c = RewardModel.from_pretrained(setup / "model", seed=4)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(a.body.wte.weight, c.body.wte.weight)


def test_save_then_load_gives_identical_scores(setup, tmp_path):
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    model = RewardModel.from_pretrained(setup / "model", seed=2)
    pairs = toy_pairs(6)
    save_reward_model(tmp_path / "rm", model, setup / "tokenizer.json", {"note": 1})
    loaded = load_reward_model(tmp_path / "rm")
    prompts, completions = [p.prompt for p in pairs], [p.chosen for p in pairs]
    prompt_ids, completion_ids = (tokenizer.encode_batch(texts)
                                  for texts in (prompts, completions))
    assert torch.equal(model.score_ids(prompt_ids, completion_ids),
                       loaded.score_ids(prompt_ids, completion_ids))
    _, config = read_config(tmp_path / "rm")
    assert config["kind"] == "reward" and config["note"] == 1
    assert config["tokenizer_sha256"] == tokenizer.sha256
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == [
        "gptpipe.json", "model.safetensors", "tokenizer.json"]


def test_a_pretrained_checkpoint_is_not_a_reward_model(setup):
    with pytest.raises(GptpipeError, match="allowed: a reward model written by gptpipe reward"):
        load_reward_model(setup / "model")


# -------------------------------------------------------------------------- training


TOY_PARAMS = RewardParams(epochs=6, batch_size=16, lr=3e-3, seed=0, device="cpu")


def test_bradley_terry_learns_the_marker_word(setup):
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    train, heldout = heldout_split(toy_pairs(240, seed=1), 0.25)
    model = RewardModel.from_pretrained(setup / "model", seed=0)
    before = evaluate_reward_model(model, tokenizer, heldout)
    epochs: list[tuple[int, float]] = []
    history = train_reward_model(model, tokenizer, train, TOY_PARAMS, "cpu",
                                 on_epoch=lambda e, loss: epochs.append((e, loss)))
    after = evaluate_reward_model(model, tokenizer, heldout)
    assert [e for e, _ in epochs] == list(range(1, 7))
    assert history["epoch_losses"] == [loss for _, loss in epochs]
    assert history["steps"] == 6 * -(-len(train) // 16)
    assert history["epoch_losses"][-1] < history["epoch_losses"][0]
    assert before["accuracy"] < 0.8
    assert after["accuracy"] > 0.9 and after["mean_margin"] > 1.0


def test_training_is_deterministic_for_a_seed(setup):
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    pairs = toy_pairs(40, seed=2)
    params = RewardParams(epochs=1, batch_size=8, lr=1e-3, seed=5, device="cpu")
    runs = []
    for _ in range(2):
        model = RewardModel.from_pretrained(setup / "model", seed=5)
        runs.append(train_reward_model(model, tokenizer, pairs, params, "cpu")["epoch_losses"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nan_gradient_of_a_finite_loss_stops_training_before_the_step(setup, grad_clip):
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    model = RewardModel.from_pretrained(setup / "model", seed=0)
    # The loss stays finite; one weight's gradient turns NaN on its way back.
    model.head.weight.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    params = RewardParams(epochs=1, batch_size=8, grad_clip=grad_clip, device="cpu")
    with pytest.raises(GptpipeError, match="reward: the loss's gradient at epoch 1, step 1 "
                                           "has norm nan; stopped before the optimizer step"):
        train_reward_model(model, tokenizer, toy_pairs(16), params, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_tfidf_baseline_learns_the_marker_word_and_is_antisymmetric():
    train, heldout = heldout_split(toy_pairs(240, seed=1), 0.25)
    baseline = TfidfPreferenceBaseline(max_features=1000, c=1.0, seed=0).fit(train)
    assert baseline.accuracy(train) > 0.95
    assert baseline.accuracy(heldout) > 0.9
    swapped = [Pair(p.prompt, p.rejected, p.chosen) for p in heldout]
    torch.testing.assert_close(torch.as_tensor(baseline.margins(swapped)),
                               -torch.as_tensor(baseline.margins(heldout)))
    again = TfidfPreferenceBaseline(max_features=1000, c=1.0, seed=0).fit(train)
    assert (again.margins(heldout) == baseline.margins(heldout)).all()


def test_baseline_terms_are_the_projects_words_and_unspaced_character_pairs():
    # Spaced words whole (contraction kept, lowercased, "<unk>" one word); each Chinese
    # character a word, and each pair of adjacent ones; "。" separates 京 from 很.
    assert baseline_terms("Don't STOP <unk> 3. 北京。很大") == [
        "don't", "stop", "<unk>", "3", "北", "京", "北京", "很", "大", "很大"]
    assert baseline_terms("") == []


def _chinese_pairs(count: int, seed: int) -> list[Pair]:
    """Reviews without spaces: the chosen clause says 好 (good) where the rejected says
    差 (bad); every clause is otherwise random, so no two clauses are the same text."""
    rng = random.Random(seed)
    filler = "房间服务价格位置早餐环境干净安静方便热情周到设施停车交通附近"

    def clause(marker: str) -> str:
        chars = [rng.choice(filler) for _ in range(rng.randint(6, 10))]
        chars.insert(rng.randrange(len(chars) + 1), marker)
        return "".join(chars) + "。"

    return [Pair(f"评论{index}：", clause("好"), clause("差")) for index in range(count)]


def test_the_tfidf_baseline_learns_chinese_from_characters_not_whole_clauses():
    train, heldout = heldout_split(_chinese_pairs(240, seed=4), 0.25)
    baseline = TfidfPreferenceBaseline(max_features=1000, c=1.0, seed=0).fit(train)
    # Whole clauses as words (scikit-learn's default pattern) are never seen again:
    # every held-out margin 0, accuracy 0.5. Characters carry the marker.
    assert baseline.accuracy(heldout) > 0.9
    assert "好" in baseline.vectorizer.vocabulary_ and "差" in baseline.vectorizer.vocabulary_


# ---------------------------------------------------------------------------- stage


def _pairs_dir(root: Path, tokenizer_sha: str | None) -> Path:
    train, heldout = heldout_split(toy_pairs(160, seed=3), 0.25)
    pairs = root / "prefs"
    pairs.mkdir()
    write_pairs_jsonl(pairs / "train.jsonl", train)
    write_pairs_jsonl(pairs / "heldout.jsonl", heldout)
    write_json(pairs / "meta.json", {"source": "builtin", "tokenizer_sha256": tokenizer_sha})
    return pairs


def _run_stage(setup: Path, work: Path, pairs: Path):
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"reward": {
        "epochs": 5, "batch_size": 16, "lr": 3e-3, "device": "cpu"}}))
    args = ["reward", "--params", str(params), "--model", str(setup / "model"),
            "--pairs", str(pairs), "--out", str(work / "rm"),
            "--metrics", str(work / "metrics.json")]
    return CliRunner().invoke(cli, args)


def test_stage_writes_the_reward_model_and_metrics(setup, tmp_path):
    sha = load_tokenizer(setup / "tokenizer.json").sha256
    pairs = _pairs_dir(tmp_path, sha)
    result = _run_stage(setup, tmp_path, pairs)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics) == sorted([
        "gpt.train_accuracy", "gpt.heldout_accuracy", "gpt.heldout_margin", "gpt.train_loss",
        "baseline.train_accuracy", "baseline.heldout_accuracy", "baseline.heldout_margin",
        "pairs.train", "pairs.heldout", *(f"{model}.heldout_{key}" for model in (
            "gpt", "baseline") for key in ("accuracy_lo", "accuracy_hi", "margin_se"))])
    assert metrics["pairs.train"] + metrics["pairs.heldout"] == 160
    assert metrics["gpt.heldout_accuracy"] > 0.8
    assert metrics["baseline.heldout_accuracy"] > 0.8
    model = load_reward_model(tmp_path / "rm")
    _, config = read_config(tmp_path / "rm")
    assert config["kind"] == "reward" and len(config["epoch_losses"]) == 5
    assert model.config.vocab_size == load_tokenizer(setup / "tokenizer.json").vocab_size
    assert "reward: held-out accuracy" in result.output


@pytest.mark.parametrize("problem", ["other tokenizer", "no heldout", "bad line"])
def test_stage_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, problem):
    pairs = _pairs_dir(tmp_path, "0" * 64 if problem == "other tokenizer" else None)
    needle = {
        "other tokenizer": "the preference pairs were made with another tokenizer",
        "no heldout": "heldout.jsonl missing",
        "bad line": "train.jsonl: line 2: not valid JSON",
    }[problem]
    if problem == "no heldout":
        (pairs / "heldout.jsonl").unlink()
    if problem == "bad line":
        lines = (pairs / "train.jsonl").read_text().splitlines()
        (pairs / "train.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    result = _run_stage(setup, tmp_path, pairs)
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(error_lines) == 1 and needle in error_lines[0], result.output
    assert not (tmp_path / "rm").exists() and not (tmp_path / "metrics.json").exists()
