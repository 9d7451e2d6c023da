"""rlhf: tune the policy against a reward (PPO, GRPO, RLOO, REINFORCE) or on the pairs (DPO).
The gold judge scores every evaluation.

Reads:   --model (models/sft: the policy RL starts from, also its frozen KL reference),
         --pretrained (models/pretrain/best: what the tuned policy is judged against, and
         the likelihood reward's scorer), --reward (models/reward: the reward model),
         --pairs (data/preferences: train.jsonl's prompts and DPO's pairs, heldout.jsonl's
         evaluation prompts), --tokens (data/tokens: the val split, for bits per byte,
         and the test split, whose document openings are the final evaluation's
         prompts), and a python: reward's file (rlhf.reward_module)
Params:  rlhf (algorithm, reward, budget, sampling, optimizer, KL penalty, evaluation,
         selection, final evaluation, seed, device), gold (the judge),
         evaluate.max_tokens, evaluate.resamples and evaluate.resample_seed
Writes:  --out (models/rlhf/): best/ and last/ model checkpoints; --checkpoint
         (checkpoints/rlhf/: the resumable snapshot, a DVC persist output); --live
         (dvclive/rlhf/: per-step plots); --metrics (metrics/rlhf.json: the gold,
         reward-model and reward scores, win rates, KL and val bits per byte of the
         pretrained, starting and best policies, each with its standard error, defined
         in pipeline/alignment/report.py; with a weighted list of rewards, each one's mean
         and standard error before and after, pipeline/alignment/policy_eval.
         component_metrics); --prompt-scores (evaluation/rlhf_prompts.parquet: the final
         evaluation, one row per prompt)

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
from pipeline.alignment.policy_eval import component_metrics, opening_prompts
from pipeline.alignment.preference_data import Pair, read_pairs_dir, visible_text
from pipeline.alignment.preference_data import made_with as pairs_made_with
from pipeline.alignment.report import (
    BitsPerByte,
    FinalEvaluation,
    final_errors,
    prompt_table,
    prompt_texts,
    rlhf_metrics,
    summary_line,
    win_rates,
    with_final_scores,
)
from pipeline.alignment.reward_model import RewardModel, load_reward_model
from pipeline.alignment.rewards import TextReward, load_functions, make_reward
from pipeline.alignment.rollout import GoldScorer
from pipeline.alignment.tuner import Tuner, TuneResult
from pipeline.core.device import pick_device
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.item_scores import optional_paths, write_item_scores
from pipeline.core.live import finish_live, start_live
from pipeline.core.params import Params, RlhfParams
from pipeline.core.progress import progress
from pipeline.core.runs import run_fingerprint
from pipeline.core.stage import say, stage_command
from pipeline.data.shards import made_with as shards_made_with
from pipeline.data.shards import read_meta, read_tokens, require_splits
from pipeline.data.tokenizer import MadeWith, TextTokenizer, require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER, write_model_files
from pipeline.lm.evaluation import score_split
from pipeline.lm.folder import ModelFolder
from pipeline.lm.model import GPT, GPTConfig


def run(params: Params, *, model: Path, pretrained: Path, reward: Path, pairs: Path,
        tokens: Path, out: Path, checkpoint: Path, live: Path, metrics: Path,
        prompt_scores: Path | None = None) -> dict[str, Any]:
    """Tune the policy (resuming from ``checkpoint`` when it can); write every output."""
    rlhf = params.rlhf
    device = pick_device(rlhf.device, key="rlhf.device")
    inputs = _open_inputs(model, pretrained, reward, pairs, tokens)
    python_functions = _import_python_rewards(rlhf)
    prompts = prompt_tensors(
        inputs.tokenizer, [p.prompt for p in inputs.train_pairs],
        [p.prompt for p in inputs.heldout_pairs], inputs.config.context,
        rlhf.max_new_tokens, rlhf.eval_prompts, pairs, need_train=rlhf.algo != "dpo")
    final_prompts = _final_prompts(rlhf, tokens, inputs, prompts)
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

    provenance = {"tokenizer_sha256": inputs.tokenizer.sha256,
                  "vocab_kind": inputs.raw.get("vocab_kind")}
    best = _write_models(out, result, policy, model / TOKENIZER, provenance, rlhf.algo)
    # The pretrained model, the starting policy (the SFT model, the KL reference) and the
    # best policy on the final prompts, with the same random draws: what RLHF is judged by.
    final = _final_evaluation(tuner, judge, inputs.tokenizer, final_prompts,
                              {"pretrained": base, "start": tuner.reference, "best": best})
    del reward_model
    val_bpb_after = val_bpb(best)
    bpb = BitsPerByte(val_bpb_pretrained[0], val_bpb_before[0], val_bpb_after[0],
                      (val_bpb_pretrained[1], val_bpb_before[1], val_bpb_after[1]))
    judged = with_final_scores(result, final)
    summary = rlhf_metrics(rlhf, judged, final.pretrained.summary(), final.wins, bpb,
                           final_errors(final, bpb))
    # A weighted list's "reward" is its one-line sum; each reward gets its own keys.
    if rlhf.weighted:
        summary = {**summary, "reward": rlhf.reward_label(),
                   **component_metrics(judged.start, judged.best)}
    if prompt_scores is not None:
        write_item_scores(prompt_scores, "rlhf prompts", prompt_table(final))
    write_json(metrics, summary)
    say("rlhf", summary_line(summary))
    return summary


def _final_prompts(rlhf: RlhfParams, tokens: Path, inputs: _Inputs,
                   prompts: RolloutPrompts) -> torch.Tensor:
    """The final evaluation's (F, 1 + K) prompts: the openings of the first
    rlhf.final_prompts test documents with K tokens (K: the rollout prompts' length), or
    the periodic evaluation's held-out prompts when rlhf.final_prompts is 0."""
    if not rlhf.final_prompts:
        return prompts.heldout
    require_splits(inputs.tokens_meta, tokens, "test")
    found = opening_prompts(read_tokens(tokens / "test"), prompts.length, rlhf.final_prompts)
    if not len(found):
        raise GptpipeError(f"{tokens / 'test'}: no document of {prompts.length} tokens to "
                           "open a final evaluation prompt; allowed: a larger test split, "
                           "or rlhf.final_prompts: 0 (the held-out prompts)")
    return found


def _final_evaluation(tuner: Tuner, judge: GoldJudge, tokenizer: TextTokenizer,
                      prompts: torch.Tensor, models: dict[str, GPT]) -> FinalEvaluation:
    """Each model sampled once on every final prompt and scored as the periodic
    evaluations are (their seed, scorers and KL reference), prompt by prompt. On the
    held-out prompts (rlhf.final_prompts: 0) this repeats the periodic evaluations'
    samples exactly; the best policy's win rates are judged with rlhf.seed, as ever."""
    scores = {name: tuner.score_model(gpt, prompts) for name, gpt in models.items()}
    summary = {name: s.summary() for name, s in scores.items()}
    stand_in = TuneResult({}, 0, summary["start"], summary["best"], summary["best"], 0)
    wins = win_rates(judge, tokenizer, prompts, stand_in, summary["pretrained"],
                     tuner.rlhf.seed)
    return FinalEvaluation(prompt_texts(tokenizer, prompts), scores["pretrained"],
                           scores["start"], scores["best"], wins)


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


def _val_bpb(params: Params, tokens: Path, inputs: _Inputs
             ) -> Callable[[GPT], tuple[float, float]]:
    """A model's bits per byte on the val split (every token, or evaluate.max_tokens of
    them) and its bootstrap standard error over documents, as a function of the model."""
    val_tokens = read_tokens(tokens / "val")
    val = inputs.tokens_meta["splits"]["val"]
    byte_lengths = inputs.tokenizer.byte_lengths()

    def val_bpb(model: GPT) -> tuple[float, float]:
        scores = score_split(model, val_tokens, val["bytes"], model.config.context,
                             params.rlhf.batch_size, model.lm_head.weight.device,
                             max_tokens=params.evaluate.budget, byte_lengths=byte_lengths,
                             split_token_bytes=val.get("token_bytes"))
        errors = scores.errors(params.evaluate.resamples, params.evaluate.resample_seed)
        return scores.metrics["bpb"], errors["bpb_se"]

    return val_bpb


def _fingerprint(params: Params, device_type: str, **inputs: Path) -> str:
    """What a snapshot must match to be resumed: the rlhf and gold params, the device
    type, and every file of the input folders (and of a python: reward's module).

    The device type, not the param: a generator's state only fits its own kind of
    device, and float results differ between kinds. --tokens is left out: the val bits
    per byte are recomputed at every start, never carried in a snapshot.
    """
    rlhf = params.rlhf
    # rlhf.final_prompts sizes the evaluation after the run, never the run itself.
    settings = {"rlhf": {k: v for k, v in asdict(rlhf).items()
                         if k not in ("device", "final_prompts")},
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
    prompt_scores="The Parquet table of the final evaluation's per-prompt scores to write.",
)
optional_paths(main, "prompt_scores")
