"""rlhf: tune the pretrained policy with PPO or REINFORCE against the reward model, or with
DPO on the preference pairs; judge it with the gold judge.

Reads:   --model (models/pretrain/best: the starting policy, also the frozen KL reference,
         and its tokenizer), --reward (models/reward: the reward model), --pairs
         (data/preferences: train.jsonl gives the rollout prompts and DPO's pairs,
         heldout.jsonl the evaluation prompts, meta.json the tokenizer the pairs were
         sampled with), --tokens (data/tokens: the val split, for bits per byte)
Params:  rlhf (algorithm, budget, sampling, optimizer, KL penalty, PPO/DPO settings,
         evaluation cadence, seed, device), gold (the judge)
Writes:  --out (models/rlhf/): best/ and last/, GPT checkpoints (model.safetensors,
         config.json, tokenizer.json) that `gptpipe generate` and the evaluate stage load;
         --checkpoint (checkpoints/rlhf/: the resumable state, a DVC `persist` output);
         --live (dvclive/rlhf/): per-step plots; --metrics (metrics/rlhf.json): algo,
         steps, best_step, gold_before, gold_after, rm_before, rm_after, win_rate,
         kl_final, val_bpb_before, val_bpb_after, val_bpb_change_pct.

Prompts. Rollouts need prompts of one length (``rlhf.sample_batch`` runs a batch without
padding), so every prompt of train.jsonl and heldout.jsonl is encoded and cut to K
tokens, K = the shortest prompt's token count (capped so that <bos> + K +
rlhf.max_new_tokens fits the context). Builtin pairs all have preferences.prompt_tokens
tokens, so nothing is cut; a file with one short prompt cuts every prompt to it, which
the stage reports. Duplicate prompts count once. Evaluation uses the first
rlhf.eval_prompts distinct held-out prompts.

Best policy: by gold score on the held-out prompts, the stand-in for human judgment
(the reward model only approximates it, and the policy is optimized against the reward
model, so its score is the one that overstates progress). ``gold_after``/``rm_after`` are
the best policy's; ``win_rate`` is how often the gold judge prefers the best policy's
completion over the pretrained one's on the same held-out prompt (ties half);
``kl_final`` is the last policy's KL to the reference on the held-out samples (nats per
sequence); the bits per byte are over every val token, before and after (best policy).

Refuses, with one line, exit 2 and nothing written: a reward model, pairs or token
shards made with another tokenizer than the policy's, and a prompt + completion longer
than the context. Outputs are written only at the end (dvclive plots as the run goes).

Resume. At every evaluation the run is snapshotted in --checkpoint (``pipeline.rlhf.
Tuner``). Re-running after a crash, a kill or Ctrl-C resumes from the snapshot when it is
an unfinished one of this run: same rlhf and gold params, same device type, and the same
bytes in every file of --model, --reward and --pairs (sha256), so a changed input never
resumes an old snapshot. The resumed run gives the same models and metrics, bit for bit,
as an uninterrupted one on the same device; dvclive rows logged after the snapshot are
dropped, so no step is plotted twice. (--tokens is not in the fingerprint: the val bits
per byte are recomputed at every start and the end, never carried in the snapshot.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from pipeline.checkpoint import CONFIG, TOKENIZER, load_model, read_config, write_model_files
from pipeline.device import pick_device
from pipeline.errors import GptpipeError
from pipeline.evaluation import evaluate_split
from pipeline.generate import check_tokenizer
from pipeline.gold import GoldJudge
from pipeline.io import atomic_dir, remove_stale_temps, sha256_file, source_digest, write_json
from pipeline.live import finish_live, start_live
from pipeline.model import GPT
from pipeline.params import Params, load_params
from pipeline.preference_data import Pair, read_pairs_dir, visible_text
from pipeline.progress import progress
from pipeline.reward_model import load_reward_model
from pipeline.rlhf import EncodedPair, Tuner, TuneResult, win_rate
from pipeline.shards import read_meta, read_tokens
from pipeline.tokenizer import BOS_ID, TextTokenizer, load_tokenizer

META_FILE = "meta.json"


# ------------------------------------------------------------------------------ inputs


def _other_tokenizer(path: Path, what: str, theirs: str, ours: str, model_dir: Path) -> None:
    if theirs != ours:
        raise GptpipeError(
            f"{path}: {what} made with another tokenizer than the policy {model_dir} "
            f"(sha256 {str(theirs)[:12]} vs {ours[:12]}); allowed: inputs built from the "
            "policy's tokenizer (re-run the stages after vocab)"
        )


def _check_reward_dir(reward_dir: Path, sha: str, model_dir: Path) -> None:
    """The reward model must read the policy's token ids: same tokenizer file."""
    _, raw = read_config(reward_dir)
    if raw.get("tokenizer_sha256") is not None:
        _other_tokenizer(reward_dir / CONFIG, "the reward model was", raw["tokenizer_sha256"],
                         sha, model_dir)
    tokenizer_file = reward_dir / TOKENIZER
    if not tokenizer_file.is_file():
        raise GptpipeError(f"{tokenizer_file}: missing; a model directory holds its tokenizer")
    _other_tokenizer(tokenizer_file, "the reward model was", sha256_file(tokenizer_file), sha,
                     model_dir)


