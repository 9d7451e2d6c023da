"""evaluate: score a model on every val and test token and on multiple-choice tasks,
against baselines, and sample it.

Reads:   --model (a model folder: models/pretrain/best), --tokens (data/tokens: train,
         val and test shards and meta.json), --prompts-from (data/split/test: the default
         prompts and the builtin task's sentences), --split (data/split: the val and test
         document tables, which name the scored documents), --clean (data/clean, hashed
         for the fingerprint only), --task-file (a JSONL multiple-choice task, read when
         evaluate.task is file or both)
Params:  evaluate (batch size, device, token budget, tasks, prompts, temperatures, seed,
         sampling limits, bootstrap resamples and seed), split (seed and ratios,
         recorded in the fingerprint), data.sources (figures per source)
Writes:  --metrics (metrics/evaluate.json): flat keys per split (val.*, test.*: loss,
         ppl, bpb, acc, each with its standard error *_se, tokens, bytes, documents,
         unigram_bpb, bigram_bpb; with several sources, <split>.sources.<name>.*: bpb
         and loss with their *_se, documents, tokens, bytes), per task (next_sentence.*,
         task_file.*: items, acc, acc_norm, acc_pmi, each with its 95% interval *_lo
         and *_hi, the bigram's bigram_acc*, chance) and fingerprint.* (what the numbers depend on);
         --document-scores (evaluation/documents.parquet): one row per scored document
         of val and test (split, its row in the split table, id, text_sha256, source,
         tokens, bytes, nats, correct); --task-scores (evaluation/tasks.parquet): one row
         per task item (task, item, item_sha256, label, choices, and whether each rule
         answered right); --samples (evaluation/samples.json): each prompt completed once
         per temperature with a fixed seed.

Standard errors are bootstrapped over documents (pipeline/lm/unit_scores.py), with
evaluate.resamples draws seeded by evaluate.resample_seed, so they are the same on every
run; accuracies carry Wilson intervals (pipeline/core/stats.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.core.device import pick_device
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_path, write_json
from pipeline.core.item_scores import optional_paths, write_item_scores
from pipeline.core.params import EvaluateParams, Params, SplitParams
from pipeline.core.stage import say, stage_command
from pipeline.core.stats import Z95, wilson_interval
from pipeline.data.shards import made_with, read_meta, read_tokens, require_splits
from pipeline.data.tokenizer import require_tokenizer
from pipeline.lm.evaluation import (
    SplitScores,
    baseline_metrics,
    corpus_fingerprint,
    document_openings,
    fit_baselines,
    score_split,
    scoring_plan,
)
from pipeline.lm.folder import ModelFolder
from pipeline.lm.sampling import SamplingConfig, sample_text
from pipeline.lm.score_tables import MODEL_RULES, document_rows, task_rows
from pipeline.lm.tasks import (
    Item,
    TaskScores,
    next_sentence_items,
    read_task_file,
    score_task_items,
)
from pipeline.lm.unit_scores import source_figures

SCORED_SPLITS = ("val", "test")


def _autocast(device: torch.device):
    """bfloat16 (float16 without it) autocast on CUDA, as in pretraining; else float32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def score(model, meta: dict, tokens_dir: Path, params: EvaluateParams, device,
          byte_lengths: np.ndarray, baselines: dict) -> tuple[dict, dict[str, SplitScores]]:
    """val and test through the model and the two baselines (unigram and bigram, fitted on
    the train split with the same tokenizer), on the same tokens: every one, or
    ``evaluate.max_tokens`` of them in evenly spread windows, the same every time.

    loss is nats per token and ppl its exponential; bpb is bits per UTF-8 byte of the
    scored text; acc the next-token top-1 rate; each with its bootstrap standard error.
    Returns the metrics and each split's per-document sums."""
    context = model.config.context
    metrics: dict[str, float] = {}
    scored: dict[str, SplitScores] = {}
    for split in SCORED_SPLITS:
        ids = read_tokens(tokens_dir / split)
        counts = meta["splits"][split]
        if len(ids) < 2:
            raise GptpipeError(f"{tokens_dir / split}: fewer than 2 tokens; nothing to score")
        scored[split] = score_split(model, ids, int(counts["bytes"]), context,
                                    params.batch_size, device, _autocast(device),
                                    params.budget, byte_lengths, counts.get("token_bytes"))
        result = scored[split].metrics
        errors = scored[split].errors(params.resamples, params.resample_seed)
        for key, value in {**result, **errors}.items():
            metrics[f"{split}.{key}"] = value
        plan = scoring_plan(len(ids), context, params.budget)
        for key, value in baseline_metrics(baselines, ids, result["bytes"], plan).items():
            metrics[f"{split}.{key}"] = value
    return _rounded(metrics), scored


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def score_tasks(model, tokenizer, settings: EvaluateParams, test_text: Path, task_file: Path,
                bigram, device) -> tuple[dict, dict[str, tuple[list[Item], TaskScores]]]:
    """The multiple-choice tasks evaluate.task asks for, as flat keys per task: acc,
    acc_norm (per byte of the choice), acc_pmi (given the context minus alone), each with
    its Wilson interval (*_lo, *_hi), the same for the bigram, and chance (see
    pipeline/lm/tasks.py); and each task's items with their answers."""
    tasks = {}
    if settings.task in ("builtin", "both"):
        tasks["next_sentence"] = next_sentence_items(
            test_text, settings.task_items, settings.task_choices, settings.task_seed)
    if settings.task in ("file", "both"):
        tasks["task_file"] = read_task_file(task_file)
    metrics, answered = {}, {}
    for name, items in tasks.items():
        result = score_task_items(model, tokenizer, items, bigram, settings.batch_size,
                                  device, _autocast(device))
        answered[name] = (items, result)
        metrics.update({f"{name}.{key}": value for key, value in result.metrics.items()})
        for rule in MODEL_RULES:
            low, high = wilson_interval(int(result.answers[rule].sum()), len(items))
            metrics.update({f"{name}.{rule}_lo": low, f"{name}.{rule}_hi": high})
    return _rounded(metrics), answered


