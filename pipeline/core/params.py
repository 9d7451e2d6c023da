"""The params.yaml schema: one frozen dataclass per section, validated once, early.

``load_params(path)`` parses the YAML, rejects unknown sections and keys, checks each
value's type against the dataclass annotation and each range in ``validate()``, and
returns a :class:`Params`. Every problem is a :class:`GptpipeError` whose one line names
the file, the dotted key, what was found and what is allowed.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pipeline.core.errors import GptpipeError


class _Section:
    """Base for one params.yaml section; subclasses add fields and ``validate``."""

    _where: str = "params.yaml"
    _name: str = ""

    def validate(self) -> None:
        """Range checks that a type annotation cannot express."""

    def fail(self, key: str, found: Any, allowed: str) -> GptpipeError:
        return GptpipeError(f"{self._where}: {self._name}.{key} = {found!r}; allowed: {allowed}")

    def require_positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value <= 0:
                raise self.fail(key, value, "a number > 0")

    def require_non_negative(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value < 0:
                raise self.fail(key, value, "a number >= 0")


@dataclass(frozen=True)
class DataParams(_Section):
    """``data``: which corpus to ingest and how to read it."""

    # A file or a directory. The builtin corpora are the small pointer files in
    # data/builtin/ (wikipedia-en, wikipedia-fr, wikipedia-es). dvc.yaml declares this
    # path as the ingest stage's dependency, so editing the corpus re-runs the pipeline.
    corpus: str = "data/builtin/wikipedia-en.corpus"
    # Which files of a directory corpus to read, as a glob relative to it.
    include: str = "**/*"
    # The JSON/JSONL field or CSV/Parquet column that holds a document's text.
    text_field: str = "text"
    # Plain-text files (any suffix but jsonl, json, csv, parquet): one document per file,
    # per blank-line-separated paragraph, or per line. auto: paragraphs for a corpus of
    # fewer than 50 text files (one file, a few books: whole, too few documents for the
    # split) and for files over 1 MiB (far larger than a document), else whole files.
    txt_unit: Literal["auto", "file", "paragraph", "line"] = "auto"
    # The encoding of the corpus's text files (plain text, JSONL, JSON, CSV): utf-8, or
    # shift_jis, cp932, euc_jp, gb18030, big5, euc_kr, latin-1, cp1252 ... (any Python codec
    # that reads ASCII bytes as ASCII and has no shift states). Parquet text is UTF-8.
    encoding: str = "utf-8"
    # Reading processes (files, and stretches of big text and JSONL files, side by side);
    # 0 = one per core. The raw table is the same for any number.
    workers: int = 0
    # one: the corpus is one source. subfolders: each top-level entry of a folder corpus
    # (a subfolder, or a file beside them) is a source of its own: evaluate reports val
    # and test per source as well as overall, and train.source_weights up- or
    # down-samples each in pretraining (pipeline/data/sources.py).
    sources: Literal["one", "subfolders"] = "one"

    def validate(self) -> None:
        self.require_non_negative("workers")
        if not self.corpus.strip():
            raise self.fail("corpus", self.corpus, "a path to a file or a directory")
        if not self.include.strip():
            raise self.fail("include", self.include, "a glob such as '**/*' or '*.txt'")
        if not self.text_field.strip():
            raise self.fail("text_field", self.text_field, "a non-empty field name")
        if _text_codec(self.encoding) is None:
            raise self.fail("encoding", self.encoding,
                            "an encoding that reads ASCII as ASCII, with no shift states: "
                            "utf-8, shift_jis, cp932, euc_jp, gb18030, gbk, big5, euc_kr, "
                            "latin-1, cp1252 ...")

    @property
    def codec(self) -> str:
        """The canonical name of ``encoding`` ('utf-8' for any spelling of UTF-8)."""
        return _text_codec(self.encoding) or self.encoding


def _text_codec(encoding: str) -> str | None:
    """The canonical codec name of ``encoding`` when corpus files can be read in it, else
    None. Readers find line ends by their bytes and cut big files at them, so the codec
    must read every ASCII byte (a backslash escape too) as that character, and keep no
    state from one line to the next (ISO-2022 and UTF-7 shift in and out of modes)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return None
    if name in ("utf-8", "utf-8-sig"):
        return "utf-8"
    try:
        # The backslash escapes first: unicode_escape would warn about bytes(range(128)).
        for ascii_bytes in (b"\\u0041\\x41", bytes(range(128))):
            if ascii_bytes.decode(name) != ascii_bytes.decode("ascii"):
                return None
        for shift in (b"\x1b$B", b"~{", b"+A"):
            decoder = codecs.getincrementaldecoder(name)()
            start = decoder.getstate()
            decoder.decode(shift)
            if decoder.getstate() != start:
                return None
    except (UnicodeError, LookupError):  # not a text encoding (base64, rot13 ...)
        return None
    return name


