"""Preference pairs: (prompt, chosen, rejected) as JSONL, the held-out split, builtin labels.

The file format is one JSON object per line, UTF-8::

    {"prompt": "The river", "chosen": " flows north into the sea.", "rejected": " the the the"}

- ``prompt`` must be present and a string; it may be empty (an unconditioned completion).
- ``chosen`` and ``rejected`` are non-empty strings (not only whitespace) that differ.
- The completion continues the prompt as written: a completion that starts a new word
  carries its leading space, as the builtin pairs (decoded model samples) do.
- Other keys are allowed and ignored; blank lines are skipped.
- TRL's conversational preference records are read too: ``prompt``, ``chosen`` and
  ``rejected`` as lists of ``{"role", "content"}`` messages, or ``chosen`` and
  ``rejected`` alone sharing their first messages (TRL's implicit prompt); they become
  texts as :mod:`pipeline.alignment.chat` writes conversations. TRL's standard records
  are gptpipe's own.

Every problem is a one-line :class:`GptpipeError` naming the file and the line number.

:func:`builtin_pairs` makes pairs without a human: the pretrained model completes the
openings of val documents, and the gold judge (``pipeline.alignment.gold``) picks the preferred one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from pipeline.alignment.chat import conversational_pair, is_conversation, valid_unicode
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_path, json_line, numbered_lines, read_json
from pipeline.core.params import PreferencesParams
from pipeline.data.doctable import iter_texts
from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, MadeWith, TextTokenizer
from pipeline.data.units import sentence_spans
from pipeline.lm.model import GPT
from pipeline.lm.sampling import SamplingConfig, sample_batch

# What ``gptpipe preferences`` writes into its output folder.
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
META_FILE = "meta.json"

# Sampled rows per sample_batch call: bounds memory (B x (T0 + N) tokens and the KV cache).
SAMPLE_ROWS = 64

# Ids that mark structure, not text; <unk> stays visible (the gold judge penalizes it).
_SILENT_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID})


@dataclass(frozen=True)
class Pair:
    """One preference: ``chosen`` is a better continuation of ``prompt`` than ``rejected``."""

    prompt: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


_Prompted = TypeVar("_Prompted", bound="HasPrompt")


class HasPrompt(Protocol):
    prompt: str


class Judge(Protocol):
    """What :func:`builtin_pairs` needs of ``pipeline.alignment.gold.GoldJudge``."""

    def score(self, prompt: str, completion: str) -> float: ...

    def prefer(self, prompt: str, a: str, b: str, rng: np.random.Generator) -> int: ...


# ------------------------------------------------------------------------------ JSONL


def json_object(where: str, line: bytes, names: str) -> dict[str, Any] | None:
    """The JSON object on one line, None for a blank line; a one-line error naming
    ``where`` for anything else (``names``: the fields a line should hold)."""
    record = json_line(where, line)
    if record is not None and not isinstance(record, dict):
        raise GptpipeError(f"{where}: a JSON {type(record).__name__}; allowed: an object with "
                           f"{names}")
    return record


def string_fields(where: str, record: dict[str, Any], fields: dict[str, bool]
                  ) -> dict[str, str]:
    """The string fields of ``record`` (``fields``: name -> whether it may be empty),
    each checked; a one-line error naming ``where`` and the field otherwise."""
    names = ", ".join(fields)
    for name, may_be_empty in fields.items():
        if name not in record:
            raise GptpipeError(f"{where}: field '{name}' missing; allowed: an object with "
                               f"{names}")
        value = record[name]
        if not isinstance(value, str):
            raise GptpipeError(f"{where}: field '{name}' is a {type(value).__name__}; "
                               "allowed: a string")
        valid_unicode(where, name, value)
        if not may_be_empty and not value.strip():
            raise GptpipeError(f"{where}: field '{name}' is empty; allowed: non-empty text "
                               "(only a prompt may be empty)")
    return {name: record[name] for name in fields}


_PAIR_FIELDS = {"prompt": True, "chosen": False, "rejected": False}


def _parse_line(path: Path, number: int, line: bytes) -> Pair | None:
    """The pair on one line, None for a blank line; a one-line error for anything else.
    A line holds texts, or TRL's conversational messages (:mod:`pipeline.alignment.chat`)."""
    where = f"{path}: line {number}"
    record = json_object(where, line, "prompt, chosen, rejected")
    if record is None:
        return None
    if any(is_conversation(record.get(name)) for name in _PAIR_FIELDS):
        texts = dict(zip(_PAIR_FIELDS, conversational_pair(where, record), strict=True))
        string_fields(where, texts, _PAIR_FIELDS)  # an empty answer is refused alike
    else:
        texts = string_fields(where, record, _PAIR_FIELDS)
    if texts["chosen"] == texts["rejected"]:
        raise GptpipeError(f"{where}: chosen and rejected are the same text; "
                           "allowed: two different completions")
    return Pair(texts["prompt"], texts["chosen"], texts["rejected"])


