"""sft: fine-tune the pretrained model on prompt/response examples before RL.

Reads:   --model (models/pretrain/best: the model to fine-tune, with its tokenizer);
         sft.source = pairs: --pairs (data/preferences: the chosen completions of
         train.jsonl are the examples, those of heldout.jsonl measure the loss);
         sft.source = file: --file (JSONL of prompt and response, checked line by line;
         held out by a hash of the prompt). --file is a dependency either way.
Params:  sft (source, file, held-out fraction, epochs, batch size, optimizer, seed,
         device), evaluate.resamples and evaluate.resample_seed (the bootstrap)
Writes:  --out (models/sft/): a model checkpoint (model.safetensors, gptpipe.json,
         tokenizer.json), the policy RL starts from; --metrics (metrics/sft.json):
         source, examples.train, examples.heldout, heldout_loss_before,
         heldout_loss_after (response-token cross-entropy, nats; null when no example
         is held out) each with its bootstrap standard error over the held-out examples
         (*_se), train_loss; --example-scores (evaluation/sft_examples.parquet): one row
         per held-out example (prompt_sha256, tokens, nats before and after).

``sft.epochs: 0`` writes the pretrained model through unchanged, so RL starts from it.
The loss counts response tokens only (``pipeline.alignment.sft``).

Refuses, with one line and nothing written: a bad line of the examples (named by file
and line number), a file with no example left to train on after the held-out ones, and
pairs sampled with another tokenizer than --model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.alignment.preference_data import heldout_split, read_pairs_dir
from pipeline.alignment.preference_data import made_with as pairs_made_with
from pipeline.alignment.sft import (
    Example,
    encode_examples,
    example_losses,
    from_pairs,
    read_examples,
    sft_loss,
    train_sft,
)
from pipeline.core.device import pick_device
from pipeline.core.errors import GptpipeError
from pipeline.core.io import write_json
from pipeline.core.item_scores import optional_paths, text_hash, write_item_scores
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.core.stats import ratio_se
from pipeline.data.tokenizer import require_tokenizer
from pipeline.lm.checkpoint import TOKENIZER, save_model
from pipeline.lm.folder import ModelFolder


def _examples(params: Params, pairs: Path, file: Path, tokenizer
              ) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples from the pairs or the file."""
    settings = params.sft
    if settings.source == "pairs":
        train, heldout, meta = read_pairs_dir(pairs)
        require_tokenizer(tokenizer, pairs_made_with(meta, pairs))
        return from_pairs(train), from_pairs(heldout)
    # Held out by a hash of the prompt, as the preference pairs are.
    train, heldout = heldout_split(read_examples(file), settings.heldout_fraction)
    if not train:
        raise GptpipeError(f"{file}: no example left to train on after holding out "
                           f"sft.heldout_fraction = {settings.heldout_fraction:g} by prompt; "
                           "add examples with other prompts")
    return train, heldout


def run(params: Params, *, model: Path, pairs: Path, file: Path, out: Path,
        metrics: Path, example_scores: Path | None = None) -> dict[str, Any]:
    """Fine-tune (or pass through) the pretrained model; write the model and metrics."""
    settings = params.sft
    device = pick_device(settings.device, key="sft.device")
    folder = ModelFolder.open(model)
    config, meta, tokenizer = folder.config, folder.meta, folder.tokenizer()
    train, heldout = _examples(params, pairs, file, tokenizer)
    torch.manual_seed(settings.seed)
    network = folder.load_model(device)
    train_ids = encode_examples(tokenizer, train, config.context)
    heldout_ids = encode_examples(tokenizer, heldout, config.context)
    before = sft_loss(network, heldout_ids)
    nats_before, response_tokens = example_losses(network, heldout_ids)
    say("sft", f"{len(train)} train and {len(heldout)} held-out examples "
               f"({settings.source}); {settings.epochs} epochs on {device}")
    losses = train_sft(network, train_ids, settings, device,
                       on_epoch=lambda epoch, loss: say("sft", f"epoch {epoch}: loss {loss:.4f}"))
    after = sft_loss(network, heldout_ids)
    nats_after, _ = example_losses(network, heldout_ids)
    provenance = {key: meta[key] for key in ("tokenizer_sha256", "vocab_kind") if key in meta}
    save_model(out, network, config, {**provenance, "sft_epochs": settings.epochs,
                                      "sft_source": settings.source}, model / TOKENIZER)
    result = {
        "source": settings.source,
        "examples.train": len(train),
        "examples.heldout": len(heldout),
        "heldout_loss_before": _rounded(before),
        "heldout_loss_after": _rounded(after),
        "train_loss": round(losses[-1], 6) if losses else None,
        "heldout_loss_before_se": _loss_se(nats_before, response_tokens, params),
        "heldout_loss_after_se": _loss_se(nats_after, response_tokens, params),
    }
    if example_scores is not None:
        write_item_scores(example_scores, "sft examples", {
            "example": list(range(len(heldout))),
            "prompt_sha256": [text_hash(example.prompt) for example in heldout],
            "tokens": response_tokens, "nats_before": nats_before, "nats_after": nats_after,
        })
    write_json(metrics, result)
    if before is None:
        say("sft", f"no held-out example (sft.heldout_fraction = {settings.heldout_fraction:g} "
                   f"held out no prompt of the file), so no held-out loss -> {out}")
    else:
        say("sft", f"held-out response loss {before:.4f} -> {after:.4f} nats/token -> {out}")
    return result


def _loss_se(nats: np.ndarray, tokens: np.ndarray, params: Params) -> float | None:
    """The bootstrap standard error of a held-out loss over its examples (None for fewer
    than two: one example says nothing of the spread)."""
    if len(nats) < 2:
        return None
    return round(ratio_se(nats, tokens, params.evaluate.resamples,
                          params.evaluate.resample_seed), 6)


def _rounded(loss: float | None) -> float | None:
    """A loss as metrics record it: 6 decimals, or null when there is none."""
    return None if loss is None else round(loss, 6)


main = stage_command(
    "sft", run,
    model="The pretrained model to fine-tune (models/pretrain/best).",
    pairs="",
    file="The JSONL of prompt/response examples, read when sft.source is file.",
    out="The model folder to write (models/sft).",
    metrics="",
    example_scores="The Parquet table of per-example held-out losses to write.",
)
optional_paths(main, "example_scores")