@dataclass(frozen=True)
class CleanParams(_Section):
    """``clean``: normalization, filters and deduplication."""

    normalization: Literal["NFC", "NFKC"] = "NFKC"
    # Documents shorter than this many UTF-8 bytes after cleaning are dropped. Bytes, not
    # characters, so the threshold means about as much text in every script: 64 bytes are
    # 64 Latin letters, 32 Cyrillic or Greek ones, 21 Chinese or Thai characters.
    min_bytes: int = 64
    # Drop exact duplicates of the normalized text (the first occurrence is kept).
    dedup: bool = True
    # MinHash near-duplicate removal: off when 0, else the Jaccard threshold in (0, 1].
    near_dup_threshold: float = 0.0
    near_dup_num_perm: int = 128
    # Shingles are word n-grams of this length.
    near_dup_ngram: int = 5
    # Worker processes for normalization; 0 means one per CPU core.
    workers: int = 0
    # Memory for the exact-dedup keys (MiB): a corpus with more documents than fit (about
    # 8,000 a MiB) spills them to temporary files beside the output and cleans in two
    # passes, keeping the very same documents.
    dedup_memory_mb: int = 256

    def validate(self) -> None:
        self.require_non_negative("min_bytes", "workers")
        self.require_positive("near_dup_num_perm", "near_dup_ngram", "dedup_memory_mb")
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise self.fail(
                "near_dup_threshold", self.near_dup_threshold, "0 (off) or a number in (0, 1]"
            )