def _read_pairs(pairs_dir: Path, sha: str, model_dir: Path) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs, once meta.json shows they were sampled with our tokenizer
    (a file source records none: text carries no tokenizer)."""
    train, heldout, meta = read_pairs_dir(pairs_dir)
    if meta.get("tokenizer_sha256") is not None:
        _other_tokenizer(pairs_dir / META_FILE, "the pairs were sampled by a model",
                         meta["tokenizer_sha256"], sha, model_dir)
    return train, heldout


def _check_tokens(tokens_dir: Path, sha: str, model_dir: Path) -> dict[str, Any]:
    meta = read_meta(tokens_dir)
    _other_tokenizer(tokens_dir / META_FILE, "the token shards were", meta["tokenizer_sha256"],
                     sha, model_dir)
    if "val" not in meta["splits"]:
        raise GptpipeError(f"{tokens_dir / META_FILE} has no 'val' split; allowed: shards "
                           "written by gptpipe tokenize (train, val and test)")
    return meta


def prompt_tensors(
    tokenizer: TextTokenizer, train: list[str], heldout: list[str], context: int,
    max_new_tokens: int, eval_prompts: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train prompts (P, 1 + K), eval prompts (E, 1 + K), K): <bos> + the first K ids of
    each distinct prompt, K the shortest prompt's length within the context budget."""
    train = list(dict.fromkeys(train))
    heldout = list(dict.fromkeys(heldout))[:eval_prompts]
    encoded = tokenizer.encode_batch(train + heldout)
    budget = context - 1 - max_new_tokens
    if budget < 0:
        raise GptpipeError(
            f"rlhf.max_new_tokens = {max_new_tokens}; allowed: at most {context - 1} (the "
            f"model's context, {context}, holds <bos> + prompt + completion)"
        )
    length = min(min(len(ids) for ids in encoded), budget)
    rows = [[BOS_ID, *ids[:length]] for ids in encoded]
    train_rows = torch.tensor(rows[: len(train)], dtype=torch.long)
    eval_rows = torch.tensor(rows[len(train) :], dtype=torch.long)
    return train_rows, eval_rows, length


def encode_pairs(tokenizer: TextTokenizer, pairs: list[Pair]) -> list[EncodedPair]:
    """DPO's pairs as ids: <bos> + prompt; completions encoded apart (a token boundary at
    the prompt's end, as the policy sampled them) and without <eos>."""
    count = len(pairs)
    encoded = tokenizer.encode_batch([p.prompt for p in pairs] + [p.chosen for p in pairs]
                                     + [p.rejected for p in pairs])
    return [EncodedPair([BOS_ID, *encoded[i]], encoded[count + i], encoded[2 * count + i])
            for i in range(count)]


