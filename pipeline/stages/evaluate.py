"""evaluate: score a model on every val and test token, against baselines, and sample it.

Reads:   --model (a checkpoint directory: models/pretrain/best), data/tokens (train, val
         and test shards + meta.json), data/split/test (the prompts' source), data/clean
         (hashed for the fingerprint only)
Params:  evaluate (batch size, device, prompts, temperatures, seed, sampling limits), and
         split (seed and ratios, recorded in the fingerprint)
Writes:  --metrics (metrics/evaluate.json): flat keys per split, e.g. ``val.bpb``,
         ``test.ppl``: loss (nats/token), ppl, bpb (bits per UTF-8 byte), acc (next-token
         top-1), tokens, unigram_bpb and bigram_bpb (baselines fitted on the train split with
         the same tokenizer), plus ``fingerprint.*``: what the numbers depend on;
         --samples (evaluation/samples.json): each prompt completed once per temperature
         with a fixed seed.

Perplexity and loss are per token, so they only compare between runs whose fingerprints
(clean corpus, split, tokenizer) are equal; bits per byte compares across tokenizers.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import click
import torch

from pipeline.checkpoint import load_model
from pipeline.device import pick_device
from pipeline.doctable import iter_texts
from pipeline.errors import GptpipeError
from pipeline.evaluation import (
    baseline_metrics,
    corpus_fingerprint,
    evaluate_split,
    fit_baselines,
)
from pipeline.io import atomic_path, write_json
from pipeline.params import EvaluateParams, SplitParams, load_params
from pipeline.sampling import SamplingConfig, sample_text
from pipeline.shards import check_matches, read_meta, read_tokens
from pipeline.tokenizer import load_tokenizer

SCORED_SPLITS = ("val", "test")


def _autocast(device: torch.device):
    """bfloat16 (float16 without it) autocast on CUDA, as in pretraining; else float32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def default_prompts(test_dir: Path, count: int, words: int) -> list[str]:
    """The opening ``words`` words of the first ``count`` test documents, in stored order."""
    prompts: list[str] = []
    for batch in iter_texts(test_dir, batch_size=max(count, 1)):
        for text in batch:
            opening = " ".join(text.split()[:words])
            if opening:
                prompts.append(opening)
            if len(prompts) == count:
                return prompts
    return prompts


def score(model, meta: dict, tokens_dir: Path, params: EvaluateParams, device) -> dict:
    """Every token of val and test through the model, and the two baselines."""
    context = model.config.context
    train_ids = read_tokens(tokens_dir / "train")
    vocab = int(meta["vocab_size"])
    baselines = fit_baselines(train_ids, vocab)
    metrics: dict[str, float] = {}
    for split in SCORED_SPLITS:
        ids = read_tokens(tokens_dir / split)
        split_bytes = int(meta["splits"][split]["bytes"])
        if len(ids) < 2:
            raise GptpipeError(f"{tokens_dir / split}: fewer than 2 tokens; nothing to score")
        result = evaluate_split(model, ids, split_bytes, context, params.batch_size, device,
                                _autocast(device))
        for key, value in result.items():
            metrics[f"{split}.{key}"] = value
        for key, value in baseline_metrics(baselines, ids, split_bytes).items():
            metrics[f"{split}.{key}"] = value
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def samples(model, tokenizer, prompts: list[str], params: EvaluateParams) -> list[dict]:
    rows = []
    index = 0
    for prompt in prompts:
        for temperature in params.temperatures:
            config = SamplingConfig(temperature=temperature, top_k=params.top_k,
                                    top_p=params.top_p, max_new_tokens=params.max_new_tokens)
            seed = params.seed + index
            completion = sample_text(model, tokenizer, prompt, config, seed)
            rows.append({"prompt": prompt, "temperature": temperature, "seed": seed,
                         "completion": completion})
            index += 1
    return rows