def read_pairs_jsonl(path: str | Path, min_pairs: int = 1) -> list[Pair]:
    """Every pair of a JSONL file, in file order; refuses a file with fewer than ``min_pairs``."""
    path = Path(path)
    pairs = [
        pair for number, line in numbered_lines(path, "preferences file")
        if (pair := _parse_line(path, number, line)) is not None
    ]
    if len(pairs) < min_pairs:
        raise GptpipeError(f"{path}: {len(pairs)} preference pairs, fewer than "
                           f"preferences.min_pairs = {min_pairs}; add pairs or lower the minimum")
    return pairs


def write_pairs_jsonl(path: str | Path, pairs: Sequence[Pair]) -> None:
    """Write ``pairs`` one JSON object per line (the format above), atomically."""
    lines = [json.dumps(pair.to_dict(), ensure_ascii=False) + "\n" for pair in pairs]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")


def read_pairs_dir(pairs_dir: str | Path) -> tuple[list[Pair], list[Pair], dict[str, Any]]:
    """(train pairs, held-out pairs, meta.json) of a folder written by gptpipe preferences.

    meta.json holds ``tokenizer_sha256``: the tokenizer the builtin pairs were sampled
    with, or None for pairs from a file (text carries no tokenizer).
    """
    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        raise GptpipeError(f"{pairs_dir}: preference pairs folder not found (run gptpipe "
                           "preferences first)")
    for name in (TRAIN_FILE, HELDOUT_FILE):
        if not (pairs_dir / name).is_file():
            raise GptpipeError(f"{pairs_dir}: {name} missing; this folder is written by "
                               "gptpipe preferences (train.jsonl and heldout.jsonl): run it")
    meta_path = pairs_dir / META_FILE
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise GptpipeError(f"{meta_path}: a JSON {type(meta).__name__}; allowed: an object")
    train = read_pairs_jsonl(pairs_dir / TRAIN_FILE, min_pairs=1)
    heldout = read_pairs_jsonl(pairs_dir / HELDOUT_FILE, min_pairs=1)
    return train, heldout, meta


def made_with(meta: dict[str, Any], pairs_dir: str | Path) -> MadeWith:
    """What a pairs folder's meta.json records of the tokenizer that sampled them (None
    for pairs from a file: text carries no tokenizer)."""
    return MadeWith("the preference pairs were", Path(pairs_dir) / META_FILE,
                    meta.get("tokenizer_sha256"))


# ------------------------------------------------------------------------------ split


def prompt_fraction(prompt: str) -> float:
    """A stable number in [0, 1) from the prompt's text (the first 8 bytes of its sha256)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_split(pairs: Sequence[_Prompted], fraction: float
                  ) -> tuple[list[_Prompted], list[_Prompted]]:
    """(train, heldout): a pair (or anything with a ``prompt``, an SFT example say) is held
    out when its prompt's hash falls below ``fraction``.

    Every pair of one prompt lands on the same side, so held-out accuracy is measured on
    prompts the reward model never saw; the side never depends on the other pairs, so
    adding pairs moves none. Order within each side is the input order.
    """
    train: list[Pair] = []
    heldout: list[Pair] = []
    for pair in pairs:
        (heldout if prompt_fraction(pair.prompt) < fraction else train).append(pair)
    return train, heldout


def gold_score_stats(pairs: Sequence[Pair], judge: Judge) -> dict[str, float]:
    """Mean gold score of the chosen and of the rejected completions, and ``accuracy``: the
    share of pairs the judge scores chosen above rejected, a tie counting half (the metric
    the reward models are measured by; for file pairs, how far the judge agrees with them)."""
    if not pairs:
        return {"chosen_mean": 0.0, "rejected_mean": 0.0, "accuracy": 0.0}
    chosen = np.array([judge.score(p.prompt, p.chosen) for p in pairs])
    rejected = np.array([judge.score(p.prompt, p.rejected) for p in pairs])
    accuracy = (chosen > rejected).mean() + 0.5 * (chosen == rejected).mean()
    return {
        "chosen_mean": round(float(chosen.mean()), 6),
        "rejected_mean": round(float(rejected.mean()), 6),
        "accuracy": round(float(accuracy), 6),
    }


# ---------------------------------------------------------------------------- builtin


def visible_text(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids`` without <pad>, <bos> and <eos>; <unk> shows as ``<unk>``."""
    return tokenizer.decode([i for i in ids if i not in _SILENT_IDS])