@dataclass(frozen=True)
class SplitParams(_Section):
    """``split``: train/val/test fractions by document, and the hashing seed."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 1337
    # Hashing processes; 0 = one per core. The splits are the same for any number.
    workers: int = 0

    def validate(self) -> None:
        self.require_non_negative("workers")
        for key in ("train", "val", "test"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise self.fail(key, value, "a fraction in (0, 1)")
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise GptpipeError(
                f"{self._where}: split.train + split.val + split.test = {total:g}; "
                "allowed: fractions that sum to 1"
            )


@dataclass(frozen=True)
class ContaminationParams(_Section):
    """``contamination``: how much of val and test (and the evaluate stage's task items)
    the train split already holds, and what the split does with a near twin."""

    # Overlap is counted in n-grams of this many words; a character of a script written
    # without spaces (Chinese, Japanese, Thai ...) is a word. 13 is GPT-3's choice: long
    # enough that a shared n-gram is a shared passage, not a common phrase.
    ngram: int = 13
    # The fraction of n-grams counted, picked by hash (the same ones in every split):
    # train's n-grams take 8 bytes each (about 8 bytes per word of train text at 1.0, the
    # exact count); 0.1 takes a tenth for a share with a wider interval.
    ngram_sample: float = 1.0
    # A val/test document whose MinHash Jaccard with a train document reaches this is a
    # near twin (in (0, 1); the same machinery as clean.near_dup_threshold).
    near_dup_threshold: float = 0.8
    # More permutations estimate the Jaccard more closely and cost more time.
    near_dup_num_perm: int = 128
    # MinHash shingles are word n-grams of this length (as clean.near_dup_ngram).
    near_dup_ngram: int = 5
    # What the split stage does with a val/test document that has a near twin in train:
    # keep (report only; the default, outputs unchanged), train (move it to train, so
    # twins stay together) or drop (leave it out of every split).
    near_twins: Literal["keep", "train", "drop"] = "keep"

    def validate(self) -> None:
        self.require_positive("ngram", "near_dup_num_perm", "near_dup_ngram")
        if not 0.0 < self.ngram_sample <= 1.0:
            raise self.fail("ngram_sample", self.ngram_sample, "a fraction in (0, 1]")
        if not 0.0 < self.near_dup_threshold < 1.0:
            raise self.fail("near_dup_threshold", self.near_dup_threshold,
                            "a Jaccard threshold in (0, 1)")


@dataclass(frozen=True)
class VocabParams(_Section):
    """``vocab``: the tokenizer, learned from the train split only."""

    # from_model: copy the tokenizer of the model named by train.init_from (continued
    # pretraining keeps its base model's vocabulary).
    kind: Literal["bpe", "word", "char", "from_model"] = "bpe"
    # bpe: the total vocabulary size, special tokens and the 256 bytes included.
    vocab_size: int = 8192
    # word and char: tokens seen fewer times are left out (they become <unk>).
    min_freq: int = 2
    # word and char: the most tokens to keep, special tokens included.
    max_size: int = 50000
    # word: lowercase before splitting, as the classic basic_english tokenizer does.
    lowercase: bool = False
    # The most train text (MiB) the tokenizer learns from: a larger train split is
    # sampled, the same documents every run (those whose hash falls under the rate).
    # Learning holds about 1.5 KB per distinct word, so a sample bounds it at any size.
    max_train_mb: int = 256

    def validate(self) -> None:
        self.require_positive("min_freq", "max_size", "max_train_mb")
        if self.kind == "bpe" and self.vocab_size < 4 + 256 + 1:
            raise self.fail(
                "vocab_size", self.vocab_size, "an integer >= 261 (4 special + 256 bytes + 1 merge)"
            )
        if self.vocab_size > 2**31 - 1:
            raise self.fail("vocab_size", self.vocab_size, "an integer < 2**31")
        if self.max_size < 5:
            raise self.fail("max_size", self.max_size, "an integer >= 5 (4 special tokens + 1)")


@dataclass(frozen=True)
class TokenizeParams(_Section):
    """``tokenize``: how token ids are written to Parquet shards."""

    # The most tokens one shard file holds.
    shard_tokens: int = 1_000_000
    # Documents encoded per batch (bounds memory; larger batches parallelize better).
    batch_documents: int = 2048
    # Encoding threads; 0 = one per core. The tokens are the same for any number.
    workers: int = 0

    def validate(self) -> None:
        self.require_positive("shard_tokens", "batch_documents")
        self.require_non_negative("workers")


@dataclass(frozen=True)
class ModelParams(_Section):
    """``model``: the GPT's shape (the vocabulary size comes from the tokenizer).

    The one model schema: ``pipeline.lm.model.GPTConfig`` is these fields plus the
    vocabulary size, with these defaults, and is saved beside every model's weights. A
    new field needs a default that computes what models saved before it computed.
    """

    context: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    positions: Literal["rotary", "learned"] = "rotary"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    # swiglu: silu(gate) * up, 8/3 C wide; gelu: tanh GELU, 4 C wide; relu2: relu(x)^2,
    # 4 C wide (Primer; nanochat, modded-nanogpt).
    mlp: Literal["swiglu", "gelu", "relu2"] = "swiglu"
    bias: bool = False
    # The base of the rotary frequencies (RoPE's theta).
    rope_base: float = 10000.0
    # RMS-normalize each head's queries and keys (with a learned gain per head dimension)
    # before the rotary positions, as Qwen3 does: attention logits stay bounded.
    qk_norm: bool = False
    # The output head reuses the token embedding (false: a matrix of its own).
    tie_embeddings: bool = True
    # > 0: logits = cap * tanh(logits / cap) (Gemma 2, nanochat: 15); 0: no cap.
    logit_softcap: float = 0.0
    # Value embeddings (ResFormer, as nanochat has them): in every other layer, the last
    # included, a token embedding of its own is added to the attention values through a
    # learned gate per head. No Transformers architecture computes them.
    value_embeddings: bool = False

    def validate(self) -> None:
        self.require_positive("context", "n_layer", "n_head", "n_embd", "rope_base")
        self.require_non_negative("logit_softcap")
        if self.n_embd % self.n_head:
            raise self.fail("n_embd", self.n_embd, f"a multiple of model.n_head ({self.n_head})")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise self.fail(
                "n_embd", self.n_embd, "n_embd / n_head even (rotary rotates pairs of dimensions)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail("dropout", self.dropout, "a probability in [0, 1)")
        if not math.isfinite(self.logit_softcap):
            raise self.fail("logit_softcap", self.logit_softcap, "0 (off) or a number > 0")


@dataclass(frozen=True)
class TrainParams(_Section):
    """``train``: optimizer, schedule, budget, evaluation and checkpoint cadence, device."""

    # The weights to start from: a model folder (another run's models/pretrain/best,
    # copied out of the way, or one kept anywhere) for continued pretraining, or the
    # pointer data/builtin/random.init for random weights. A DVC dependency either way.
    init_from: str = "data/builtin/random.init"
    # auto picks cuda, then mps, then cpu; or name one (cuda:1 for a given GPU).
    device: str = "auto"
    # auto: bfloat16 autocast on GPUs that support it (float16 + grad scaler otherwise),
    # float32 on CPU, where bfloat16 matmuls run far slower on most processors.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    # CPU threads for torch; 0 = every core (shared out among local processes).
    threads: int = 0
    # Processes on this machine: > 1 re-launches the stage under torchrun (DDP), one per
    # GPU (or CPU processes with gloo). Several machines: see docs/pretraining.md.
    nproc_per_node: int = 1
    # Several processes: the seconds one may go without a sign of life (killed, frozen, its
    # machine gone) before every other stops with one line naming it; a collective that a
    # live process does not join fails a little later.
    peer_timeout: float = 300.0
    seed: int = 1337
    # Sequences per optimizer step per process = batch_size * grad_accum.
    batch_size: int = 16
    grad_accum: int = 1
    # The budget: a number of optimizer steps, or (when > 0) a number of training tokens.
    steps: int = 900
    tokens: int = 0
    # adamw: AdamW for every parameter. muon: Muon (momentum orthogonalized by
    # Newton-Schulz iterations) for the blocks' 2-D weight matrices, AdamW for the rest
    # (embeddings, output head, norms, biases, gates) with lr, betas and weight_decay.
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    # After warmup: cosine (down to min_lr at the end) or wsd (warmup-stable-decay: lr
    # held, then a straight line down to min_lr over the last decay_fraction of steps).
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Muon's peak learning rate (it follows the schedule in proportion to lr), momentum
    # (Nesterov), decoupled weight decay and Newton-Schulz iterations; read with
    # optimizer: muon only.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_steps: int = 5
    # Val loss on eval_windows fixed windows every eval_every steps (and at the end).
    eval_every: int = 200
    eval_windows: int = 64
    # A resumable checkpoint every checkpoint_every steps.
    checkpoint_every: int = 100
    log_every: int = 1
    # With data.sources: subfolders, source name -> weight: a source's share of the
    # training windows is its share of the train tokens times its weight, renormalized
    # (2: twice as often, 0: never). Unnamed sources weigh 1; all equal: plain sampling.
    source_weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for name, weight in self.source_weights.items():
            if not name.strip():
                raise self.fail("source_weights", name, "source names (top-level entries "
                                "of the corpus folder)")
            if weight < 0:
                raise self.fail(f"source_weights.{name}", weight, "a weight >= 0")
        self.require_positive(
            "batch_size", "grad_accum", "eval_every", "eval_windows", "checkpoint_every",
            "log_every", "lr", "nproc_per_node",
        )
        self.require_non_negative(
            "steps", "tokens", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "threads"
        )
        if self.steps == 0 and self.tokens == 0:
            raise self.fail("steps", self.steps, "a budget: train.steps > 0 or train.tokens > 0")
        if not self.peer_timeout >= 5:  # several heartbeats, one a second (core/peers.py)
            raise self.fail("peer_timeout", self.peer_timeout, "a number of seconds >= 5")
        if self.min_lr > self.lr:
            raise self.fail("min_lr", self.min_lr, f"at most train.lr ({self.lr})")
        for key in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise self.fail(key, getattr(self, key), "a number in [0, 1)")
        self._validate_muon()
        self._validate_schedule()
        _check_device(self, self.device)
        _check_path(self, "init_from", self.init_from)

    def _validate_muon(self) -> None:
        self.require_positive("muon_lr")
        self.require_non_negative("muon_weight_decay")
        if not 1 <= self.muon_ns_steps <= 99:
            raise self.fail("muon_ns_steps", self.muon_ns_steps,
                            "an integer in [1, 99] (Newton-Schulz iterations per step)")

    def _validate_schedule(self) -> None:
        # Whether wsd's phases fit the budget depends on its step count, which a budget in
        # tokens gets from the model's context: the trainer checks it, before training.
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise self.fail("decay_fraction", self.decay_fraction, "a fraction in [0, 1]")


@dataclass(frozen=True)
class EvaluateParams(_Section):
    """``evaluate``: scoring the model on val and test, and the fixed sample prompts."""

    # Windows of model.context tokens per forward pass while scoring.
    batch_size: int = 32
    # The most tokens scored per split (val, test; also pretraining's and RLHF's final val
    # bits per byte): a larger split is scored on evenly spread windows holding at most
    # this many, the same every time, so evaluation's cost stops growing with the corpus.
    # Bits per byte stay exact: over the scored tokens' own bytes. 0 = every token.
    max_tokens: int = 1_000_000
    # Where to score and sample: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    # Prompts completed into the samples file; empty: the openings of the first
    # num_prompts test documents, prompt_words words each (in any script: a Chinese or
    # Japanese character counts as a word).
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 4
    prompt_words: int = 6
    # Every prompt is completed once per temperature (0 = greedy), seeded by seed + index.
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    seed: int = 1234
    top_k: int = 0
    top_p: float = 0.95
    max_new_tokens: int = 48
    # Downstream multiple-choice tasks, scored by the log-likelihood of each choice:
    # builtin (next sentence, built from the test split), file (task_file), both or none.
    task: Literal["builtin", "file", "both", "none"] = "builtin"
    # builtin: items from the first task_items test documents with two sentences, each
    # with its true second sentence among task_choices (the rest from other documents).
    task_items: int = 1000
    task_choices: int = 4
    task_seed: int = 4242
    # file: JSONL lines {"context": ..., "choices": [...], "label": i}. A dependency of the
    # stage either way (so DVC tracks its content); the default is a small example.
    task_file: str = "data/builtin/example-task.jsonl"
    # Standard errors by the bootstrap (documents of val/test, the held-out examples of
    # sft, held-out prompts of rlhf's val bits per byte): resamples drawn from a generator
    # seeded by resample_seed, so the errors are the same on every run. 1000 resamples
    # give a standard error within about 2% of its limit (its own relative error is
    # 1 / sqrt(2 * resamples)), in milliseconds.
    resamples: int = 1000
    resample_seed: int = 0

    @property
    def budget(self) -> int | None:
        """max_tokens as scoring_plan takes it: None for every token."""
        return self.max_tokens or None

    def validate(self) -> None:
        _check_path(self, "task_file", self.task_file)
        self.require_positive("batch_size", "prompt_words", "max_new_tokens", "task_items")
        if self.resamples < 100:
            raise self.fail("resamples", self.resamples, "an integer >= 100 (fewer make the "
                            "standard errors themselves noisy)")
        self.require_non_negative("resample_seed")
        if self.task_choices < 2:
            raise self.fail("task_choices", self.task_choices, "an integer >= 2")
        self.require_non_negative("num_prompts", "top_k", "max_tokens")
        if not self.temperatures:
            raise self.fail("temperatures", self.temperatures, "a non-empty list of numbers >= 0")
        for value in self.temperatures:
            if value < 0:
                raise self.fail("temperatures", self.temperatures, "numbers >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise self.fail("top_p", self.top_p, "a number in (0, 1]")
        if any(not p.strip() for p in self.prompts):
            raise self.fail("prompts", self.prompts, "non-empty strings")
        _check_device(self, self.device)


@dataclass(frozen=True)
class ExportParams(_Section):
    """``export``: the Hugging Face Transformers folders written from the best models."""

    # The dtype of the written weights: float32 is exactly the trained weights (the
    # exported model's logits equal gptpipe's); bfloat16 and float16 halve the size.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass(frozen=True)
class GoldParams(_Section):
    """``gold``: the rule-based judge that stands in for human labelers (builtin preferences)
    and scores policies in evaluation. A completion's score is the weighted sum below."""

    # Penalty per repeated word n-gram (a repeated n-gram counts each time it recurs).
    repeat_ngram: int = 3
    repetition_weight: float = -1.0
    # Reward for ending on a complete sentence (terminal punctuation of any script, then
    # any closing quotes) or, in code, at the end of a line or statement.
    complete_sentence_weight: float = 1.0
    # Penalty per <unk> in the completion.
    unk_weight: float = -1.0
    # Penalty per word outside [min_words, max_words].
    min_words: int = 8
    max_words: int = 40
    length_weight: float = -0.1
    # Reward per distinct content word shared with the prompt, capped (words of 3+
    # letters; pairs of adjacent characters in scripts written without spaces).
    overlap_weight: float = 0.5
    overlap_cap: int = 4
    # Penalty for a completion with no word at all (nothing, or punctuation only).
    empty_weight: float = -2.0
    # Bradley-Terry noise: P(prefer a) = sigmoid((score_a - score_b) / noise); 0 = always
    # the higher score (ties broken by a seeded coin).
    noise: float = 0.0

    def validate(self) -> None:
        self.require_positive("repeat_ngram", "min_words", "max_words")
        self.require_non_negative("overlap_cap", "noise")
        if self.min_words > self.max_words:
            raise self.fail("min_words", self.min_words,
                            f"at most gold.max_words ({self.max_words})")


@dataclass(frozen=True)
class PreferencesParams(_Section):
    """``preferences``: where (prompt, chosen, rejected) pairs come from."""

    # builtin: sample completions from the pretrained model on val prompts and label them
    # with the gold judge; file: read `file`, JSONL lines with prompt, chosen, rejected
    # (texts, or TRL's conversational message lists).
    source: Literal["builtin", "file"] = "builtin"
    # A dependency of the stage either way (so DVC tracks its content); the default is a
    # small example of the format.
    file: str = "data/builtin/example-preferences.jsonl"
    num_prompts: int = 384
    # builtin prompts: the first prompt_tokens tokens of val documents (after <bos>).
    prompt_tokens: int = 8
    completions_per_prompt: int = 4
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 7
    # Fraction of pairs held out for reward-model accuracy (chosen by a hash of the prompt).
    heldout_fraction: float = 0.2
    # Fewer pairs than this (after dropping ties) is an error.
    min_pairs: int = 32
    device: str = "auto"

    def validate(self) -> None:
        _check_path(self, "file", self.file)
        self.require_positive("num_prompts", "prompt_tokens", "max_new_tokens", "min_pairs")
        if self.completions_per_prompt < 2:
            raise self.fail("completions_per_prompt", self.completions_per_prompt, "2 or more")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise self.fail("heldout_fraction", self.heldout_fraction, "a number in (0, 1)")
        if self.temperature <= 0:
            raise self.fail("temperature", self.temperature, "a number > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise self.fail("top_p", self.top_p, "a number in (0, 1]")
        self.require_non_negative("top_k")
        _check_device(self, self.device)


@dataclass(frozen=True)
class RewardParams(_Section):
    """``reward``: the GPT reward model (Bradley-Terry) and its scikit-learn baseline."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 11
    device: str = "auto"
    # Baseline: TF-IDF of prompt + completion, logistic regression on the pair difference.
    baseline_max_features: int = 20000
    baseline_c: float = 1.0

    def validate(self) -> None:
        self.require_positive("epochs", "batch_size", "lr", "baseline_max_features",
                              "baseline_c")
        self.require_non_negative("weight_decay", "grad_clip")
        _check_device(self, self.device)


# The rewards rlhf.reward names by a word; any other is python:<file.py>:<function>.
BUILTIN_REWARDS = ("model", "gold", "likelihood")


@dataclass(frozen=True)
class RewardTerm:
    """One reward of a weighted ``rlhf.reward`` list: a reward as ``rlhf.reward`` names
    one, and its weight in the sum RL maximizes (0: logged, not optimized)."""

    reward: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        """What its logs are named: the builtin reward's name or the python function's."""
        return self.reward if self.reward in BUILTIN_REWARDS else self.reward.split(":")[-1]


@dataclass(frozen=True)
class RlhfParams(_Section):
    """``rlhf``: tuning the policy (the SFT model) against the reward of your choice."""

    # ppo: clipped policy and value losses, KL in the reward; reinforce: one sample per
    # prompt, leave-one-out baseline over the batch; grpo and rloo: samples_per_prompt
    # samples of each prompt, the group as the baseline; dpo: the preference pairs.
    algo: Literal["ppo", "dpo", "reinforce", "grpo", "rloo"] = "ppo"
    # What RL maximizes: model (the learned reward model), gold (the judge itself),
    # likelihood (the frozen pretrained model's log-probability of the sample), or
    # python:<file.py>:<function> (your function of (prompt, completion) -> float, or
    # TRL's batched reward function (prompts, completions, **kwargs) -> list[float],
    # told apart by its parameter names; the file must be reward_module, which dvc.yaml
    # tracks). Or a weighted list of them, [{reward: model, weight: 1.0}, {reward: gold,
    # weight: 0}, ...]: RL maximizes the weighted sum, and each one's mean is logged
    # (weight 0: logged, not optimized).
    reward: str | list[RewardTerm] = "model"
    reward_module: str = "data/builtin/example_rewards.py"
    # likelihood: the mean log-probability per token (true) or the sum (false: favours
    # short completions, whose sum is nearer 0).
    likelihood_per_token: bool = True
    # Policy updates: rollout batches (ppo, reinforce, grpo, rloo) or pair batches (dpo).
    steps: int = 60
    # Completions sampled per rollout batch (every algorithm samples the same number, so
    # budgets compare): grpo and rloo take batch_size / samples_per_prompt prompts.
    # DPO: pairs per step.
    batch_size: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    temperature: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # KL penalty to the reference: reward - kl_coef * KL per token (grpo: a loss term).
    # adaptive: the coefficient tracks target_kl (Ziegler et al.).
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    # PPO (ppo_epochs, minibatch_size and clip_range serve GRPO too)
    ppo_epochs: int = 4
    minibatch_size: int = 8
    clip_range: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    gae_lambda: float = 0.95
    entropy_coef: float = 0.0
    # DPO
    dpo_beta: float = 0.1
    # Evaluation of fresh samples on held-out prompts every eval_every steps; the best
    # policy by select_by (gold: the judge, the stand-in for people; reward: what RL
    # maximizes, a weighted list's sum) is kept, and patience evaluations in a row
    # without a better one stop the run early (0: never).
    eval_every: int = 10
    eval_prompts: int = 32
    # The figures metrics/rlhf.json reports (gold, reward, win rates) come from a final
    # evaluation of the pretrained, starting and best policies on the openings of this
    # many test documents: prompts that picked nothing, so no selection bias, and enough
    # of them for a tight interval. 0: the eval_prompts held-out prompts instead.
    final_prompts: int = 0
    select_by: Literal["gold", "reward"] = "gold"
    patience: int = 0
    # Stop with an error when the policy's KL to the reference exceeds this (nats/sequence).
    kl_ceiling: float = 50.0
    seed: int = 13
    device: str = "auto"

    GROUP_ALGOS = ("grpo", "rloo")

    def validate(self) -> None:
        self.require_positive("steps", "batch_size", "max_new_tokens", "temperature", "lr",
                              "ppo_epochs", "minibatch_size", "eval_every", "eval_prompts",
                              "kl_ceiling", "dpo_beta", "target_kl", "samples_per_prompt")
        self.require_non_negative("weight_decay", "grad_clip", "kl_coef", "clip_range",
                                  "value_clip", "value_coef", "entropy_coef", "patience",
                                  "final_prompts")
        for key in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise self.fail(key, getattr(self, key), "a number in [0, 1]")
        if self.minibatch_size > self.batch_size:
            raise self.fail("minibatch_size", self.minibatch_size,
                            f"at most rlhf.batch_size ({self.batch_size})")
        if self.algo in self.GROUP_ALGOS:
            if self.samples_per_prompt < 2:
                raise self.fail("samples_per_prompt", self.samples_per_prompt,
                                f"2 or more for rlhf.algo = {self.algo!r} (the other samples "
                                "of a prompt are its baseline)")
            if self.batch_size % self.samples_per_prompt:
                raise self.fail("batch_size", self.batch_size, "a multiple of "
                                f"rlhf.samples_per_prompt ({self.samples_per_prompt})")
        _check_path(self, "reward_module", self.reward_module)
        self._check_reward_list()
        self.python_rewards()  # checks the form of every python: reward

    @property
    def weighted(self) -> bool:
        """Whether ``reward`` is a weighted list (each component then logged apart)."""
        return isinstance(self.reward, list)

    def reward_terms(self) -> list[RewardTerm]:
        """The rewards RL maximizes the weighted sum of: one of weight 1, or the list."""
        return self.reward if isinstance(self.reward, list) else [RewardTerm(self.reward)]

    def reward_label(self) -> str:
        """``reward`` as one line: the name, or the weighted sum (1*model + 0.2*concise)."""
        if isinstance(self.reward, str):
            return self.reward
        return " + ".join(f"{term.weight:g}*{term.name}" for term in self.reward)

    def python_rewards(self) -> dict[str, tuple[str, str]]:
        """(module file, function name) of each ``python:`` reward, by its reward string."""
        found = {}
        for key, term in self._keyed_terms():
            if term.reward not in BUILTIN_REWARDS:
                found[term.reward] = self._python_parts(key, term.reward)
        return found

    def _keyed_terms(self) -> list[tuple[str, RewardTerm]]:
        """Each term with the key that names it in an error (reward, reward[i].reward)."""
        if isinstance(self.reward, str):
            return [("reward", RewardTerm(self.reward))]
        return [(f"reward[{index}].reward", term) for index, term in enumerate(self.reward)]

    def _python_parts(self, key: str, reward: str) -> tuple[str, str]:
        parts = reward.split(":")
        allowed = (f"{', '.join(BUILTIN_REWARDS)} or python:<file.py>:<function> (for "
                   "example python:data/builtin/example_rewards.py:concise)")
        if len(parts) != 3 or parts[0] != "python" or not parts[1].endswith(".py") \
                or not parts[2].isidentifier():
            raise self.fail(key, reward, allowed)
        if parts[1] != self.reward_module:
            raise self.fail(key, reward,
                            f"a function of rlhf.reward_module ({self.reward_module}), the "
                            "file dvc.yaml tracks: set rlhf.reward_module to the same file")
        if parts[2] in BUILTIN_REWARDS:
            raise self.fail(key, reward, f"a function not named {parts[2]} (each reward is "
                                         "logged under its name: rename the function)")
        return parts[1], parts[2]

    def _check_reward_list(self) -> None:
        """A weighted list: at least one reward, each once, weights >= 0, summing to > 0
        (NaN and infinity are refused as the list is read)."""
        if not isinstance(self.reward, list):
            return
        if not self.reward:
            raise self.fail("reward", self.reward, "a reward name or a non-empty list of "
                                                   "{reward: ..., weight: ...}")
        seen = set()
        for index, term in enumerate(self.reward):
            if term.weight < 0:
                raise self.fail(f"reward[{index}].weight", term.weight, "a number >= 0 "
                                "(0: logged, not optimized)")
            if term.reward in seen:
                raise self.fail(f"reward[{index}].reward", term.reward,
                                "each reward once in the list")
            seen.add(term.reward)
        if not sum(term.weight for term in self.reward) > 0:
            raise self.fail("reward", self.reward_label(),
                            "weights with a sum > 0 (at least one reward is optimized)")


@dataclass(frozen=True)
class SftParams(_Section):
    """``sft``: supervised fine-tuning of the pretrained model before RL (InstructGPT's
    first step). The loss counts response tokens only."""

    # pairs: the chosen completions of the preference pairs (best-of-n sampling judged by
    # gold: rejection-sampling fine-tuning, as Llama 2 used it); file: a JSONL of
    # prompt/response (or TRL's prompt/completion, or its conversational messages), held
    # out by prompt hash (heldout_fraction) to measure the loss.
    source: Literal["pairs", "file"] = "pairs"
    file: str = "data/builtin/example-sft.jsonl"
    heldout_fraction: float = 0.1
    # 0: no fine-tuning, the pretrained model goes on to RL unchanged.
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 17
    device: str = "auto"

    def validate(self) -> None:
        _check_path(self, "file", self.file)
        self.require_positive("batch_size", "lr")
        self.require_non_negative("epochs", "weight_decay", "grad_clip")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise self.fail("heldout_fraction", self.heldout_fraction, "a number in (0, 1)")
        _check_device(self, self.device)


# dvc.yaml pastes a path param into a stage's shell command inside single quotes; a
# quote would end the quoting there, and control characters have no place in a path.
_UNSAFE_PATH = re.compile(r"['\x00-\x1f\x7f]")


def _check_path(section: _Section, key: str, value: str) -> None:
    if not value.strip() or _UNSAFE_PATH.search(value):
        raise section.fail(key, value, "a file path without quotes (') or control characters")


def _check_device(section: _Section, device: str) -> None:
    if device not in ("auto", "cpu", "cuda", "mps") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        raise section.fail("device", device, "auto, cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    data: DataParams = field(default_factory=DataParams)
    clean: CleanParams = field(default_factory=CleanParams)
    split: SplitParams = field(default_factory=SplitParams)
    contamination: ContaminationParams = field(default_factory=ContaminationParams)
    vocab: VocabParams = field(default_factory=VocabParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    gold: GoldParams = field(default_factory=GoldParams)
    preferences: PreferencesParams = field(default_factory=PreferencesParams)
    reward: RewardParams = field(default_factory=RewardParams)
    sft: SftParams = field(default_factory=SftParams)
    rlhf: RlhfParams = field(default_factory=RlhfParams)


_SectionT = typing.TypeVar("_SectionT", bound=_Section)

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if get_origin(annotation) is list:
        return f"a list of {_type_name(get_args(annotation)[0])}"
    if get_origin(annotation) is dict:
        key, value = get_args(annotation)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    if dataclasses.is_dataclass(annotation):
        names = ", ".join(f"{f.name}: ..." for f in dataclasses.fields(annotation))
        return "{" + names + "}"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation``; ints are accepted where floats are asked."""
    origin = get_origin(annotation)
    if origin is Literal:
        if value in get_args(annotation):
            return value
        raise GptpipeError(f"{where} = {value!r}; allowed: {_type_name(annotation)}")
    if origin in (typing.Union, types.UnionType):
        for option in get_args(annotation):
            if get_origin(option) is list and isinstance(value, list):
                return _coerce(value, option, where)  # a list's error names its item
        for option in get_args(annotation):
            try:
                return _coerce(value, option, where)
            except GptpipeError:
                continue
        allowed = " or ".join(_type_name(a) for a in get_args(annotation))
        raise GptpipeError(f"{where} = {value!r}; allowed: {allowed}")
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # PyYAML (YAML 1.1) reads 6e-4 as a string; DVC's YAML 1.2 reads it as a number.
        if (isinstance(value, int | float) and not isinstance(value, bool)) or (
                isinstance(value, str) and _FLOAT.fullmatch(value.strip())):
            number = float(value)
            if not math.isfinite(number):  # NaN passes every "> 0" check: refuse it here
                raise GptpipeError(f"{where} = {value!r}; allowed: a finite number")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, list):
            return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        key_type, value_type = get_args(annotation)
        if isinstance(value, dict):
            return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}")
                    for k, v in value.items()}
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return _record(annotation, value, where)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported annotation {annotation!r}")
    raise GptpipeError(
        f"{where} = {value!r} ({type(value).__name__}); allowed: {_type_name(annotation)}"
    )


