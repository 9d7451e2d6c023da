"""Supervised fine-tuning: teach the pretrained model to answer prompts before RL.

InstructGPT, TRL's PPO recipe and nanochat all start reinforcement learning from a
supervised fine-tuned policy. Here the examples are (prompt, response) pairs:

- by default the chosen completions of the preference pairs: the best of
  ``preferences.completions_per_prompt`` samples by the gold judge, which makes this
  rejection-sampling fine-tuning (best-of-n, as Llama 2 used it): no download needed;
- or a user's JSONL file (:func:`read_examples`, checked line by line), each line one of
  ``{"prompt": ..., "response": ...}``; TRL's ``{"prompt": ..., "completion": ...}`` (the
  same, in TRL's word); or TRL's conversational records, ``{"messages": [...]}`` (the
  last message the assistant's answer) or ``prompt`` and ``completion`` lists of
  ``{"role", "content"}`` messages, written out as text by :mod:`pipeline.alignment.chat`.

Each example is the sequence ``<bos> prompt response <eos>``, the prompt and response
encoded apart (a token boundary between them, as the policy samples), and the loss is
the cross-entropy of the response tokens and the closing ``<eos>`` only
(``rl_losses.response_loss``): the model learns to answer, not to write prompts. A
sequence longer than the context loses prompt tokens from its start first, then the
response's end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.alignment.chat import conversational_example, is_conversation
from pipeline.alignment.gradients import finite_gradient_norm
from pipeline.alignment.preference_data import Pair, json_object, string_fields
from pipeline.alignment.rl_losses import response_loss
from pipeline.core.errors import GptpipeError
from pipeline.core.io import numbered_lines
from pipeline.core.params import SftParams
from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer
from pipeline.lm.model import GPT
from pipeline.lm.optim import adamw


@dataclass(frozen=True)
class Example:
    """One supervised example: ``response`` is the answer to ``prompt``."""

    prompt: str
    response: str


@dataclass(frozen=True)
class EncodedExample:
    """``ids`` = <bos> prompt response <eos>; ids[start:] are the response and <eos>."""

    ids: list[int]
    start: int


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file, in file order; refuses a file with none. Each line
    is checked: UTF-8, a JSON object in one of the forms of the module docstring, every
    text a string (a prompt may be empty, a response may not)."""
    path = Path(path)
    examples = [example for number, line in numbered_lines(path, "sft file")
                if (example := _parse_example(f"{path}: line {number}", line)) is not None]
    if not examples:
        raise GptpipeError(f"{path}: no example; allowed: JSONL lines with prompt and "
                           "response (or completion), or messages")
    return examples


def _parse_example(where: str, line: bytes) -> Example | None:
    """The example on one line, None for a blank line; a one-line error otherwise."""
    record = json_object(where, line, "prompt and response")
    if record is None:
        return None
    if "response" in record and "completion" in record:
        raise GptpipeError(f"{where}: both response and completion; allowed: one of them "
                           "(TRL says completion for gptpipe's response)")
    if "messages" in record or is_conversation(record.get("prompt")):
        prompt, response = conversational_example(where, record)
        record = {"prompt": prompt, "response": response}
    answer = "completion" if "completion" in record else "response"
    texts = string_fields(where, record, {"prompt": True, answer: False})
    return Example(texts["prompt"], texts[answer])


def from_pairs(pairs: Sequence[Pair]) -> list[Example]:
    """The chosen completion of each preference pair as the response to its prompt."""
    return [Example(pair.prompt, pair.chosen) for pair in pairs]