def val_prompts(
    tokenizer: TextTokenizer, val_dir: str | Path, count: int, prompt_tokens: int
) -> list[list[int]]:
    """``count`` prompts of ``prompt_tokens`` token ids (without <bos>) from the val split.

    First the opening of every usable val document, in stored order. Usable: longer than
    ``prompt_tokens`` tokens (so the prompt is a strict opening), and whose opening decodes
    without U+FFFD (a byte-level token cut inside a character). A split of fewer usable
    documents than ``count`` (a small corpus of long documents: a code base's files, a
    few long notes) then gives openings of their later sentences (lines, in code;
    :func:`pipeline.data.units.sentence_spans`), round by round: every document's second
    sentence, then every third, ... The same table gives the same prompts.
    """
    prompts: list[list[int]] = []
    for texts in iter_texts(val_dir, batch_size=max(256, count)):
        for ids in tokenizer.encode_batch(texts):
            opening = ids[:prompt_tokens]
            if len(ids) <= prompt_tokens or "\ufffd" in tokenizer.decode(opening):
                continue
            prompts.append(opening)
            if len(prompts) == count:
                return prompts
    return prompts + _later_openings(tokenizer, val_dir, count - len(prompts), prompt_tokens)


# Text read after a later sentence start to make its opening: far more than prompt_tokens
# tokens of any tokenizer, so a long document is never encoded whole for one prompt.
_OPENING_CHARS = 4096


def _later_openings(tokenizer: TextTokenizer, val_dir: str | Path, count: int,
                    prompt_tokens: int) -> list[list[int]]:
    """Up to ``count`` openings of val documents' second, third, ... sentences, round by
    round over the documents in stored order (see :func:`val_prompts`)."""
    per_document: list[list[list[int]]] = []
    for texts in iter_texts(val_dir, batch_size=256):
        for text in texts:
            starts = [start for start, _ in sentence_spans(text)[1:count + 1]]
            slices = [text[start:start + _OPENING_CHARS] for start in starts]
            openings = []
            for ids in tokenizer.encode_batch(slices) if slices else []:
                opening = ids[:prompt_tokens]
                if len(ids) > prompt_tokens and "\ufffd" not in tokenizer.decode(opening):
                    openings.append(opening)
            per_document.append(openings)
    later: list[list[int]] = []
    for round_ in range(max(map(len, per_document), default=0)):
        for openings in per_document:
            if round_ < len(openings):
                later.append(openings[round_])
                if len(later) == count:
                    return later
    return later


def sample_completions(
    model: GPT, prompts: Sequence[Sequence[int]], copies: int, config: SamplingConfig,
    generator: torch.Generator, rows_per_call: int = SAMPLE_ROWS,
) -> list[list[list[int]]]:
    """``copies`` sampled completions of each prompt (ids with <bos> first, equal lengths).

    Returns [prompt][copy] -> new ids, cut before <eos>. The rows (prompt 0 copy 0,
    prompt 0 copy 1, ...) are sampled ``rows_per_call`` at a time, in that order, from one
    generator, so a seed fixes every completion.
    """
    device = next(model.parameters()).device
    rows = [list(prompt) for prompt in prompts for _ in range(copies)]
    completions: list[list[int]] = []
    for start in range(0, len(rows), rows_per_call):
        chunk = torch.tensor(rows[start : start + rows_per_call], dtype=torch.long,
                             device=device)  # (B, T0)
        new_tokens, mask = sample_batch(model, chunk, config, generator)  # (B, N) each
        for tokens, keep in zip(new_tokens.tolist(), mask.tolist(), strict=True):
            ids = [t for t, k in zip(tokens, keep, strict=True) if k]
            completions.append(ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids)
    return [completions[i : i + copies] for i in range(0, len(completions), copies)]


