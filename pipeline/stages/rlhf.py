"""rlhf: tune the policy against a reward (PPO, GRPO, RLOO, REINFORCE) or on the pairs (DPO).
The gold judge scores every evaluation.

Reads:   --model (models/sft: the policy RL starts from, also its frozen KL reference),
         --pretrained (models/pretrain/best: what the tuned policy is judged against, and
         the likelihood reward's scorer), --reward (models/reward: the reward model),
         --pairs (data/preferences: train.jsonl's prompts and DPO's pairs, heldout.jsonl's
         evaluation prompts), --tokens (data/tokens: the val split, for bits per byte),
         and a python: reward's file (rlhf.reward_module)
Params:  rlhf (algorithm, reward, budget, sampling, optimizer, KL penalty, evaluation,
         selection, seed, device), gold (the judge), evaluate.max_tokens
Writes:  --out (models/rlhf/): best/ and last/ model checkpoints; --checkpoint
         (checkpoints/rlhf/: the resumable snapshot, a DVC persist output); --live
         (dvclive/rlhf/: per-step plots); --metrics (metrics/rlhf.json: the gold,
         reward-model and reward scores, win rates, KL and val bits per byte of the
         pretrained, starting and best policies, defined in pipeline/alignment/report.py;
         with a weighted list of rewards, each one's mean and standard error before and
         after, pipeline/alignment/policy_eval.component_metrics)

Refuses, in one line with nothing written: inputs made with another tokenizer than
--model's, a prompt + completion longer than the context, a python: reward that cannot
be imported, raises or returns anything but a finite number per completion. Re-run
after a crash, a kill or Ctrl-C, it resumes its snapshot when that is an unfinished run
of the same params, inputs and code (pipeline/alignment/tuner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.inputs import RolloutPrompts, encode_pairs, prompt_tensors
from pipeline.alignment.policy_eval import component_metrics
from pipeline.alignment.preference_data import Pair, read_pairs_dir, visible_text
from pipeline.alignment.preference_data import made_with as pairs_made_with
from pipeline.alignment.report import BitsPerByte, rlhf_metrics, summary_line, win_rates
from pipeline.alignment.reward_model import RewardModel, load_reward_model
from pipeline.alignment.rewards import TextReward, load_functions, make_reward
from pipeline.alignment.rollout import GoldScorer
from pipeline.alignment.tuner import Tuner, TuneResult
from pipeline.core.device import pick_device
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.live import finish_live, start_live
from pipeline.core.params import Params, RlhfParams
from pipeline.core.progress import progress
from pipeline.core.runs import run_fingerprint
from pipeline.core.stage import say, stage_command
from pipeline.data.shards import made_with as shards_made_with
from pipeline.data.shards import read_meta, read_tokens, require_splits
from pipeline.data.tokenizer import MadeWith, TextTokenizer, require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER, write_model_files
from pipeline.lm.evaluation import evaluate_split
from pipeline.lm.folder import ModelFolder
from pipeline.lm.model import GPT, GPTConfig


def run(params: Params, *, model: Path, pretrained: Path, reward: Path, pairs: Path,
        tokens: Path, out: Path, checkpoint: Path, live: Path,
        metrics: Path) -> dict[str, Any]:
    """Tune the policy (resuming from ``checkpoint`` when it can); write every output."""
    rlhf = params.rlhf
    device = pick_device(rlhf.device, key="rlhf.device")
    inputs = _open_inputs(model, pretrained, reward, pairs, tokens)
    python_functions = _import_python_rewards(rlhf)
    prompts = prompt_tensors(
        inputs.tokenizer, [p.prompt for p in inputs.train_pairs],
        [p.prompt for p in inputs.heldout_pairs], inputs.config.context,
        rlhf.max_new_tokens, rlhf.eval_prompts, pairs, need_train=rlhf.algo != "dpo")
    val_bpb = _val_bpb(params, tokens, inputs)
    fingerprint = _fingerprint(params, device.type, model=model, pretrained=pretrained,
                               reward=reward, pairs=pairs)

    policy, base, reward_model = _load_models(inputs, reward, device, rlhf.seed)
    judge = GoldJudge.from_params(params.gold)
    # A weighted list: RL maximizes the weighted sum, and each reward is logged apart.
    scorer = make_reward(rlhf.reward, python_functions,
                         reward_model_scorer=reward_model.score_ids, judge=judge,
                         tokenizer=inputs.tokenizer, pretrained=base,
                         likelihood_per_token=rlhf.likelihood_per_token)
    _say_start(rlhf, device, prompts)
    # Before the Tuner exists: resuming loads the snapshot's weights into ``policy``.
    val_bpb_pretrained, val_bpb_before = val_bpb(base), val_bpb(policy)

    gold = _gold_scorer(judge, inputs.tokenizer)
    encoded = encode_pairs(inputs.tokenizer, inputs.train_pairs) if rlhf.algo == "dpo" else ()
    rm_scorer = None if rlhf.reward == "model" else reward_model.score_ids
    tuner = Tuner(policy, rlhf, scorer, gold, prompts.train, prompts.heldout, encoded,
                  checkpoint, fingerprint, rm_scorer)
    result = _tune(tuner, live)
    # The pretrained model on the same prompts and random draws: what RLHF is judged
    # against (the starting policy is the SFT model, its KL reference).
    pretrained_eval = tuner.evaluate_model(base)
    del reward_model

    provenance = {"tokenizer_sha256": inputs.tokenizer.sha256,
                  "vocab_kind": inputs.raw.get("vocab_kind")}
    best = _write_models(out, result, policy, model / TOKENIZER, provenance, rlhf.algo)
    bpb = BitsPerByte(val_bpb_pretrained, val_bpb_before, val_bpb(best))
    wins = win_rates(judge, inputs.tokenizer, prompts.heldout, result, pretrained_eval,
                     rlhf.seed)
    # A weighted list's "reward" is its one-line sum; each reward gets its own keys.
    summary = rlhf_metrics(rlhf, result, pretrained_eval, wins, bpb)
    if rlhf.weighted:
        summary = {**summary, "reward": rlhf.reward_label(),
                   **component_metrics(result.start, result.best)}
    write_json(metrics, summary)
    say("rlhf", summary_line(summary))
    return summary


@dataclass(frozen=True)
class _Inputs:
    """What the stage reads before loading any model: the policy's and the pretrained
    model's folders (opened once), the policy's config, raw config and tokenizer, the
    pairs, and the token shards' meta."""

    policy_folder: ModelFolder
    pretrained_folder: ModelFolder
    config: GPTConfig
    raw: dict[str, Any]
    tokenizer: TextTokenizer
    train_pairs: list[Pair]
    heldout_pairs: list[Pair]
    tokens_meta: dict[str, Any]