# ------------------------------------------------------------------------------- output


def run_fingerprint(params: Params, device: torch.device, inputs: dict[str, Path]) -> str:
    """What a snapshot must share with this run to be resumed: every rlhf and gold param
    (rlhf.device as the device type it resolved to: a generator's state only fits its own
    device, and float results differ between devices), and the sha256 of every file under
    each of ``inputs`` (name -> folder), and gptpipe's own source. Hashing the bytes, not
    sizes or dates, means any new policy, reward model, pairs or code start afresh."""
    hashes = {}
    for name, folder in sorted(inputs.items()):
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            hashes[f"{name}/{path.relative_to(folder).as_posix()}"] = sha256_file(path)
    body = {
        "rlhf": {k: v for k, v in asdict(params.rlhf).items() if k != "device"},
        "gold": asdict(params.gold),
        "device": device.type,
        "inputs": hashes,
        "code": source_digest(),  # other gptpipe code: another run (io.source_digest)
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _val_bpb(model: GPT, val_tokens: np.ndarray, meta: dict, batch: int,
             device: torch.device) -> float:
    scores = evaluate_split(model, val_tokens, meta["splits"]["val"]["bytes"],
                            model.config.context, batch, device)
    return scores["bpb"]


def _write_models(out: Path, result: TuneResult, last: GPT, model_dir: Path, meta: dict,
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
            }, model_dir / TOKENIZER)
    return best


# ---------------------------------------------------------------------------------- run


def run(params_path: Path, model_dir: Path, reward_dir: Path, pairs_dir: Path,
        tokens_dir: Path, out: Path, checkpoint: Path, live_dir: Path,
        metrics_path: Path) -> dict[str, Any]:
    params = load_params(params_path)
    rlhf = params.rlhf
    device = pick_device(rlhf.device, key="rlhf.device")
    # Every input is checked before anything is loaded onto the device or written.
    config, raw = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER)
    check_tokenizer(tokenizer, model_dir / TOKENIZER, config, raw, model_dir)
    sha = tokenizer.sha256
    _check_reward_dir(reward_dir, sha, model_dir)
    train_pairs, heldout_pairs = _read_pairs(pairs_dir, sha, model_dir)
    tokens_meta = _check_tokens(tokens_dir, sha, model_dir)
    train_prompts, eval_prompts, length = prompt_tensors(
        tokenizer, [p.prompt for p in train_pairs], [p.prompt for p in heldout_pairs],
        config.context, rlhf.max_new_tokens, rlhf.eval_prompts)
    val_tokens = read_tokens(tokens_dir / "val")
    fingerprint = run_fingerprint(params, device, {"model": model_dir, "reward": reward_dir,
                                                   "pairs": pairs_dir})

    torch.manual_seed(rlhf.seed)
    policy, _ = load_model(model_dir, device)
    reward_model = load_reward_model(reward_dir, device)
    judge = GoldJudge.from_params(params.gold)
    print(f"rlhf: {rlhf.algo} on {device}: {rlhf.steps} steps of {rlhf.batch_size} "
          f"{'pairs' if rlhf.algo == 'dpo' else 'prompts'}; {train_prompts.shape[0]} train and "
          f"{eval_prompts.shape[0]} held-out prompts of {length} tokens", flush=True)
    return _tune_and_report(params, policy, reward_model, judge, tokenizer, train_pairs,
                            train_prompts, eval_prompts, val_tokens, tokens_meta, raw,
                            model_dir, out, checkpoint, fingerprint, live_dir, metrics_path)