def encode_examples(tokenizer: TextTokenizer, examples: Sequence[Example],
                    context: int) -> list[EncodedExample]:
    """Each example as the model reads it (see the module docstring), within
    ``context`` tokens."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples])
    responses = tokenizer.encode_batch([e.response for e in examples])
    encoded = []
    for prompt, response in zip(prompts, responses, strict=True):
        answer = [*response, EOS_ID][: context - 1]  # the response's end goes last
        room = context - 1 - len(answer)
        kept = prompt[max(0, len(prompt) - room):] if room else []
        ids = [BOS_ID, *kept, *answer]
        encoded.append(EncodedExample(ids, 1 + len(kept)))
    return encoded


def _batch(examples: Sequence[EncodedExample], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs (B, L - 1), targets (B, L - 1) and the response mask (B, L - 1), right
    padded with <pad> (causal attention: padding never changes a real position)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    response = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        # Target j is ids[j + 1]: the response's tokens are targets start - 1 onward.
        response[row, example.start - 1 : len(example.ids) - 1] = True
    ids, response = ids.to(device), response.to(device)
    return ids[:, :-1], ids[:, 1:], response


def sft_loss(model: GPT, examples: Sequence[EncodedExample],
             batch_size: int = 32) -> float | None:
    """The mean response-token cross-entropy (nats) of ``examples``, no gradient; None
    when there is no example (no loss to report, rather than a perfect 0)."""
    if not examples:
        return None
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for first in range(0, len(examples), batch_size):
                inputs, targets, response = _batch(examples[first : first + batch_size], device)
                logits, _ = model(inputs)
                tokens = int(response.sum())
                total += float(response_loss(logits, targets, response)) * tokens
                count += tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


def example_losses(model: GPT, examples: Sequence[EncodedExample],
                   batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per example, the summed response-token nats ((N,) float64) and the response
    tokens counted ((N,) int64): what :func:`sft_loss` averages, kept apart so that the
    held-out loss gets a standard error and two runs compare example by example."""
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    nats, tokens = [], []
    try:
        with torch.no_grad():
            for first in range(0, len(examples), batch_size):
                inputs, targets, response = _batch(examples[first : first + batch_size], device)
                logits, _ = model(inputs)
                per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                            reduction="none").view(targets.shape)  # (B, T)
                nats += (per_token * response).double().sum(dim=1).cpu().tolist()
                tokens += response.sum(dim=1).cpu().tolist()
    finally:
        model.train(was_training)
    return np.array(nats, np.float64), np.array(tokens, np.int64)


def train_sft(model: GPT, examples: Sequence[EncodedExample], params: SftParams,
              device: torch.device,
              on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place for ``params.epochs`` passes over ``examples`` in an
    order shuffled by a generator seeded with ``params.seed``; AdamW at a constant
    ``params.lr``, gradients clipped at ``params.grad_clip`` (0: off); a loss or a gradient
    that is not finite stops it before the optimizer step. Returns each epoch's mean
    training loss; ``on_epoch(epoch, loss)`` after each."""
    model.to(device).train()
    optimizer = adamw(model, lr=params.lr, weight_decay=params.weight_decay,
                      betas=(0.9, 0.95), device=device)
    generator = torch.Generator().manual_seed(params.seed)
    losses = []
    with torch.enable_grad():
        for epoch in range(1, params.epochs + 1):
            order = torch.randperm(len(examples), generator=generator).tolist()
            total, count = 0.0, 0
            for first in range(0, len(order), params.batch_size):
                picked = [examples[i] for i in order[first : first + params.batch_size]]
                inputs, targets, response = _batch(picked, device)
                logits, _ = model(inputs)
                loss = response_loss(logits, targets, response)
                if not torch.isfinite(loss):
                    raise GptpipeError(f"sft: the loss is {loss.item()} at epoch {epoch}; "
                                       "lower sft.lr or set sft.grad_clip > 0")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                finite_gradient_norm(model, params.grad_clip,
                                     f"sft: the loss's gradient at epoch {epoch}", "sft.lr")
                optimizer.step()
                tokens = int(response.sum())
                total += float(loss.detach()) * tokens
                count += tokens
            losses.append(total / max(count, 1))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    model.eval()
    return losses