def _open_inputs(model: Path, pretrained: Path, reward: Path, pairs: Path,
                 tokens: Path) -> _Inputs:
    """Every input opened and checked (one tokenizer for all, a val split) before
    anything is loaded onto the device or written."""
    policy_folder, base_folder = ModelFolder.open(model), ModelFolder.open(pretrained)
    reward_folder = ModelFolder.open(reward)
    config, raw, tokenizer = policy_folder.config, policy_folder.meta, policy_folder.tokenizer()
    base_config, base_tokenizer = base_folder.config, base_folder.tokenizer()
    reward_config, reward_tokenizer = reward_folder.config, reward_folder.tokenizer()
    train_pairs, heldout_pairs, pairs_meta = read_pairs_dir(pairs)
    tokens_meta = read_meta(tokens)
    require_tokenizer(
        tokenizer,
        MadeWith("the pretrained model was", pretrained / TOKENIZER, base_tokenizer.sha256,
                 base_config.vocab_size),
        MadeWith("the reward model was", reward / TOKENIZER, reward_tokenizer.sha256,
                 reward_config.vocab_size),
        pairs_made_with(pairs_meta, pairs),
        shards_made_with(tokens_meta, tokens),
    )
    require_splits(tokens_meta, tokens, "val")
    return _Inputs(policy_folder, base_folder, config, raw, tokenizer, train_pairs,
                   heldout_pairs, tokens_meta)


def _import_python_rewards(rlhf: RlhfParams) -> dict[str, TextReward]:
    """Each python: reward's function by its reward string, its file imported once and
    now: an import that fails, fails before anything is loaded."""
    return load_functions(rlhf.python_rewards())


def _load_models(inputs: _Inputs, reward: Path, device: torch.device,
                 seed: int) -> tuple[GPT, GPT, RewardModel]:
    """The policy, the frozen pretrained model and the reward model, on ``device``; the
    global generator seeded first (building a GPT draws from it).

    The policy is also its own KL reference (the Tuner copies it before any step): the
    starting policy, the SFT model, as in InstructGPT. The penalty keeps RL near the
    answers fine-tuning taught, where a pretrained reference would pull the policy back
    toward raw continuation.
    """
    torch.manual_seed(seed)
    policy = inputs.policy_folder.load_model(device)
    base = inputs.pretrained_folder.load_model(device)
    base.eval().requires_grad_(False)
    return policy, base, load_reward_model(reward, device)


