"""reward: train the GPT reward model (Bradley-Terry) and a TF-IDF baseline on the pairs.

Reads:   --model (models/pretrain/best: the body the reward model starts from, and its
         tokenizer), --pairs (data/preferences: train.jsonl, heldout.jsonl, meta.json)
Params:  reward (epochs, batch size, optimizer, seed, device, the baseline's settings)
Writes:  --out (models/reward/): model.safetensors, config.json ("kind": "reward", the GPT
         config, the tokenizer's sha256, the per-epoch losses) and tokenizer.json;
         --metrics (metrics/reward.json): gpt.{train,heldout}_accuracy,
         gpt.heldout_margin, gpt.train_loss (the last epoch's mean), baseline.{train,
         heldout}_accuracy, baseline.heldout_margin, pairs.train, pairs.heldout.

Accuracy is the share of pairs whose chosen completion scores above the rejected one
(a tie counts half); margin is the mean score difference, in logits for both models.
Refuses, with one line and nothing written: a pairs folder without train.jsonl or
heldout.jsonl, or pairs sampled with another tokenizer than --model's (meta.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from pipeline.device import pick_device
from pipeline.errors import GptpipeError
from pipeline.io import remove_stale_temps, write_json
from pipeline.params import load_params
from pipeline.preference_data import read_pairs_dir
from pipeline.reward_model import (
    RewardModel,
    TfidfPreferenceBaseline,
    evaluate_reward_model,
    save_reward_model,
    tokenizer_sha256,
    train_reward_model,
)
from pipeline.tokenizer import load_tokenizer


def _check_tokenizer(meta: dict[str, Any], pairs_dir: Path, model_dir: Path) -> str:
    """The model's tokenizer sha256, once it is known to be the one the pairs came from."""
    ours = tokenizer_sha256(model_dir)
    theirs = meta.get("tokenizer_sha256")
    if theirs is not None and theirs != ours:
        raise GptpipeError(
            f"{pairs_dir} was sampled with another tokenizer than {model_dir} (sha256 "
            f"{str(theirs)[:12]} vs {ours[:12]}); allowed: the model the pairs were sampled "
            "with (re-run gptpipe preferences)"
        )
    return ours


def run(params_path: Path, model_dir: Path, pairs_dir: Path, out: Path,
        metrics_path: Path) -> dict[str, Any]:
    params = load_params(params_path)
    settings = params.reward
    device = pick_device(settings.device, key="reward.device")
    train, heldout, meta = read_pairs_dir(pairs_dir)
    _check_tokenizer(meta, pairs_dir, model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    model = RewardModel.from_pretrained(model_dir, device, seed=settings.seed)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise GptpipeError(
            f"{model_dir}: the model has {model.config.vocab_size} token ids but its tokenizer "
            f"has {tokenizer.vocab_size}; allowed: a checkpoint written by gptpipe pretrain"
        )
    remove_stale_temps(out)
    print(f"reward: {len(train)} train and {len(heldout)} held-out pairs; {settings.epochs} "
          f"epochs on {device}", flush=True)
    history = train_reward_model(
        model, tokenizer, train, settings, device,
        on_epoch=lambda epoch, loss: print(f"reward: epoch {epoch}: loss {loss:.4f}", flush=True),
    )
    gpt_train = evaluate_reward_model(model, tokenizer, train)
    gpt_heldout = evaluate_reward_model(model, tokenizer, heldout)
    baseline = TfidfPreferenceBaseline(settings.baseline_max_features, settings.baseline_c,
                                       seed=settings.seed).fit(train)
    metrics = {
        "gpt.train_accuracy": gpt_train["accuracy"],
        "gpt.heldout_accuracy": gpt_heldout["accuracy"],
        "gpt.heldout_margin": gpt_heldout["mean_margin"],
        "gpt.train_loss": history["epoch_losses"][-1],
        "baseline.train_accuracy": baseline.accuracy(train),
        "baseline.heldout_accuracy": baseline.accuracy(heldout),
        "baseline.heldout_margin": float(np.mean(baseline.margins(heldout))),
        "pairs.train": len(train),
        "pairs.heldout": len(heldout),
    }
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    save_reward_model(out, model, model_dir / "tokenizer.json", {
        "epoch_losses": [round(x, 6) for x in history["epoch_losses"]],
        "pairs_source": meta.get("source"),
    })
    write_json(metrics_path, metrics)
    print(f"reward: held-out accuracy {metrics['gpt.heldout_accuracy']:.3f} (TF-IDF baseline "
          f"{metrics['baseline.heldout_accuracy']:.3f}), margin "
          f"{metrics['gpt.heldout_margin']:.3f}; train accuracy "
          f"{metrics['gpt.train_accuracy']:.3f}", flush=True)
    return metrics


@click.command("reward")
@click.option("--params", "params_path", required=True, type=click.Path(path_type=Path),
              help="params.yaml (reads the reward section).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Pretrained checkpoint whose body the reward model starts from.")
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(path_type=Path),
              help="Folder written by gptpipe preferences (train.jsonl, heldout.jsonl).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Reward model directory to write.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(path_type=Path),
              help="Metrics JSON to write (accuracies and margins, GPT and baseline).")
def main(params_path, model_dir, pairs_dir, out, metrics_path):
    """Train the GPT reward model and a TF-IDF baseline; score both on held-out pairs."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on recent GPUs; no-op on CPU
    run(params_path, model_dir, pairs_dir, out, metrics_path)