def _tune_and_report(params: Params, policy: GPT, reward_model, judge: GoldJudge,
                     tokenizer: TextTokenizer, train_pairs, train_prompts, eval_prompts,
                     val_tokens, tokens_meta, raw, model_dir, out, checkpoint: Path,
                     fingerprint: str, live_dir, metrics_path) -> dict[str, Any]:
    rlhf = params.rlhf
    device = policy.lm_head.weight.device
    # Before the Tuner exists: resuming loads the snapshot's weights into ``policy``.
    val_bpb_before = _val_bpb(policy, val_tokens, tokens_meta, rlhf.batch_size, device)

    def gold(prompt_ids: list[int], completion_ids: list[int]) -> float:
        return judge.score(visible_text(tokenizer, prompt_ids),
                           visible_text(tokenizer, completion_ids))

    pairs = encode_pairs(tokenizer, train_pairs) if rlhf.algo == "dpo" else ()
    tuner = Tuner(policy, rlhf, reward_model.score_ids, gold, train_prompts, eval_prompts,
                  pairs, checkpoint, fingerprint)
    remove_stale_temps(out)
    live = start_live(live_dir, tuner.resumed_from)
    bar = progress(total=rlhf.steps, desc="rlhf", unit="step", initial=tuner.step)

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
    del reward_model

    meta = {"tokenizer_sha256": tokenizer.sha256, "vocab_kind": raw.get("vocab_kind")}
    best = _write_models(out, result, policy, model_dir, meta, rlhf.algo)
    val_bpb_after = _val_bpb(best, val_tokens, tokens_meta, rlhf.batch_size, device)
    prompts = [visible_text(tokenizer, row[1:]) for row in eval_prompts.tolist()]
    texts = [[visible_text(tokenizer, ids) for ids in e.completions]
             for e in (result.best, result.start)]
    wins = win_rate(judge, prompts, texts[0], texts[1], np.random.default_rng(rlhf.seed))
    metrics = {
        "algo": rlhf.algo,
        "steps": result.steps,
        "best_step": result.best_step,
        "gold_before": round(result.start.gold_score, 6),
        "gold_after": round(result.best.gold_score, 6),
        "rm_before": round(result.start.rm_score, 6),
        "rm_after": round(result.best.rm_score, 6),
        "win_rate": round(wins, 6),
        "kl_final": round(result.last.kl, 6),
        "val_bpb_before": round(val_bpb_before, 6),
        "val_bpb_after": round(val_bpb_after, 6),
        "val_bpb_change_pct": round(100 * (val_bpb_after - val_bpb_before) / val_bpb_before, 4),
    }
    write_json(metrics_path, metrics)
    print(f"rlhf: best step {result.best_step}: gold {metrics['gold_before']:.3f} -> "
          f"{metrics['gold_after']:.3f}, reward model {metrics['rm_before']:.3f} -> "
          f"{metrics['rm_after']:.3f}, win rate {wins:.3f} over the pretrained model; val "
          f"{val_bpb_before:.4f} -> {val_bpb_after:.4f} bits/byte", flush=True)
    return metrics


@click.command("rlhf")
@click.option("--params", "params_path", required=True, type=click.Path(path_type=Path),
              help="params.yaml (reads the rlhf and gold sections).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Pretrained checkpoint: the starting policy and the KL reference.")
@click.option("--reward", "reward_dir", required=True, type=click.Path(path_type=Path),
              help="Reward model directory written by gptpipe reward.")
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(path_type=Path),
              help="Folder written by gptpipe preferences (train.jsonl, heldout.jsonl).")
@click.option("--tokens", "tokens_dir", required=True, type=click.Path(path_type=Path),
              help="Token shards (the val split scores bits per byte before and after).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (best/ and last/ checkpoints).")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Resumable training-state directory (kept between runs).")
@click.option("--live", "live_dir", required=True, type=click.Path(path_type=Path),
              help="dvclive directory for per-step plots.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(path_type=Path),
              help="Final metrics JSON.")
def main(params_path, model_dir, reward_dir, pairs_dir, tokens_dir, out, checkpoint, live_dir,
         metrics_path):
    """Tune the pretrained policy (PPO, REINFORCE or DPO); judge it by the gold judge;
    resumes from --checkpoint after an interruption."""
    run(params_path, model_dir, reward_dir, pairs_dir, tokens_dir, out, checkpoint, live_dir,
        metrics_path)
