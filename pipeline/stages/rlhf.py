"""rlhf: tune the policy with PPO, GRPO, RLOO or REINFORCE against the reward of your
choice, or with DPO on the preference pairs; judge it with the gold judge.

Reads:   --model (models/sft: the policy RL starts from, also the frozen KL reference,
         and its tokenizer), --pretrained (models/pretrain/best: the likelihood reward's
         scorer, and the model the tuned policy is compared with), --reward
         (models/reward: the reward model, scored beside any reward), --pairs
         (data/preferences: train.jsonl gives the rollout prompts and DPO's pairs,
         heldout.jsonl the evaluation prompts, meta.json the tokenizer the pairs were
         sampled with), --tokens (data/tokens: the val split, for bits per byte), and
         rlhf.reward_module (a python: reward's file; dvc.yaml tracks it)
Params:  rlhf (algorithm, reward, budget, sampling, optimizer, KL penalty, PPO/GRPO/DPO
         settings, evaluation cadence, selection and patience, seed, device), gold (the
         judge), evaluate.max_tokens (the most val tokens the bits per byte score)
Writes:  --out (models/rlhf/): best/ and last/, GPT checkpoints (model.safetensors,
         gptpipe.json, tokenizer.json) that `gptpipe generate` and the evaluate stage load;
         --checkpoint (checkpoints/rlhf/: the resumable state, a DVC `persist` output);
         --live (dvclive/rlhf/): per-step plots; --metrics (metrics/rlhf.json): algo,
         reward, steps, stopped_early, best_step, gold_pretrained, gold_before,
         gold_after, rm_pretrained, rm_before, rm_after, reward_before, reward_after,
         win_rate (over the pretrained model), win_rate_vs_start (over the SFT policy),
         kl_best, kl_final, val_bpb_pretrained, val_bpb_before, val_bpb_after,
         val_bpb_change_pct (after against the pretrained model).

Rewards (``rlhf.reward``, :mod:`pipeline.alignment.rewards`): model, gold, likelihood or
python:<file.py>:<function>. Whatever RL maximizes, every evaluation reports the gold
score and the reward model's score beside it.

The KL reference is the starting policy, the SFT model (as InstructGPT): the penalty
keeps RL near the answers fine-tuning taught; a pretrained reference would pull the
policy back toward raw continuation, undoing what SFT did.

Prompts. Rollouts need prompts of one length (``sampling.sample_batch`` runs a batch without
padding), so every prompt of train.jsonl and heldout.jsonl is encoded and cut to K
tokens, K = the shortest prompt's token count (capped so that <bos> + K +
rlhf.max_new_tokens fits the context). Builtin pairs all have preferences.prompt_tokens
tokens, so nothing is cut; a file with one short prompt cuts every prompt to it, which
the stage reports. Duplicate prompts count once. Evaluation uses the first
rlhf.eval_prompts distinct held-out prompts.

Best policy: by ``rlhf.select_by`` on the held-out prompts: gold (the default), the
stand-in for human judgment (the reward model only approximates it, and the policy is
optimized against the reward, so the reward is the score that overstates progress), or
the reward itself; ``rlhf.patience`` evaluations without a better one stop the run
early. ``*_after`` are the best policy's; ``win_rate`` is how often the gold judge
prefers the best policy's completion over the pretrained model's on the same held-out
prompt and random draws (ties half); ``kl_final`` is the last policy's KL to the
reference on the held-out samples (nats per sequence); the bits per byte are over every
val token.

Refuses, with one line, exit 2 and nothing written: a pretrained model, reward model,
pairs or token shards made with another tokenizer than the policy's, a prompt +
completion longer than the context, and a python: reward that cannot be imported (at
the start) or that raises or returns anything but a finite number (when it does; the
snapshots on disk stay whole). Outputs are written only at the end (dvclive plots as
the run goes).

Resume. At every evaluation the run is snapshotted in --checkpoint
(``pipeline.alignment.tuner.Tuner``, through ``pipeline.core.runs.RunFolder``). Re-running
after a crash, a kill, Ctrl-C or SIGTERM resumes from the snapshot when it is an
unfinished one of this run: same rlhf and gold params, same device type, the same bytes
in every file of --model, --pretrained, --reward, --pairs and a python: reward's module
(sha256), and the same gptpipe source, so a changed input never resumes an old
snapshot. The resumed run gives the same models and
metrics, bit for bit, as an uninterrupted one on the same device; dvclive rows logged
after the snapshot are dropped, so no step is plotted twice. (--tokens is not in the
fingerprint: the val bits per byte are recomputed at every start and the end, never
carried in the snapshot.)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.inputs import encode_pairs, prompt_tensors
from pipeline.alignment.policy_eval import win_rate
from pipeline.alignment.preference_data import made_with as pairs_made_with
from pipeline.alignment.preference_data import read_pairs_dir, visible_text
from pipeline.alignment.reward_model import load_reward_model
from pipeline.alignment.rewards import load_function, make_scorer
from pipeline.alignment.tuner import Tuner, TuneResult
from pipeline.core.device import pick_device
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.live import finish_live, start_live
from pipeline.core.params import Params
from pipeline.core.progress import progress
from pipeline.core.runs import run_fingerprint
from pipeline.core.stage import say, stage_command
from pipeline.data.shards import made_with as shards_made_with
from pipeline.data.shards import read_meta, read_tokens, require_splits
from pipeline.data.tokenizer import MadeWith, require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER, load_model, open_model_folder, write_model_files
from pipeline.lm.evaluation import evaluate_split
from pipeline.lm.model import GPT


def run(params: Params, *, model: Path, pretrained: Path, reward: Path, pairs: Path,
        tokens: Path, out: Path, checkpoint: Path, live: Path,
        metrics: Path) -> dict[str, Any]:
    """Tune the policy (resuming from ``checkpoint`` when it can); write every output."""
    rlhf = params.rlhf
    device = pick_device(rlhf.device, key="rlhf.device")
    # Every input is checked before anything is loaded onto the device or written.
    config, raw, tokenizer = open_model_folder(model)
    base_config, _, base_tokenizer = open_model_folder(pretrained)
    reward_config, _, reward_tokenizer = open_model_folder(reward)
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
    python_reward = rlhf.python_reward()
    # Imported once, now: an import that fails, fails before anything is loaded.
    reward_function = None if python_reward is None else load_function(*python_reward,
                                                                       rlhf.reward)
    prompts = prompt_tensors(
        tokenizer, [p.prompt for p in train_pairs], [p.prompt for p in heldout_pairs],
        config.context, rlhf.max_new_tokens, rlhf.eval_prompts, pairs,
        need_train=rlhf.algo != "dpo")
    train_prompts, eval_prompts, length = prompts.train, prompts.heldout, prompts.length
    val_tokens = read_tokens(tokens / "val")
    # The device type, not the param: a generator's state only fits its own kind of
    # device, and float results differ between kinds. --tokens is left out: the val bits
    # per byte are recomputed at every start, never carried in a snapshot.
    settings = {"rlhf": {k: v for k, v in asdict(rlhf).items() if k != "device"},
                "gold": asdict(params.gold), "device": device.type}
    inputs = {"model": model, "pretrained": pretrained, "reward": reward, "pairs": pairs}
    if python_reward is not None:
        inputs["reward_module"] = Path(python_reward[0])
    fingerprint = run_fingerprint(settings, inputs)

    torch.manual_seed(rlhf.seed)
    policy, _ = load_model(model, device)
    base, _ = load_model(pretrained, device)
    base.eval().requires_grad_(False)
    reward_model = load_reward_model(reward, device)
    judge = GoldJudge.from_params(params.gold)
    scorer = make_scorer(rlhf.reward, reward_function, reward_model_scorer=reward_model.score_ids,
                         judge=judge, tokenizer=tokenizer, pretrained=base,
                         likelihood_per_token=rlhf.likelihood_per_token)
    what = "pairs" if rlhf.algo == "dpo" else "completions"
    say("rlhf", f"{rlhf.algo} on {device}, reward {rlhf.reward}: {rlhf.steps} steps of "
                f"{rlhf.batch_size} {what}; {train_prompts.shape[0]} train and "
                f"{eval_prompts.shape[0]} held-out prompts of {length} tokens")
    if prompts.empty:
        say("rlhf", f"{prompts.empty} empty prompts (no token) left out of the rollout and "
                    "evaluation prompts: every prompt is cut to the shortest one's length")
    # Before the Tuner exists: resuming loads the snapshot's weights into ``policy``.
    byte_lengths = tokenizer.byte_lengths()

    def val_bpb(model: GPT) -> float:
        """Bits per byte on val: every token, or evaluate.max_tokens of them."""
        val = tokens_meta["splits"]["val"]
        return evaluate_split(model, val_tokens, val["bytes"], model.config.context,
                              rlhf.batch_size, model.lm_head.weight.device,
                              max_tokens=params.evaluate.budget, byte_lengths=byte_lengths,
                              split_token_bytes=val.get("token_bytes"))["bpb"]

    val_bpb_pretrained = val_bpb(base)
    val_bpb_before = val_bpb(policy)

    def gold(prompt_ids: list[int], completion_ids: list[int]) -> float:
        return judge.score(visible_text(tokenizer, prompt_ids),
                           visible_text(tokenizer, completion_ids))

    encoded = encode_pairs(tokenizer, train_pairs) if rlhf.algo == "dpo" else ()
    rm_scorer = None if rlhf.reward == "model" else reward_model.score_ids
    tuner = Tuner(policy, rlhf, scorer, gold, train_prompts, eval_prompts, encoded,
                  checkpoint, fingerprint, rm_scorer)
    result = _tune(tuner, live)
    # The pretrained model on the same prompts and random draws: what RLHF is judged
    # against (the starting policy is the SFT model, its KL reference).
    pretrained_eval = tuner.evaluate_model(base)
    del reward_model

    provenance = {"tokenizer_sha256": tokenizer.sha256, "vocab_kind": raw.get("vocab_kind")}
    best = _write_models(out, result, policy, model / TOKENIZER, provenance, rlhf.algo)
    val_bpb_after = val_bpb(best)
    prompts = [visible_text(tokenizer, row[1:]) for row in eval_prompts.tolist()]
    texts = {name: [visible_text(tokenizer, ids) for ids in e.completions]
             for name, e in (("best", result.best), ("start", result.start),
                             ("pretrained", pretrained_eval))}
    wins = win_rate(judge, prompts, texts["best"], texts["pretrained"],
                    np.random.default_rng(rlhf.seed))
    wins_start = win_rate(judge, prompts, texts["best"], texts["start"],
                          np.random.default_rng(rlhf.seed))
    summary = {
        "algo": rlhf.algo,
        "reward": rlhf.reward,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "gold_pretrained": round(pretrained_eval.gold_score, 6),
        "gold_before": round(result.start.gold_score, 6),
        "gold_after": round(result.best.gold_score, 6),
        "rm_pretrained": round(pretrained_eval.rm_score, 6),
        "rm_before": round(result.start.rm_score, 6),
        "rm_after": round(result.best.rm_score, 6),
        "reward_before": round(result.start.reward, 6),
        "reward_after": round(result.best.reward, 6),
        "win_rate": round(wins, 6),
        "win_rate_vs_start": round(wins_start, 6),
        "kl_best": round(result.best.kl, 6),
        "kl_final": round(result.last.kl, 6),
        "val_bpb_pretrained": round(val_bpb_pretrained, 6),
        "val_bpb_before": round(val_bpb_before, 6),
        "val_bpb_after": round(val_bpb_after, 6),
        "val_bpb_change_pct": round(
            100 * (val_bpb_after - val_bpb_pretrained) / val_bpb_pretrained, 4),
    }
    write_json(metrics, summary)
    say("rlhf", f"best step {result.best_step}{' (stopped early)' if result.stopped_early else ''}"
                f": gold {summary['gold_pretrained']:.3f} pretrained, "
                f"{summary['gold_before']:.3f} at the start -> {summary['gold_after']:.3f}; "
                f"reward model {summary['rm_before']:.3f} -> {summary['rm_after']:.3f}; win "
                f"rate {wins:.3f} over the pretrained model; val {val_bpb_pretrained:.4f} -> "
                f"{val_bpb_after:.4f} bits/byte")
    return summary


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
