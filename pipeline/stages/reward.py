"""reward: train the GPT reward model (Bradley-Terry) and a TF-IDF baseline on the pairs.

Reads:   --model (models/pretrain/best: the body the reward model starts from, and its
         tokenizer), --pairs (data/preferences: train.jsonl, heldout.jsonl, meta.json)
Params:  reward (epochs, batch size, optimizer, seed, device, the baseline's settings)
Writes:  --out (models/reward/): model.safetensors, gptpipe.json ("kind": "reward", the GPT
         config, the tokenizer's sha256, the per-epoch losses) and tokenizer.json;
         --metrics (metrics/reward.json): gpt.{train,heldout}_accuracy,
         gpt.heldout_margin, gpt.train_loss (the last epoch's mean), baseline.{train,
         heldout}_accuracy, baseline.heldout_margin, pairs.train, pairs.heldout; each
         held-out accuracy with its Wilson 95% interval (*_lo, *_hi), each margin with
         its standard error (*_se); --pair-scores (evaluation/reward_pairs.parquet): one
         row per held-out pair (pair, prompt_sha256, pair_sha256, both models' scores
         and outcomes), for paired comparisons between runs.

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
    pair_rewards,
    save_reward_model,
    train_reward_model,
)
from pipeline.core.device import pick_device
from pipeline.core.io import write_json
from pipeline.core.item_scores import optional_paths, text_hash, write_item_scores
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.core.stats import mean_se, wilson_interval
from pipeline.data.tokenizer import require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER
from pipeline.lm.folder import ModelFolder


def run(params: Params, *, model: Path, pairs: Path, out: Path, metrics: Path,
        pair_scores: Path | None = None) -> dict[str, Any]:
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
    scored = pair_rewards(reward_model, tokenizer, heldout)
    gpt_heldout = scored.summary()
    baseline = TfidfPreferenceBaseline(settings.baseline_max_features, settings.baseline_c,
                                       seed=settings.seed).fit(train)
    baseline_margins = baseline.margins(heldout)
    result = {
        "gpt.train_accuracy": gpt_train["accuracy"],
        "gpt.heldout_accuracy": gpt_heldout["accuracy"],
        "gpt.heldout_margin": gpt_heldout["mean_margin"],
        "gpt.train_loss": history["epoch_losses"][-1],
        "baseline.train_accuracy": baseline.accuracy(train),
        "baseline.heldout_accuracy": baseline.accuracy(heldout),
        "baseline.heldout_margin": float(np.mean(baseline_margins)),
        "pairs.train": len(train),
        "pairs.heldout": len(heldout),
        **heldout_uncertainty("gpt", scored.outcomes(),
                              (scored.chosen - scored.rejected).double().numpy()),
        **heldout_uncertainty("baseline", _baseline_outcomes(baseline_margins),
                              np.asarray(baseline_margins, np.float64)),
    }
    result = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
    save_reward_model(out, reward_model, model / TOKENIZER, {
        "epoch_losses": [round(x, 6) for x in history["epoch_losses"]],
        "pairs_source": meta.get("source"),
    })
    if pair_scores is not None:
        write_item_scores(pair_scores, "reward pairs", {
            "pair": list(range(len(heldout))),
            "prompt_sha256": [text_hash(pair.prompt) for pair in heldout],
            "pair_sha256": [text_hash("\0".join((pair.prompt, pair.chosen, pair.rejected)))
                            for pair in heldout],
            "gpt_chosen": scored.chosen.double().numpy(),
            "gpt_rejected": scored.rejected.double().numpy(),
            "gpt_outcome": scored.outcomes(),
            "baseline_margin": np.asarray(baseline_margins, np.float64),
            "baseline_outcome": _baseline_outcomes(baseline_margins),
        })
    write_json(metrics, result)
    say("reward", f"held-out accuracy {result['gpt.heldout_accuracy']:.3f} (TF-IDF baseline "
                  f"{result['baseline.heldout_accuracy']:.3f}), margin "
                  f"{result['gpt.heldout_margin']:.3f}; train accuracy "
                  f"{result['gpt.train_accuracy']:.3f}")
    return result


def heldout_uncertainty(model: str, outcomes: np.ndarray, margins: np.ndarray
                        ) -> dict[str, float | None]:
    """The Wilson 95% interval of a model's held-out accuracy (``outcomes``: 1, 0.5 for
    a tie, 0 per pair) and the standard error of its mean margin."""
    low, high = wilson_interval(float(np.sum(outcomes)), len(outcomes))
    return {f"{model}.heldout_accuracy_lo": low, f"{model}.heldout_accuracy_hi": high,
            f"{model}.heldout_margin_se": mean_se(margins)}


def _baseline_outcomes(margins: np.ndarray) -> np.ndarray:
    """The baseline's per-pair outcome, as its accuracy counts it (a zero margin: half)."""
    margins = np.asarray(margins, np.float32)
    return np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))


main = stage_command(
    "reward", run,
    model="The pretrained model whose body the reward model starts from.",
    pairs="",
    out="The reward model folder to write.",
    metrics="",
    pair_scores="The Parquet table of per-pair held-out scores to write.",
)
optional_paths(main, "pair_scores")