def run(params_path: Path, model_dir: Path, tokens_dir: Path, test_dir: Path, clean_dir: Path,
        metrics_path: Path, samples_path: Path) -> dict:
    params = load_params(params_path)
    device = pick_device(params.evaluate.device, key="evaluate.device")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise GptpipeError(f"{tokenizer_path}: missing; a model directory holds its tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    meta = read_meta(tokens_dir)
    check_matches(meta, tokenizer, tokens_dir)
    for split in ("train", *SCORED_SPLITS):
        if split not in meta["splits"]:
            raise GptpipeError(f"{tokens_dir}/meta.json has no '{split}' split; "
                               "allowed: shards with train, val and test")
    model, _ = load_model(model_dir, device)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise GptpipeError(
            f"{model_dir}: the model has {model.config.vocab_size} token ids but its tokenizer "
            f"has {tokenizer.vocab_size}; allowed: a checkpoint written by gptpipe pretrain"
        )
    print(f"evaluate: {model_dir} on {device}", flush=True)
    metrics = score(model, meta, tokens_dir, params.evaluate, device)
    if not math.isfinite(metrics["val.loss"]):
        raise GptpipeError(f"{model_dir}: the val loss is {metrics['val.loss']}; the model's "
                           "weights are broken (allowed: a checkpoint with a finite loss)")
    metrics.update(fingerprint(clean_dir, params.split, tokenizer.sha256))
    prompts = params.evaluate.prompts or default_prompts(
        test_dir, params.evaluate.num_prompts, params.evaluate.prompt_words)
    rows = samples(model, tokenizer, prompts, params.evaluate)
    with atomic_path(samples_path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_json(metrics_path, metrics)
    for split in SCORED_SPLITS:
        print(f"evaluate: {split}: {metrics[f'{split}.bpb']:.4f} bits/byte "
              f"(bigram {metrics[f'{split}.bigram_bpb']:.4f}, unigram "
              f"{metrics[f'{split}.unigram_bpb']:.4f}), ppl {metrics[f'{split}.ppl']:.2f}, "
              f"top-1 {metrics[f'{split}.acc']:.3f}", flush=True)
    return metrics


def fingerprint(clean_dir: Path, split: SplitParams, tokenizer_sha: str) -> dict[str, str]:
    """What per-token numbers depend on; bits per byte stays comparable when these differ."""
    files = sorted(p for p in clean_dir.rglob("*") if p.is_file())
    if not files:
        raise GptpipeError(f"{clean_dir}: no clean corpus files to fingerprint")
    ratios = f"{split.train:g}/{split.val:g}/{split.test:g}"
    return {
        "fingerprint.corpus": corpus_fingerprint(files)[:16],
        "fingerprint.split": f"seed {split.seed}, {ratios}",
        "fingerprint.tokenizer": tokenizer_sha[:16],
    }


@click.command("evaluate")
@click.option("--params", "params_path", required=True, type=click.Path(path_type=Path),
              help="params.yaml (reads the evaluate and split sections).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Checkpoint directory to evaluate (model, config and tokenizer).")
@click.option("--tokens", "tokens_dir", required=True, type=click.Path(path_type=Path),
              help="Token shards with train, val and test splits.")
@click.option("--prompts-from", "test_dir", required=True, type=click.Path(path_type=Path),
              help="Document table whose openings are the default prompts (the test split).")
@click.option("--clean", "clean_dir", required=True, type=click.Path(path_type=Path),
              help="Clean corpus table, hashed into the metrics' fingerprint.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(path_type=Path),
              help="Metrics JSON to write (flat keys such as val.bpb).")
@click.option("--samples", "samples_path", required=True, type=click.Path(path_type=Path),
              help="JSON file of prompt completions to write.")
def main(params_path, model_dir, tokens_dir, test_dir, clean_dir, metrics_path, samples_path):
    """Score a checkpoint on every val and test token, with baselines, and sample it."""
    torch.set_grad_enabled(False)
    run(params_path, model_dir, tokens_dir, test_dir, clean_dir, metrics_path, samples_path)