def _val_bpb(params: Params, tokens: Path, inputs: _Inputs) -> Callable[[GPT], float]:
    """A model's bits per byte on the val split (every token, or evaluate.max_tokens of
    them), as a function of the model."""
    val_tokens = read_tokens(tokens / "val")
    val = inputs.tokens_meta["splits"]["val"]
    byte_lengths = inputs.tokenizer.byte_lengths()

    def val_bpb(model: GPT) -> float:
        return evaluate_split(model, val_tokens, val["bytes"], model.config.context,
                              params.rlhf.batch_size, model.lm_head.weight.device,
                              max_tokens=params.evaluate.budget, byte_lengths=byte_lengths,
                              split_token_bytes=val.get("token_bytes"))["bpb"]

    return val_bpb


def _fingerprint(params: Params, device_type: str, **inputs: Path) -> str:
    """What a snapshot must match to be resumed: the rlhf and gold params, the device
    type, and every file of the input folders (and of a python: reward's module).

    The device type, not the param: a generator's state only fits its own kind of
    device, and float results differ between kinds. --tokens is left out: the val bits
    per byte are recomputed at every start, never carried in a snapshot.
    """
    rlhf = params.rlhf
    settings = {"rlhf": {k: v for k, v in asdict(rlhf).items() if k != "device"},
                "gold": asdict(params.gold), "device": device_type}
    if rlhf.python_rewards():
        inputs["reward_module"] = Path(rlhf.reward_module)
    return run_fingerprint(settings, inputs)


def _say_start(rlhf: RlhfParams, device: torch.device, prompts: RolloutPrompts) -> None:
    what = "pairs" if rlhf.algo == "dpo" else "completions"
    say("rlhf", f"{rlhf.algo} on {device}, reward {rlhf.reward_label()}: {rlhf.steps} steps of "
                f"{rlhf.batch_size} {what}; {prompts.train.shape[0]} train and "
                f"{prompts.heldout.shape[0]} held-out prompts of {prompts.length} tokens")
    if rlhf.algo == "dpo":
        say("rlhf", "dpo learns from the pairs: the reward is evaluated and reported, "
                    "not optimized")
    if prompts.empty:
        say("rlhf", f"{prompts.empty} empty prompts (no token) left out of the rollout and "
                    "evaluation prompts: every prompt is cut to the shortest one's length")


def _gold_scorer(judge: GoldJudge, tokenizer: TextTokenizer) -> GoldScorer:
    """The gold judge's score of (prompt ids, completion ids), read as text."""

    def gold(prompt_ids: list[int], completion_ids: list[int]) -> float:
        return judge.score(visible_text(tokenizer, prompt_ids),
                           visible_text(tokenizer, completion_ids))

    return gold


def _tune(tuner: Tuner, live_dir: Path) -> TuneResult:
    """Run the tuner with its dvclive plots and a progress bar."""
    live = start_live(live_dir, tuner.resumed_from)
    bar = progress(total=tuner.rlhf.steps, desc="rlhf", unit="step", initial=tuner.step)

    def log(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for name, value in metrics.items():
            live.log_metric(name, round(float(value), 6))
        if "eval/gold_score" in metrics:
            bar.write(f"rlhf: step {step}: gold {metrics['eval/gold_score']:.3f}, reward "
                      f"model {metrics['eval/rm_score']:.3f}, KL {metrics['eval/kl']:.3f} "
                      "nats/sequence on held-out prompts")

    try:
        result = tuner.run(log=log, progress=lambda step: bar.update(1))
    finally:
        bar.close()
    finish_live(live)
    return result


def _write_models(out: Path, result: TuneResult, last: GPT, tokenizer_path: Path, meta: dict,
                  algo: str) -> GPT:
    """models/rlhf/{best,last} in one atomic step; returns the best policy as a GPT."""
    best = GPT(last.config).to(last.lm_head.weight.device)
    best.load_state_dict(result.best_state)
    with atomic_dir(out) as tmp:
        for name, model, step, evaluation in (("best", best, result.best_step, result.best),
                                              ("last", last, result.steps, result.last)):
            (tmp / name).mkdir()
            write_model_files(tmp / name, model, model.config, {
                **meta, "rlhf_algo": algo, "rlhf_step": step,
                "gold_score": round(evaluation.gold_score, 6),
                "rm_score": round(evaluation.rm_score, 6),
            }, tokenizer_path)
    return best


main = stage_command(
    "rlhf", run,
    model="The policy to start from (models/sft): also the frozen KL reference.",
    pretrained="The pretrained model (models/pretrain/best): the likelihood reward's "
    "scorer and what the tuned policy is judged against.",
    reward="The reward model folder written by gptpipe reward.",
    pairs="",
    tokens="The token shards (the val split scores bits per byte before and after).",
    out="The model folder to write (best/ and last/ model checkpoints).",
    checkpoint="", live="",
    metrics="",
)