def _record(cls: type, raw: dict, where: str) -> Any:
    """A small record (a dataclass that is not a section) from a mapping inside a
    section's value, such as one term of a list; ``where`` names it in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise GptpipeError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
    for name, item in fields.items():
        if name not in raw and item.default is dataclasses.MISSING:
            raise GptpipeError(f"{where}: key {name!r} missing")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(value, hints[name], f"{where}.{name}")
                  for name, value in raw.items()})


def _build(cls: type, raw: Any, where: str, file: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GptpipeError(f"{file}: {where} is a {type(raw).__name__}; allowed: a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise GptpipeError(
            f"{file}: unknown key '{prefix}{unknown[0]}'; allowed: {', '.join(fields)}"
        )
    required = [f.name for f in fields.values() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in raw]
    if required:
        prefix = f"{where}." if where else ""
        raise GptpipeError(f"{file}: key '{prefix}{required[0]}' missing")
    values = {}
    for name, value in raw.items():
        dotted = f"{where}.{name}" if where else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, dotted, file)
        else:
            values[name] = _coerce(value, annotation, f"{file}: {dotted}")
    obj = cls(**values)
    if isinstance(obj, _Section):
        object.__setattr__(obj, "_where", file)
        object.__setattr__(obj, "_name", where)
        _validate(obj)
    return obj


# Seeds seed numpy generators (which refuse negatives) and torch generators, some with a
# small offset added (seed + 1, seed + sample index), so they keep well inside both.
SEED_RANGE = (0, 2**32 - 1)


def _validate(section: _Section) -> None:
    """The checks every section shares (seeds in range), then its own ``validate``."""
    for item in dataclasses.fields(section):
        if item.name == "seed" or item.name.endswith("_seed"):
            value = getattr(section, item.name)
            low, high = SEED_RANGE
            if not low <= value <= high:
                raise section.fail(item.name, value, f"an integer in {low} .. {high}")
    section.validate()


def parse_section(cls: type[_SectionT], raw: Any, name: str, file: str) -> _SectionT:
    """One section's dataclass from a parsed mapping (``name`` and ``file`` for errors),
    checked as params.yaml's sections are: a model folder's config.json, say."""
    return _build(cls, raw, name, file)


def parse_params(raw: Any, file: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping (missing keys take their defaults)."""
    params = _build(Params, raw, "", file)
    for section in dataclasses.fields(Params):
        obj = getattr(params, section.name)
        if isinstance(obj, _Section) and not obj._name:
            # A section absent from the file still gets validated defaults and a name.
            object.__setattr__(obj, "_where", file)
            object.__setattr__(obj, "_name", section.name)
            _validate(obj)
    if params.train.source_weights and params.data.sources == "one":
        raise GptpipeError(
            f"{file}: train.source_weights = {params.train.source_weights!r} with "
            "data.sources = 'one'; allowed: {} (set data.sources: subfolders to weight "
            "the corpus folder's subfolders)")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is one GptpipeError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptpipeError(f"{path}: params file not found") from None
    except UnicodeDecodeError as err:
        raise GptpipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise GptpipeError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
    return parse_params(raw, str(path))
