"""Training batches: random windows of the token stream, drawn with an explicit generator.

Each optimizer step draws ``world_size * batch_size`` window offsets from one
``torch.Generator`` seeded from params; every rank draws the same offsets and keeps its
own slice. So a run on N processes sees exactly the batches of a one-process run with the
same global batch, and the generator's state (saved in checkpoints) is the whole data
position: a resumed run continues with the very next batch.

Random windows (rather than epochs of shuffled chunks) because a budget rarely covers
whole epochs here, and every offset stays equally likely to be seen; with weighted
sources (``train.source_weights``), equally likely within its source, each source drawn
at its weighted share.

The stream may be an array in memory or a split's flat file on disk
(:class:`pipeline.data.shards.TokenFile`): the same offsets give the same windows, and
from disk only the windows drawn are read, so memory does not grow with the corpus.
"""

from __future__ import annotations

import numpy as np
import psutil
import torch

from pipeline.core.errors import GptpipeError
from pipeline.data.shards import TokenStream, windows
from pipeline.data.sources import WeightedStarts
from pipeline.lm.model import GPTConfig


class WindowSampler:
    """Draws (x, y) pairs of shape (batch_size, context) from a 1-D token tensor."""

    def __init__(
        self,
        tokens: TokenStream,
        context: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        by_source: WeightedStarts | None = None,
    ) -> None:
        # Kept as stored (uint16 for most vocabularies, on disk for a split's flat file):
        # only a batch is read and widened.
        self.tokens = tokens
        self.context = context
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        # Weighted sources (pipeline/data/sources.py) draw the starts by source; None:
        # uniformly over the stream.
        self.by_source = by_source
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        if len(self.tokens) < context + 1:
            raise GptpipeError(
                f"model.context = {context} needs at least {context + 1} training tokens; "
                f"the train split has {len(self.tokens)}; use a smaller model.context or a "
                "larger corpus"
            )

    def next_windows(self, pin_memory: bool = False) -> torch.Tensor:
        """The next batch as one (B, T + 1) int64 tensor: x is [:, :-1], y is [:, 1:].

        ``pin_memory`` (for a GPU) puts it in page-locked memory, so that one contiguous
        ``.to(device, non_blocking=True)`` overlaps the copy with work already queued.
        """
        high = len(self.tokens) - self.context  # x = tokens[i : i + T], y shifted by one
        count = self.world_size * self.batch_size
        if self.by_source is None:
            offsets = torch.randint(high, (count,), generator=self.generator)
        else:
            offsets = torch.from_numpy(self.by_source.draw(count, self.generator))
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        window = torch.from_numpy(  # (B, T + 1)
            windows(self.tokens, mine.numpy(), self.context + 1).astype(np.int64))
        self.batches_drawn += 1
        return window.pin_memory() if pin_memory else window

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.next_windows()
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_windows(tokens: TokenStream, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (N, context + 1) windows covering the stream (or ``limit`` of them,
    evenly spaced), for a val loss that is the same every time it is measured."""
    count = (len(tokens) - 1) // context
    if count < 1:
        raise GptpipeError(
            f"model.context = {context} needs at least {context + 1} tokens in the evaluated "
            f"split; it has {len(tokens)}; use a smaller model.context or a larger corpus"
        )
    starts = np.arange(count) * context
    if limit is not None and limit < count:
        starts = starts[np.linspace(0, count - 1, limit).round().astype(np.int64)]
    return torch.from_numpy(windows(tokens, starts, context + 1).astype(np.int64))


# --------------------------------------------------------------------- batches and memory


def check_cpu_memory(batch_size: int, config: GPTConfig) -> None:
    """Refuse, before training, a CPU batch whose activations cannot fit in RAM.

    On a CPU an oversized batch is not an exception: the kernel's OOM killer ends the
    process. So estimate instead: per token, about 20 * n_embd floats per layer are
    kept for the backward pass, plus 3 * vocab_size floats for the logits, their
    log-softmax and gradient (a measured upper bound for these models, rounded up).
    GPUs raise a catchable out-of-memory error instead (:func:`is_out_of_memory`).
    """
    c = config
    needed = batch_size * c.context * 4 * (20 * c.n_layer * c.n_embd + 3 * c.vocab_size)
    available = psutil.virtual_memory().available
    if needed > available:
        raise GptpipeError(
            f"train.batch_size = {batch_size} sequences of model.context = {c.context} "
            f"tokens need about {needed / 2**30:.1f} GiB of activations; this machine has "
            f"{available / 2**30:.1f} GiB free, so they do not fit in cpu memory; lower "
            "train.batch_size (and raise train.grad_accum to keep the same tokens per step)"
        )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says a device ran out of memory."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "can't allocate memory" in text or "out of memory" in text


def batch_too_large(batch_size: int, context: int, device: torch.device) -> GptpipeError:
    return GptpipeError(
        f"train.batch_size = {batch_size} sequences of model.context = {context} tokens do "
        f"not fit in {device} memory; lower train.batch_size (and raise train.grad_accum to "
        "keep the same tokens per step)"
    )
