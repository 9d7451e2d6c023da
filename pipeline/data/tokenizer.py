"""Word, char and byte-level BPE tokenizers, stored as Hugging Face tokenizer JSON.

Every tokenizer has the same four special tokens at ids 0..3 (``<pad>``, ``<unk>``,
``<bos>``, ``<eos>``) and is saved in the HF ``tokenizers`` JSON format, so other tools can
load it. The kind is read back from the JSON's structure alone:

- ``bpe``: a ``BPE`` model behind a ``ByteLevel`` pre-tokenizer (GPT-2 split regex, no
  prefix space) whose alphabet holds all 256 bytes, so it never produces ``<unk>``.
- ``word``: a ``WordLevel`` model behind whitespace splitting with punctuation isolated
  (optionally lowercased first, like torchtext's basic_english); decoding joins with spaces.
- ``char``: a ``WordLevel`` model over single Unicode characters (spaces and newlines
  included); decoding concatenates (``decoders.Fuse``).

Corpus text is always ordinary text: a literal ``<eos>`` inside a document is encoded as
the characters ``<``, ``eos``, ``>``, never as the special id, so a document can never fake
a document boundary. Both encoders below follow that rule.

BPE encoding runs through a ``tiktoken.Encoding`` built from the same vocabulary, which
encodes 3.7-4.5x faster than HF's ``encode_batch`` on two cores (see
:meth:`TextTokenizer._build_fast_encoder` for why the ids are identical).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tiktoken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from pipeline.core.errors import GptpipeError
from pipeline.core.io import MAX_JSON_BYTES, atomic_path, parse_json
from pipeline.core.parallel import usable_cores
from pipeline.core.params import VocabParams

Kind = Literal["bpe", "word", "char"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# GPT-2's pre-tokenization regex, the one HF's ByteLevel pre-tokenizer uses
# (use_regex=True): contractions, letters, digits, other symbols, each with an optional
# leading space, then whitespace runs that leave one space for the next word.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# char: every Unicode code point is its own pre-token; [\s\S] (not '.') so newlines match.
_CHAR_PATTERN = r"[\s\S]"

# Documents per thread task in the fast encoder: large enough that handing out work costs
# little next to encoding it, small enough that two threads finish a batch together.
_DOCS_PER_TASK = 64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable Unicode character.

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, soft hyphen,
    ...) map to U+0100 onward in byte order. HF's ByteLevel pre-tokenizer stores BPE
    tokens as strings of these characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def token_bytes(token: str, decoder: dict[str, int]) -> bytes:
    """The raw bytes a ByteLevel token string stands for (``decoder`` inverts the map)."""
    return bytes(decoder[char] for char in token)


# ---------------------------------------------------------------------------- building


def _bpe_pipeline(vocab_size: int) -> tuple[HFTokenizer, trainers.Trainer]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes from the start, so any input encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _word_pipeline(params: VocabParams) -> tuple[HFTokenizer, trainers.Trainer]:
    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    if params.lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    # No decoder: HF then joins tokens with single spaces, which is what we want.
    return tok, _word_level_trainer(params)


def _char_pipeline(params: VocabParams) -> tuple[HFTokenizer, trainers.Trainer]:
    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_PATTERN), "isolated")
    tok.decoder = decoders.Fuse()
    return tok, _word_level_trainer(params)


def _word_level_trainer(params: VocabParams) -> trainers.Trainer:
    # WordLevelTrainer orders by count, then by token, so ties never depend on hashing.
    return trainers.WordLevelTrainer(
        vocab_size=params.max_size,
        min_frequency=params.min_freq,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )


def train_tokenizer(
    params: VocabParams, texts: Iterable[str] | Iterable[list[str]], where: str = "train split"
) -> TextTokenizer:
    """Learn a tokenizer of ``params.kind`` from streamed texts (or batches of texts).

    ``where`` names the training data in errors: a corpus too small for
    ``vocab.vocab_size`` (bpe) or with no token seen ``vocab.min_freq`` times (word, char).
    """
    if params.kind == "bpe":
        hf, trainer = _bpe_pipeline(params.vocab_size)
    elif params.kind == "word":
        hf, trainer = _word_pipeline(params)
    else:
        hf, trainer = _char_pipeline(params)
    hf.train_from_iterator(texts, trainer=trainer)
    learned = hf.get_vocab_size(with_added_tokens=True)
    if params.kind == "bpe" and learned < params.vocab_size:
        raise GptpipeError(
            f"{where}: too little text for vocab.vocab_size = {params.vocab_size}: BPE ran out "
            f"of pairs to merge at {learned} tokens; allowed: vocab.vocab_size <= {learned}, "
            "or use a larger corpus"
        )
    if params.kind != "bpe" and learned <= len(SPECIAL_TOKENS):
        unit = "word" if params.kind == "word" else "character"
        raise GptpipeError(
            f"{where}: no {unit} occurs vocab.min_freq = {params.min_freq} times or more; "
            "lower vocab.min_freq or use a larger corpus"
        )
    return TextTokenizer(hf, params.kind, hf.to_str(pretty=True).encode("utf-8"))


class TrainingSample:
    """The texts a tokenizer learns from: at most ``max_bytes`` (UTF-8) of a train split
    of ``total_bytes``, the same ones every run.

    A split that fits is taken whole, batch for batch, so its tokenizer is the one it
    always was. A larger one is sampled: a text is taken when its hash, as a fraction of
    the hash space, is under ``max_bytes / total_bytes`` (so long and short texts, early
    and late ones, are taken at the same rate, with no stride for a periodic corpus to
    alias with) and the budget still has room for it. Learning holds state per distinct
    word, which grows with the text learned from; the sample bounds it.
    """

    def __init__(self, total_bytes: int, max_bytes: int) -> None:
        self.whole = total_bytes <= max_bytes
        self.rate = 1.0 if self.whole else max_bytes / total_bytes
        self.max_bytes = max_bytes
        self.taken_bytes = 0

    def take(self, texts: list[str]) -> list[str]:
        """The texts of a batch that belong to the sample, in their order."""
        if self.whole:
            return texts
        kept = []
        for text in texts:
            data = text.encode("utf-8")
            if (sample_fraction(data) < self.rate
                    and self.taken_bytes + len(data) <= self.max_bytes):
                kept.append(text)
                self.taken_bytes += len(data)
        return kept


def sample_fraction(data: bytes) -> float:
    """Where a text's hash falls in [0, 1). The hash is personalized so that the sample
    is independent of any other hash of the same texts (the split's, the dedup key)."""
    digest = hashlib.blake2b(data, digest_size=8, person=b"gptpipe-vocab").digest()
    return int.from_bytes(digest, "big") / 2**64


# ----------------------------------------------------------------------------- loading


def detect_kind(config: dict[str, Any]) -> Kind | None:
    """The gptpipe kind of a parsed tokenizer JSON, or None if it is not one of ours."""
    model = (config.get("model") or {}).get("type")
    pre = (config.get("pre_tokenizer") or {}).get("type")
    decoder = (config.get("decoder") or {}).get("type")
    if model == "BPE" and pre == "ByteLevel" and decoder == "ByteLevel":
        return "bpe"
    if model == "WordLevel" and pre == "Sequence" and decoder is None:
        return "word"
    if model == "WordLevel" and pre == "Split" and decoder == "Fuse":
        return "char"
    return None


def _check_specials(hf: HFTokenizer, path: Path) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        found = hf.token_to_id(token)
        if found != expected_id:
            raise GptpipeError(
                f"{path}: special token {token} has id {found}; allowed: "
                + ", ".join(f"{t} = {i}" for i, t in enumerate(SPECIAL_TOKENS))
            )


def load_tokenizer(path: str | Path, fast: bool = True, threads: int = 0) -> TextTokenizer:
    """Load a tokenizer.json written by :func:`train_tokenizer` (or HF, if compatible).

    ``fast=False`` keeps BPE encoding on HF's own encoder (the reference the tests compare
    the tiktoken path against). ``threads``: encoding threads for a batch (0: one per
    core); the ids are the same for any number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GptpipeError(f"{path}: tokenizer not found (run gptpipe vocab first)") from None
    except IsADirectoryError:
        raise GptpipeError(f"{path}: is a directory; allowed: a tokenizer.json file") from None
    return tokenizer_from_json(raw, path, fast, threads)


def tokenizer_from_json(raw: bytes, path: Path, fast: bool = True, threads: int = 0
                        ) -> TextTokenizer:
    """A tokenizer from the bytes of a tokenizer JSON (``path`` names them in errors and
    is recorded as the tokenizer's path); the same checks as :func:`load_tokenizer`."""
    if len(raw) > MAX_JSON_BYTES:
        raise GptpipeError(f"{path}: {len(raw):,} bytes, over the limit of {MAX_JSON_BYTES:,} "
                           "bytes for a tokenizer.json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptpipeError(f"{path}: not valid JSON ({err}); allowed: a tokenizer.json") from None
    config = parse_json(text, str(path))
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for schema errors
        raise GptpipeError(
            f"{path}: not a Hugging Face tokenizer JSON ({err}); allowed: a file written by "
            "gptpipe vocab"
        ) from None
    kind = detect_kind(config)
    if kind is None:
        found = (config.get("model") or {}).get("type")
        raise GptpipeError(
            f"{path}: unrecognised tokenizer layout (model {found}); allowed: the bpe, word or "
            "char layouts that gptpipe vocab writes"
        )
    _check_specials(hf, path)
    return TextTokenizer(hf, kind, raw, path=path, fast=fast, config=config, threads=threads)


# ----------------------------------------------------------------------------- wrapper


def _threads() -> int:
    """Encoding threads: one per usable core (tiktoken releases the GIL while encoding)."""
    return usable_cores()


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class MadeWith:
    """What an artifact records of the tokenizer that made it: the token shards'
    meta.json, a model's config.json, preference pairs' meta.json."""

    what: str  # "the token shards were", "the model was", ... (an error's subject and verb)
    where: Path  # the file that records it
    sha256: str | None  # the tokenizer file's sha256; None when nothing is recorded
    vocab_size: int | None = None


def require_tokenizer(tokenizer: TextTokenizer, *artifacts: MadeWith) -> None:
    """The one check that a model, its tokenizer, token shards and preference pairs
    belong together: each artifact was made with ``tokenizer`` (same vocabulary size and
    the same file, by sha256, where it records them). A one-line error names the first
    that was not, since another tokenizer of the right size would give fluent nonsense."""
    for artifact in artifacts:
        size_differs = artifact.vocab_size not in (None, tokenizer.vocab_size)
        file_differs = artifact.sha256 not in (None, tokenizer.sha256)
        if size_differs or file_differs:
            recorded = (f"{artifact.vocab_size} tokens" if size_differs
                        else f"sha256 {str(artifact.sha256)[:12]}")
            ours = (f"{tokenizer.vocab_size} tokens" if size_differs
                    else f"sha256 {tokenizer.sha256[:12]}")
            raise GptpipeError(
                f"{artifact.where}: {artifact.what} made with another tokenizer "
                f"({recorded}) than {tokenizer.path or 'the one given'} ({ours}); re-run the "
                "stages from vocab on so that they share one tokenizer"
            )


class TextTokenizer:
    """A gptpipe tokenizer: an HF tokenizer, its kind and its JSON bytes.

    Build one with :func:`train_tokenizer` or :func:`load_tokenizer`.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(
        self,
        hf: HFTokenizer,
        kind: Kind,
        json_bytes: bytes,
        path: Path | None = None,
        fast: bool = True,
        config: dict[str, Any] | None = None,
        threads: int = 0,
    ) -> None:
        self.hf = hf
        self.threads = threads or _threads()
        self.kind: Kind = kind
        self.path = path
        self._json = json_bytes
        # Corpus text is ordinary text: never turn a literal "<eos>" into the special id.
        # This matches tiktoken's encode_ordinary, and is not stored in the JSON.
        self.hf.encode_special_tokens = True
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self._fast: tiktoken.Encoding | None = None
        if fast and kind == "bpe":
            self._fast = self._build_fast_encoder(config or json.loads(json_bytes))

    @property
    def sha256(self) -> str:
        """The sha256 of the JSON bytes (the file's bytes when loaded from disk)."""
        return hashlib.sha256(self._json).hexdigest()

    @property
    def json_bytes(self) -> bytes:
        """The tokenizer JSON, byte for byte what :meth:`save` writes."""
        return self._json

    @property
    def uses_fast_encoder(self) -> bool:
        """Whether BPE encoding goes through tiktoken (else through HF)."""
        return self._fast is not None

    def save(self, path: str | Path) -> None:
        """Write the tokenizer JSON atomically; the bytes are those :attr:`sha256` hashes."""
        with atomic_path(path) as tmp:
            tmp.write_bytes(self._json)
        self.path = Path(path)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if not texts:
            return []
        if self._fast is not None:
            return self._encode_fast(texts)
        if self.threads == 1:  # HF's batch call spreads over every core
            return [self.hf.encode(text, add_special_tokens=False).ids for text in texts]
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], dtype: np.dtype | type) -> np.ndarray:
        """One flat array of the texts' ids, each document as ``<bos> ids <eos>``.

        ``<bos>`` gives the model a learned "a document starts here" state, so generation
        from an empty prompt (just ``<bos>``) or a prompt read as a document's opening is
        in distribution; ``<eos>`` teaches it where documents end, so sampling can stop.
        """
        flat: list[int] = []
        for ids in self.encode_batch(texts):
            flat.append(BOS_ID)
            flat += ids
            flat.append(EOS_ID)
        return np.array(flat, dtype=dtype)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens show as ``<unk>``, ``<eos>``... unless skipped."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes of text each id stands for, 0 for the
        special tokens. Exact for byte-level BPE (its tokens are byte strings that
        partition the text); for char, a character's bytes; for word, the word's bytes
        plus one for the separator that usually follows it (an estimate)."""
        decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        lengths = np.zeros(self.vocab_size, np.int64)
        for token_id in range(len(SPECIAL_TOKENS), self.vocab_size):
            token = self.hf.id_to_token(token_id) or ""
            if self.kind == "bpe":
                lengths[token_id] = len(token_bytes(token, decoder))
            else:
                lengths[token_id] = len(token.encode()) + (self.kind == "word")
        return lengths

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    # -- fast BPE path

    def _encode_fast(self, texts: Sequence[str]) -> list[list[int]]:
        assert self._fast is not None
        encode = self._fast.encode_ordinary
        threads = self.threads
        if threads == 1 or len(texts) <= _DOCS_PER_TASK:
            return [encode(text) for text in texts]
        # tiktoken releases the GIL while it encodes; handing each thread a run of
        # documents (rather than one future per document, as encode_ordinary_batch does)
        # keeps the GIL-held bookkeeping small: measured 2x faster on two cores.
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda run: [encode(t) for t in run], _chunks(texts, _DOCS_PER_TASK))
            return [ids for part in parts for ids in part]

    def _build_fast_encoder(self, config: dict[str, Any]) -> tiktoken.Encoding | None:
        """A tiktoken Encoding giving the same ids as HF, or None if that is not assured.

        Why the ids are identical: HF's BPE encodes a pre-token by repeatedly merging the
        adjacent pair whose *merge* has the lowest rank (leftmost first); tiktoken merges
        the adjacent pair whose *concatenation* has the lowest rank (leftmost first). A
        trained BPE appends one new token per merge, so token id = first merge id + merge
        rank: ranking concatenations by id ranks them exactly as HF ranks their merges. We
        check that property here (ids strictly increase along the merge list, i.e. no two
        merges make the same token and none makes a special token) and otherwise fall back
        to HF. Both split text with the same GPT-2 regex and map bytes the same way; HF is
        told to treat "<eos>" in text as ordinary text, as encode_ordinary does. (A special
        token cannot be learned as a merge anyway: the regex puts '<' and letters in
        different pre-tokens.) tests/test_tokenizer.py compares both paths on code points
        from every Unicode plane, mixed scripts, emoji, whitespace runs and generated text;
        on the builtin Wikipedia corpora (en, fr, es) all 26k documents agree.
        """
        model = config["model"]
        pre = config["pre_tokenizer"]
        if (
            config.get("normalizer") is not None
            or pre.get("add_prefix_space")
            or not pre.get("use_regex", True)
            or model.get("dropout") is not None
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or model.get("byte_fallback")
            or model.get("ignore_merges")
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        merged_ids = [vocab.get(a + b, -1) for a, b in merges]
        if any(x < len(SPECIAL_TOKENS) for x in merged_ids) or any(
            x >= y for x, y in itertools.pairwise(merged_ids)
        ):
            return None
        decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        for token, token_id in vocab.items():
            if token_id < len(SPECIAL_TOKENS):
                continue
            if any(char not in decoder for char in token):
                return None
            ranks[token_bytes(token, decoder)] = token_id
        # tiktoken needs every single byte as a token, as the BPE alphabet guarantees.
        if len(ranks) != len(vocab) - len(SPECIAL_TOKENS) or any(
            bytes([b]) not in ranks for b in range(256)
        ):
            return None
        try:
            return tiktoken.Encoding(
                name="gptpipe-bpe",
                pat_str=GPT2_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={token: i for i, token in enumerate(SPECIAL_TOKENS)},
                # Asserts the ids are exactly 0..vocab_size-1, with no gap.
                explicit_n_vocab=self.vocab_size,
            )
        except (AssertionError, ValueError):
            return None
