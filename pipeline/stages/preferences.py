"""preferences: build (prompt, chosen, rejected) pairs and hold some out for evaluation.

Reads:   preferences.source = builtin: --model (models/pretrain/best: weights, config and
         tokenizer) and --prompts-from (data/split/val: the prompts are the openings of its
         documents); preferences.source = file: --file (JSONL with prompt, chosen and
         rejected on each line; format in pipeline/preference_data.py). --file is a
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

import click
import torch

from pipeline.checkpoint import load_model
from pipeline.device import pick_device
from pipeline.errors import GptpipeError
from pipeline.gold import GoldJudge
from pipeline.io import atomic_dir, write_json
from pipeline.params import Params, load_params
from pipeline.preference_data import (
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
from pipeline.tokenizer import load_tokenizer


def _sampled_pairs(params: Params, model_dir: Path, val_dir: Path,
                   judge: GoldJudge) -> tuple[list[Pair], dict[str, Any], str]:
    """Builtin pairs, their stats and the sha256 of the tokenizer they were sampled with."""
    device = pick_device(params.preferences.device, key="preferences.device")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise GptpipeError(f"{tokenizer_path}: missing; a model directory holds its tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    model, _ = load_model(model_dir, device)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise GptpipeError(
            f"{model_dir}: the model has {model.config.vocab_size} token ids but its tokenizer "
            f"has {tokenizer.vocab_size}; allowed: a checkpoint written by gptpipe pretrain"
        )
    print(f"preferences: sampling {params.preferences.completions_per_prompt} completions of "
          f"up to {params.preferences.num_prompts} val prompts with {model_dir} on {device}",
          flush=True)
    pairs, stats = builtin_pairs(model, tokenizer, val_dir, params.preferences, judge, device)
    if len(pairs) < params.preferences.min_pairs:
        raise GptpipeError(
            f"preferences: {len(pairs)} pairs from {stats['prompts']} val prompts "
            f"({stats['ties_dropped']} ties and {stats['empty_dropped']} empty completions "
            f"dropped); allowed: at least preferences.min_pairs = "
            f"{params.preferences.min_pairs} (raise preferences.num_prompts or temperature)"
        )
    return pairs, stats, tokenizer.sha256


def _check_split(train: list[Pair], heldout: list[Pair], fraction: float, where: str) -> None:
    for name, side in (("train", train), ("held-out", heldout)):
        if not side:
            raise GptpipeError(
                f"{where}: no {name} pair after holding out preferences.heldout_fraction = "
                f"{fraction:g} by prompt ({len(train) + len(heldout)} pairs); allowed: pairs "
                "with more distinct prompts, or another heldout_fraction"
            )


def run(params_path: Path, model_dir: Path, val_dir: Path, file: Path, out: Path,
        metrics_path: Path) -> dict[str, Any]:
    params = load_params(params_path)
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
    metrics = {
        "source": settings.source,
        "prompts": stats["prompts"],
        "pairs.train": len(train),
        "pairs.heldout": len(heldout),
        "ties_dropped": stats["ties_dropped"],
        "empty_dropped": stats["empty_dropped"],
        **{f"gold.{key}": value for key, value in gold.items()},
    }
    write_json(metrics_path, metrics)
    print(f"preferences: {len(train)} train and {len(heldout)} held-out pairs ({settings.source}"
          f"); gold score chosen {gold['chosen_mean']:.3f} vs rejected "
          f"{gold['rejected_mean']:.3f}; {stats['ties_dropped']} ties dropped", flush=True)
    return metrics


@click.command("preferences")
@click.option("--params", "params_path", required=True, type=click.Path(path_type=Path),
              help="params.yaml (reads the preferences and gold sections).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Pretrained checkpoint that samples the builtin pairs (source: builtin).")
@click.option("--prompts-from", "val_dir", required=True, type=click.Path(path_type=Path),
              help="Document table whose openings are the builtin prompts (the val split).")
@click.option("--file", "file", required=True, type=click.Path(path_type=Path),
              help="JSONL preference pairs, read when preferences.source is file.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Directory to write train.jsonl, heldout.jsonl and meta.json into.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(path_type=Path),
              help="Metrics JSON to write (pair counts, gold scores).")
def main(params_path, model_dir, val_dir, file, out, metrics_path):
    """Build preference pairs from the gold judge or a JSONL file; hold some out."""
    with torch.no_grad():
        run(params_path, model_dir, val_dir, file, out, metrics_path)