def sample_rows(model, tokenizer, prompts: list[str], params: EvaluateParams) -> list[dict]:
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


@torch.no_grad()
def run(params: Params, *, model: Path, tokens: Path, prompts_from: Path, clean: Path,
        task_file: Path, metrics: Path, samples: Path, splits: Path | None = None,
        document_scores: Path | None = None, task_scores: Path | None = None) -> dict:
    """Score the ``model`` folder on val, test and the tasks, sample it; write every
    output."""
    settings = params.evaluate
    device = pick_device(settings.device, key="evaluate.device")
    folder = ModelFolder.open(model)
    tokenizer = folder.tokenizer()
    meta = read_meta(tokens)
    require_tokenizer(tokenizer, made_with(meta, tokens))
    require_splits(meta, tokens, "train", *SCORED_SPLITS)
    if settings.task in ("file", "both"):
        read_task_file(task_file)  # a bad line stops the stage before minutes of scoring
    network = folder.load_model(device)
    say("evaluate", f"{model} on {device}")
    baselines = fit_baselines(read_tokens(tokens / "train"), int(meta["vocab_size"]))
    result, scored = score(network, meta, tokens, settings, device, tokenizer.byte_lengths(),
                           baselines)
    if not math.isfinite(result["val.loss"]):
        raise GptpipeError(f"{model}: the val loss is {result['val.loss']}; the model's "
                           "weights are broken (not finite)")
    task_metrics, answered = score_tasks(network, tokenizer, settings, prompts_from,
                                         task_file, baselines["bigram"], device)
    result.update(task_metrics)
    result.update(fingerprint(clean, params.split, tokenizer.sha256))
    prompts = settings.prompts or document_openings(
        prompts_from, settings.num_prompts, settings.prompt_words)
    rows = sample_rows(network, tokenizer, prompts, settings)
    by_source = params.data.sources != "one"
    documents = (document_rows(splits or prompts_from.parent, scored)
                 if document_scores is not None or by_source else None)
    if by_source:
        result.update(_rounded(source_figures(documents, settings.resamples,
                                              settings.resample_seed)))
    if document_scores is not None:
        write_item_scores(document_scores, "documents", documents)
    if task_scores is not None:
        write_item_scores(task_scores, "tasks", task_rows(answered))
    with atomic_path(samples) as tmp:
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_json(metrics, result)
    for split in SCORED_SPLITS:
        say("evaluate", f"{split}: {result[f'{split}.bpb']:.4f} "
                        f"+- {Z95 * result[f'{split}.bpb_se']:.4f} bits/byte "
                        f"(bigram {result[f'{split}.bigram_bpb']:.4f}, unigram "
                        f"{result[f'{split}.unigram_bpb']:.4f}), ppl "
                        f"{result[f'{split}.ppl']:.2f}, top-1 {result[f'{split}.acc']:.3f}")
    for key, value in result.items():
        if ".sources." in key and key.endswith(".bpb"):
            spread = result.get(f"{key}_se")
            say("evaluate", f"{key.removesuffix('.bpb').replace('.sources.', ' source ')}: "
                            f"{value:.4f}" + (f" +- {Z95 * spread:.4f}" if spread is not None
                                              else " (one document: no interval)")
                            + " bits/byte")
    for name in ("next_sentence", "task_file"):
        if f"{name}.acc" in result:
            figures = {key: result[f"{name}.{key}"] for key in (
                "acc", "acc_norm", "acc_pmi", "bigram_acc", "bigram_acc_norm",
                "bigram_acc_pmi", "chance", "items")}
            say("evaluate", "{0}: acc {acc:.3f}, acc_norm {acc_norm:.3f}, acc_pmi {acc_pmi:.3f} "
                            "(bigram {bigram_acc:.3f}, {bigram_acc_norm:.3f}, "
                            "{bigram_acc_pmi:.3f}; chance {chance:.3f}) on {items} items"
                            .format(name, **figures))
    return result


