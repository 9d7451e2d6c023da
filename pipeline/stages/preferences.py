"""preferences: build (prompt, chosen, rejected) pairs and hold some out for evaluation.

Reads:   preferences.source = builtin: --model (models/pretrain/best: weights, config and
         tokenizer) and --prompts-from (data/split/val: the prompts are the openings of its
         documents); preferences.source = file: --file (JSONL with prompt, chosen and
         rejected on each line; format in pipeline/alignment/preference_data.py). --file is a
         dependency either way, so DVC tracks its content.
Params:  preferences (source, sampling, held-out fraction, min_pairs), gold (the judge that
         labels builtin pairs and scores every pair for the metrics)
Writes:  --out (data/preferences/): train.jsonl and heldout.jsonl (the same JSONL format;
         a pair's side is set by a hash of its prompt), meta.json (source, counts and the
         sha256 of the tokenizer the builtin pairs were sampled with, null for a file);
         --metrics (metrics/preferences.json): pairs.train, pairs.heldout, source,
         gold.chosen_mean, gold.rejected_mean, gold.accuracy (how often the judge scores
         chosen above rejected, a tie counting half), ties_dropped, empty_dropped, prompts.

Refuses, with one line and nothing written: fewer than preferences.min_pairs pairs in all,
or a split left empty (at least one train and one held-out pair).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.preference_data import (
    HELDOUT_FILE,
    META_FILE,
    TRAIN_FILE,
    Pair,
    builtin_pairs,
    gold_score_stats,
    heldout_split,
    read_pairs_jsonl,
    write_pairs_jsonl,
)
from pipeline.core.device import pick_device
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.lm.folder import ModelFolder


def _sampled_pairs(params: Params, model_dir: Path, val_dir: Path,
                   judge: GoldJudge) -> tuple[list[Pair], dict[str, Any], str]:
    """Builtin pairs, their stats and the sha256 of the tokenizer they were sampled with."""
    device = pick_device(params.preferences.device, key="preferences.device")
    folder = ModelFolder.open(model_dir)
    tokenizer = folder.tokenizer()
    model = folder.load_model(device)
    say("preferences", f"sampling {params.preferences.completions_per_prompt} completions of "
                       f"up to {params.preferences.num_prompts} val prompts with {model_dir} "
                       f"on {device}")
    pairs, stats = builtin_pairs(model, tokenizer, val_dir, params.preferences, judge, device)
    if len(pairs) < params.preferences.min_pairs:
        if stats["prompts"] < params.preferences.num_prompts:  # the val split ran out
            fix = ("the val split has no more prompts: use a larger corpus or split.val, or "
                   "lower preferences.prompt_tokens or preferences.min_pairs")
        else:
            fix = "raise preferences.num_prompts or preferences.temperature"
        raise GptpipeError(
            f"preferences: {len(pairs)} pairs from {stats['prompts']} val prompts "
            f"({stats['ties_dropped']} ties and {stats['empty_dropped']} empty completions "
            f"dropped), fewer than preferences.min_pairs = {params.preferences.min_pairs}; "
            f"{fix}"
        )
    return pairs, stats, tokenizer.sha256


def _check_split(train: list[Pair], heldout: list[Pair], fraction: float, where: str) -> None:
    for name, side in (("train", train), ("held-out", heldout)):
        if not side:
            raise GptpipeError(
                f"{where}: no {name} pair after holding out preferences.heldout_fraction = "
                f"{fraction:g} by prompt ({len(train) + len(heldout)} pairs); use pairs with "
                "more distinct prompts, or another heldout_fraction"
            )


@torch.no_grad()
def run(params: Params, *, model: Path, prompts_from: Path, file: Path, out: Path,
        metrics: Path) -> dict[str, Any]:
    """Write the pairs (builtin or from ``file``) and their metrics; return the metrics."""
    model_dir, val_dir = model, prompts_from
    settings = params.preferences
    judge = GoldJudge.from_params(params.gold)
    if settings.source == "builtin":
        pairs, stats, tokenizer_sha = _sampled_pairs(params, model_dir, val_dir, judge)
        where = f"pairs sampled from {model_dir}"
    else:
        pairs = read_pairs_jsonl(file, settings.min_pairs)
        stats = {"prompts": len({p.prompt for p in pairs}), "ties_dropped": 0,
                 "empty_dropped": 0}
        tokenizer_sha = None
        where = str(file)
    train, heldout = heldout_split(pairs, settings.heldout_fraction)
    _check_split(train, heldout, settings.heldout_fraction, where)
    gold = gold_score_stats(pairs, judge)
    meta = {"source": settings.source, "tokenizer_sha256": tokenizer_sha,
            "pairs_train": len(train), "pairs_heldout": len(heldout)}
    with atomic_dir(out) as tmp:
        write_pairs_jsonl(tmp / TRAIN_FILE, train)
        write_pairs_jsonl(tmp / HELDOUT_FILE, heldout)
        write_json(tmp / META_FILE, meta)
    result = {
        "source": settings.source,
        "prompts": stats["prompts"],
        "pairs.train": len(train),
        "pairs.heldout": len(heldout),
        "ties_dropped": stats["ties_dropped"],
        "empty_dropped": stats["empty_dropped"],
        **{f"gold.{key}": value for key, value in gold.items()},
    }
    write_json(metrics, result)
    say("preferences", f"{len(train)} train and {len(heldout)} held-out pairs "
                       f"({settings.source}); gold score chosen {gold['chosen_mean']:.3f} vs "
                       f"rejected {gold['rejected_mean']:.3f}; {stats['ties_dropped']} ties "
                       "dropped")
    return result


main = stage_command(
    "preferences", run,
    model="The pretrained model that samples the builtin pairs (source: builtin).",
    prompts_from="The document table whose openings are the builtin prompts (the val split).",
    file="The JSONL preference pairs, read when preferences.source is file.",
    out="The folder to write train.jsonl, heldout.jsonl and meta.json into.",
    metrics="",
)
