"""reward: train the GPT reward model (Bradley-Terry) and a TF-IDF baseline on the pairs.

Reads:   --model (models/pretrain/best: the body the reward model starts from, and its
         tokenizer), --pairs (data/preferences: train.jsonl, heldout.jsonl, meta.json)
Params:  reward (epochs, batch size, optimizer, seed, device, the baseline's settings)
Writes:  --out (models/reward/): model.safetensors, gptpipe.json ("kind": "reward", the GPT
         config, the tokenizer's sha256, the per-epoch losses) and tokenizer.json;
         --metrics (metrics/reward.json): gpt.{train,heldout}_accuracy,
         gpt.heldout_margin, gpt.train_loss (the last epoch's mean), baseline.{train,
         heldout}_accuracy, baseline.heldout_margin, pairs.train, pairs.heldout.

Accuracy is the share of pairs whose chosen completion scores above the rejected one
(a tie counts half); margin is the mean score difference, in logits for both models.
The baseline counts words in any script (``reward_model.baseline_terms``).

Refuses, with one line and nothing written: a pairs folder without train.jsonl or
heldout.jsonl, or pairs sampled with another tokenizer than --model's (meta.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.alignment.preference_data import made_with as pairs_made_with
from pipeline.alignment.preference_data import read_pairs_dir
from pipeline.alignment.reward_model import (
    RewardModel,
    TfidfPreferenceBaseline,
    evaluate_reward_model,
    save_reward_model,
    train_reward_model,
)
from pipeline.core.device import pick_device
from pipeline.core.io import write_json
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.data.tokenizer import require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER
from pipeline.lm.folder import ModelFolder


def run(params: Params, *, model: Path, pairs: Path, out: Path,
        metrics: Path) -> dict[str, Any]:
    """Train and score the reward model and the baseline; write both outputs."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on recent GPUs; no-op on CPU
    settings = params.reward
    device = pick_device(settings.device, key="reward.device")
    pretrained = ModelFolder.open(model)
    tokenizer = pretrained.tokenizer()
    train, heldout, meta = read_pairs_dir(pairs)
    require_tokenizer(tokenizer, pairs_made_with(meta, pairs))
    reward_model = RewardModel.from_pretrained(pretrained, device, seed=settings.seed)
    say("reward", f"{len(train)} train and {len(heldout)} held-out pairs; {settings.epochs} "
                  f"epochs on {device}")
    history = train_reward_model(
        reward_model, tokenizer, train, settings, device,
        on_epoch=lambda epoch, loss: say("reward", f"epoch {epoch}: loss {loss:.4f}"),
    )
    gpt_train = evaluate_reward_model(reward_model, tokenizer, train)
    gpt_heldout = evaluate_reward_model(reward_model, tokenizer, heldout)
    baseline = TfidfPreferenceBaseline(settings.baseline_max_features, settings.baseline_c,
                                       seed=settings.seed).fit(train)
    result = {
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
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
    save_reward_model(out, reward_model, model / TOKENIZER, {
        "epoch_losses": [round(x, 6) for x in history["epoch_losses"]],
        "pairs_source": meta.get("source"),
    })
    write_json(metrics, result)
    say("reward", f"held-out accuracy {result['gpt.heldout_accuracy']:.3f} (TF-IDF baseline "
                  f"{result['baseline.heldout_accuracy']:.3f}), margin "
                  f"{result['gpt.heldout_margin']:.3f}; train accuracy "
                  f"{result['gpt.train_accuracy']:.3f}")
    return result


main = stage_command(
    "reward", run,
    model="The pretrained model whose body the reward model starts from.",
    pairs="",
    out="The reward model folder to write.",
    metrics="",
)