def fingerprint(clean_dir: Path, split: SplitParams, tokenizer_sha: str) -> dict[str, str]:
    """What per-token numbers depend on (the clean corpus, the split, the tokenizer).

    Perplexity and loss are per token, so they compare only between runs whose
    fingerprints are equal; bits per byte compares across tokenizers."""
    files = sorted(p for p in clean_dir.rglob("*") if p.is_file())
    if not files:
        raise GptpipeError(f"{clean_dir}: no clean corpus files to fingerprint")
    ratios = f"{split.train:g}/{split.val:g}/{split.test:g}"
    return {
        "fingerprint.corpus": corpus_fingerprint(files)[:16],
        "fingerprint.split": f"seed {split.seed}, {ratios}",
        "fingerprint.tokenizer": tokenizer_sha[:16],
    }


main = stage_command(
    "evaluate", run,
    model="The model folder to evaluate (weights, config and tokenizer).",
    tokens="",
    prompts_from="The document table whose openings are the default prompts and whose "
                 "sentences make the builtin task (the test split).",
    splits="The split document tables (data/split): their val and test rows name the "
           "scored documents.",
    clean="The clean corpus table, hashed into the metrics' fingerprint (data/clean).",
    task_file="The JSONL multiple-choice task, read when evaluate.task is file or both.",
    metrics="The metrics JSON to write (flat keys such as val.bpb and val.bpb_se).",
    document_scores="The Parquet table of per-document scores to write.",
    task_scores="The Parquet table of per-item task answers to write.",
    samples="The JSON file of prompt completions to write.",
)
optional_paths(main, "splits", "document_scores", "task_scores")
