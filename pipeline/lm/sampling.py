"""Text generation from a trained GPT: logit filtering, the decode loop, streaming text.

Layers, each usable on its own:

- :func:`filter_logits`: temperature, top-k and nucleus (top-p) filtering as one pure
  function on a (B, V) tensor, so the maths is tested on hand-computed numbers.
- :func:`generate_ids`: the decode loop, yielding one new token id at a time. With the
  key/value cache the prompt is run once and each new token costs one position; without
  it the whole window is recomputed per token (the reference the cache is tested against).
- :func:`sample_batch`: equal-length prompts as one batch through one cache (RLHF
  rollouts), returning new tokens and a mask of the real ones.
- :class:`StreamDecoder`: turns ids into printable text as they arrive, never printing
  half of a multi-byte character.
- :func:`encode_prompt` / :func:`sample_text`: the glue the ``generate`` command uses.

Documents are stored for training as ``<bos> text <eos>``, so a prompt starts with
``<bos>`` and generation stops after the model writes ``<eos>``.

Randomness comes only from an explicit ``torch.Generator`` (no global RNG state), and it
must live on the model's device: ``torch.multinomial`` refuses a CPU generator for CUDA
probabilities. :func:`sample_text` builds the right one from a seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline.core.errors import GptpipeError
from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer
from pipeline.lm.model import GPT, KVCache

# Ids that mark structure, not text: the streamed output never shows them. <unk> is
# printed (as "<unk>"), since hiding it would silently drop a word.
_SILENT_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID})

# What a lossy UTF-8 decode puts where bytes do not (yet) form a whole character.
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen; validated on construction."""

    # Divides the logits; 0 means greedy (always the most likely token).
    temperature: float = 1.0
    # Keep only the k most likely tokens; 0 turns the filter off.
    top_k: int = 0
    # Keep the smallest set of most likely tokens whose mass reaches top_p; 1 is off.
    top_p: float = 1.0
    max_new_tokens: int = 128
    # Stop right after yielding <eos> (a document ends there in the training data).
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise GptpipeError(
                f"temperature = {self.temperature}; allowed: a number >= 0 (0 means greedy)"
            )
        if self.top_k < 0:
            raise GptpipeError(f"top_k = {self.top_k}; allowed: an integer >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise GptpipeError(f"top_p = {self.top_p}; allowed: 0 < top_p <= 1 (1 means off)")
        if self.max_new_tokens < 1:
            raise GptpipeError(f"max_new_tokens = {self.max_new_tokens}; allowed: an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------- filtering


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Scaled logits (B, V) with every token outside the sampling set at -inf.

    Applied in this order (the order Hugging Face uses, so settings mean the same):
    temperature, then top-k, then top-p on what top-k left.

    - temperature 0 keeps only each row's most likely token (the limit of T -> 0), so
      softmax of the result is one-hot; the first index wins a tie, as argmax does.
    - top_k keeps the k highest logits and any tied with the k-th (a deterministic rule
      that needs no tie-breaking order); k >= V keeps everything.
    - top_p keeps the smallest set of most likely tokens whose probability reaches top_p:
      a token stays while the mass strictly before it is below top_p. The most likely
      token has nothing before it, so it is always kept, however small top_p is.

    Pure: returns a new tensor and leaves ``logits`` as it was.
    """
    logits = logits.float()  # (B, V); softmax sums in float32 even for bf16 models
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(dim=-1, keepdim=True), True)
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_highest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_highest, float("-inf"))
    if top_p < 1:
        # Stable sort: equal logits keep their index order, so ties resolve the same way
        # on every run and device.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(dim=-1)  # (B, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V), 0 for the top
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> int:
    """One token id from the last position's logits (1, V)."""
    if config.greedy:
        # argmax directly: no softmax, and the generator is not consumed.
        return int(logits.argmax(dim=-1).item())
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(dim=-1)  # (1, V)
    return int(torch.multinomial(probs, 1, generator=generator).item())


# ------------------------------------------------------------------------------ prompts


def encode_prompt(tokenizer: TextTokenizer, text: str) -> tuple[list[int], list[str]]:
    """The prompt's ids, ``<bos>`` first, and the pieces of ``text`` that became ``<unk>``.

    The pieces come from HF's offsets into the original text, so a lowercasing word
    vocabulary still names the word as the user typed it. There is one piece per
    ``<unk>`` id, in prompt order (repeats included). Byte-level BPE never produces
    ``<unk>``, so it returns no pieces. An empty prompt gives ``[<bos>]``.
    """
    ids = [BOS_ID, *tokenizer.encode_batch([text])[0]] if text else [BOS_ID]
    if UNK_ID not in ids:
        return ids, []
    # encode_batch may run tiktoken (bpe); HF's encoding carries the offsets. Both give
    # the same ids (tests/test_tokenizer.py), and only word/char vocabularies reach here.
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    unknown = [
        text[start:end]
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
        if token_id == UNK_ID
    ]
    return ids, unknown


# --------------------------------------------------------------------------- generation


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _shrink(window: list[int], context: int) -> list[int]:
    """The window policy both decode paths share, so they produce the same tokens.

    When the sequence outgrows the context, keep its last ``context // 2`` tokens: a
    sliding window of ``context`` would need a full recompute (a cache rebuild) on every
    token once full, while halving rebuilds once per ``context // 2`` tokens and still
    leaves the model half a context of history.
    """
    if len(window) <= context:
        return window
    return window[-max(1, context // 2) :]


@torch.no_grad()  # torch's decorator is generator-aware: grad is off only while we run
def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    config: SamplingConfig,
    generator: torch.Generator,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (at most ``config.max_new_tokens``).

    ``prompt_ids`` must hold at least one id (``<bos>``: see :func:`encode_prompt`).
    Stops after yielding ``<eos>`` when ``config.stop_at_eos``. Runs on the model's
    device, so ``generator`` must be on that device too. The model is put in eval mode
    (no dropout) while generating and given back in the mode it had.

    ``use_cache=False`` recomputes the whole window each token: slower, and the reference
    the cached path must match token for token (both shrink the window identically,
    see :func:`_shrink`).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; a prompt holds at least <bos>")
    vocab_size = model.config.vocab_size
    if not all(0 <= token_id < vocab_size for token_id in prompt_ids):
        raise ValueError(f"prompt_ids holds an id outside 0 .. {vocab_size - 1}")
    context = model.config.context
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        window = list(prompt_ids)  # what the model sees: the last tokens of the sequence
        cache: KVCache | None = None
        pending: list[int] = []  # cached path: the window's tokens not yet in the cache
        for _ in range(config.max_new_tokens):
            shrunk = _shrink(window, context)
            if use_cache and (cache is None or shrunk is not window):
                # First step, or the window was cut: its positions changed, so the cache
                # is rebuilt from the new window.
                cache = KVCache(model.config.n_layer, capacity=model.config.context)
                pending = shrunk
            window = shrunk
            model_input = pending if use_cache else window
            idx = torch.tensor([model_input], dtype=torch.long, device=device)  # (1, T)
            logits, _ = model(idx, cache=cache)  # (1, T, V)
            token = _next_token(logits[:, -1, :], config, generator)
            yield token
            if token == EOS_ID and config.stop_at_eos:
                return
            window.append(token)
            pending = [token]
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------- text


class StreamDecoder:
    """Turn token ids into text as they arrive, for printing while generating.

    ``feed`` returns the text that became final with this token. Text is held back while
    the decode ends in U+FFFD, which is how a byte-level token that carries only part of a
    multi-byte character decodes; it is released once the character is whole (or at
    :meth:`flush`, when a genuinely invalid sequence is printed as U+FFFD).
    ``<pad>``, ``<bos>`` and ``<eos>`` print nothing.

    Decoding token by token would lose what decoding sequences adds (a word vocabulary
    joins words with spaces), so each step decodes a short window, from the start of the
    last released text to the end, and releases what extends it (the incremental scheme
    vLLM uses): linear in the output length, not quadratic.

    ``context_ids`` (the prompt) are decoded as history but never returned, so the first
    word of a word-vocabulary continuation gets its separating space.
    """

    def __init__(self, tokenizer: TextTokenizer, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._ids = [t for t in context_ids if t not in _SILENT_IDS]
        # ids[_prefix:_read] decode to text already released (or the context);
        # ids[_read:] are not released yet.
        self._prefix = 0
        self._read = len(self._ids)

    def feed(self, token_id: int) -> str:
        if token_id in _SILENT_IDS:
            return ""
        self._ids.append(token_id)
        return self._release(hold_incomplete=True)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD)."""
        return self._release(hold_incomplete=False)

    def _release(self, hold_incomplete: bool) -> str:
        if self._read == len(self._ids):
            return ""
        released = self.tokenizer.decode(self._ids[self._prefix : self._read])
        text = self.tokenizer.decode(self._ids[self._prefix :])
        if hold_incomplete and text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]


def sample_text(
    model: GPT, tokenizer: TextTokenizer, prompt: str, config: SamplingConfig, seed: int
) -> str:
    """The continuation of ``prompt`` as text (without the prompt), the same for a seed."""
    prompt_ids, _ = encode_prompt(tokenizer, prompt)
    generator = torch.Generator(_model_device(model)).manual_seed(seed)
    decoder = StreamDecoder(tokenizer, prompt_ids)
    pieces = [decoder.feed(t) for t in generate_ids(model, prompt_ids, config, generator)]
    return "".join(pieces) + decoder.flush()


# ----------------------------------------------------------------------- batched rollouts


def _next_tokens(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """One token id per row from the last position's logits (B, V) -> (B,)."""
    if config.greedy:
        # As _next_token: argmax directly, and the generator is not consumed.
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_batch(
    model: GPT,
    prompts: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of B prompts at once: (new tokens (B, N), mask (B, N) bool).

    ``prompts`` is (B, T0) int64, every row the same length T0 >= 1. The batch runs
    through ONE :class:`KVCache` of capacity T0 + max_new_tokens; a request longer than
    the model's context is refused with ``ValueError`` (no window shrinking here: RLHF
    scores prompt + completion in one forward pass afterwards, so it must fit).

    Why equal-length prompts: the model has no padding mask, and with rotary positions
    left padding would shift every real token's position, so a padded row would not
    sample what that prompt alone samples. This is why RLHF prompts are fixed-length
    token prefixes (prompts of mixed lengths go one at a time through :func:`generate_ids`).

    Each step draws every row's token from ``filter_logits`` + ``torch.multinomial`` with
    ``generator`` (on the model's device), or takes the argmax when temperature is 0, so
    with greedy decoding a row equals :func:`generate_ids` on that prompt alone. With
    ``config.stop_at_eos``, a row that wrote ``<eos>`` is finished: the batch keeps
    stepping for the others, its mask is True up to and including the ``<eos>`` and False
    after, and its later tokens are returned as ``<pad>`` (so a forgotten mask shows as
    padding, not as text). The loop stops as soon as every row has finished, so
    N <= max_new_tokens is the number of steps actually run. Without ``stop_at_eos``
    ``<eos>`` is an ordinary token: N = max_new_tokens and the mask is all True.

    The model is put in eval mode (no dropout) and given back in the mode it had.
    """
    if prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts has shape {tuple(prompts.shape)}; allowed: (B, T0), T0 >= 1")
    capacity = prompts.shape[1] + config.max_new_tokens
    if capacity > model.config.context:
        raise ValueError(
            f"prompt ({prompts.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) "
            f"= {capacity} is longer than the model's context ({model.config.context})"
        )
    vocab_size = model.config.vocab_size
    if prompts.numel() and not 0 <= int(prompts.min()) <= int(prompts.max()) < vocab_size:
        raise ValueError(f"prompts holds an id outside 0 .. {vocab_size - 1}")
    device = _model_device(model)
    prompts = prompts.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.n_layer, capacity=capacity)
        logits, _ = model(prompts, cache=cache)  # (B, T0, V): the prompt, run once
        finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=device)  # (B,)
        new_tokens: list[torch.Tensor] = []  # N tensors of (B,)
        live: list[torch.Tensor] = []
        for step in range(config.max_new_tokens):
            token = _next_tokens(logits[:, -1, :], config, generator)  # (B,)
            token = token.masked_fill(finished, PAD_ID)
            new_tokens.append(token)
            live.append(~finished)
            if config.stop_at_eos:
                finished = finished | (token == EOS_ID)
                if bool(finished.all()):
                    break
            if step + 1 < config.max_new_tokens:  # the last step's logits would go unused
                logits, _ = model(token.unsqueeze(1), cache=cache)  # (B, 1, V)
        return torch.stack(new_tokens, dim=1), torch.stack(live, dim=1)
    finally:
        model.train(was_training)