def _label(
    prompt: str, texts: list[str], judge: Judge, rng: np.random.Generator
) -> tuple[Pair | None, str]:
    """One pair from a prompt's completions, or None with why ("ties" or "empty")."""
    candidates = [t for t in texts if t.strip()]
    if len(candidates) < 2:
        return None, "empty"
    if len(candidates) == 2:
        a, b = candidates
    else:
        # Best against worst by gold score (first index on equal scores).
        scores = [judge.score(prompt, t) for t in candidates]
        a, b = candidates[int(np.argmax(scores))], candidates[int(np.argmin(scores))]
    # Equal texts, or equal gold scores: the judge has no preference, and a coin-flip
    # label would only teach the reward model noise.
    if a == b or judge.score(prompt, a) == judge.score(prompt, b):
        return None, "ties"
    if judge.prefer(prompt, a, b, rng) == 0:
        return Pair(prompt, a, b), ""
    return Pair(prompt, b, a), ""


def builtin_pairs(
    model: GPT, tokenizer: TextTokenizer, val_dir: str | Path, params: PreferencesParams,
    judge: Judge, device: torch.device | str,
) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs sampled from ``model`` on val openings and labeled by ``judge``; and stats.

    ``params.num_prompts`` prompts of ``params.prompt_tokens`` tokens from the val split
    (:func:`val_prompts`: document openings, then later sentences of a small split); the
    model writes ``params.completions_per_prompt`` completions of each (cut at <eos>). With two, the
    judge's preference orders them; with more, the best and the worst by gold score
    (the judge's ``prefer`` still decides which is chosen, so its noise applies). A prompt
    whose two completions are the same text or score the same is dropped
    (``ties_dropped``), as is one with
    fewer than two non-blank completions (``empty_dropped``).

    Sampling draws from a ``torch.Generator`` on ``device`` seeded with ``params.seed``,
    labeling from ``numpy.random.default_rng(params.seed)``: same model, table and params,
    same pairs (on the same kind of device).
    """
    needed = 1 + params.prompt_tokens + params.max_new_tokens  # <bos> + prompt + completion
    if needed > model.config.context:
        raise GptpipeError(
            f"preferences.prompt_tokens ({params.prompt_tokens}) + max_new_tokens "
            f"({params.max_new_tokens}) + 1 (<bos>) = {needed} tokens, more than the model's "
            f"context ({model.config.context}); lower one of them"
        )
    device = torch.device(device)
    model = model.to(device)
    prompt_ids = val_prompts(tokenizer, val_dir, params.num_prompts, params.prompt_tokens)
    config = SamplingConfig(temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, max_new_tokens=params.max_new_tokens)
    generator = torch.Generator(device).manual_seed(params.seed)
    with_bos = [[BOS_ID, *ids] for ids in prompt_ids]
    sampled = sample_completions(model, with_bos, params.completions_per_prompt, config,
                                 generator)
    rng = np.random.default_rng(params.seed)
    pairs: list[Pair] = []
    dropped = {"ties": 0, "empty": 0}
    for ids, completions in zip(prompt_ids, sampled, strict=True):
        prompt = visible_text(tokenizer, ids)
        pair, why = _label(prompt, [visible_text(tokenizer, c) for c in completions], judge, rng)
        if pair is None:
            dropped[why] += 1
        else:
            pairs.append(pair)
    gold = gold_score_stats(pairs, judge)
    stats = {
        "prompts": len(prompt_ids),
        "pairs": len(pairs),
        "ties_dropped": dropped["ties"],
        "empty_dropped": dropped["empty"],
        "gold_chosen_mean": gold["chosen_mean"],
        "gold_rejected_mean": gold["rejected_mean"],
    }
    return pairs, stats
