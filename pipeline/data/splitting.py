"""Train/val/test assignment by a hash of a document's text: pure functions.

A document's split depends only on its clean text and the seed, never on its position or
on the other documents, so adding documents never moves existing ones and identical
texts always land in the same split (no text is in two splits).
"""

from __future__ import annotations

import hashlib
import math

SPLITS = ("train", "val", "test")


def split_point(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``text`` and ``seed``, uniform over texts.

    The first 8 bytes (big-endian) of blake2b(seed + b"\\0" + text) over 2**64, where the
    seed is its decimal ASCII form (any int, negative or huge, has one) and the NUL byte
    keeps seed 1 + text "2x" apart from seed 12 + text "x".
    """
    digest = hashlib.blake2b(str(seed).encode("ascii") + b"\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(text: str, seed: int, train: float, val: float) -> str:
    """``"train"`` if the split point is below ``train``, ``"val"`` below ``train + val``,
    else ``"test"``."""
    u = split_point(text, seed)
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def documents_for_nonempty(fraction: float, risk: float = 0.01) -> int:
    """The fewest documents for which a split of ``fraction`` is empty with probability
    below ``risk``: the smallest n with (1 - fraction)**n < risk.

    Each document misses the split independently with probability 1 - fraction.
    For fraction 0.1 and risk 0.01 that is 44.
    """
    if not 0.0 < fraction < 1.0 or not 0.0 < risk < 1.0:
        raise ValueError(f"fraction and risk must be in (0, 1), got {fraction} and {risk}")
    n = math.ceil(math.log(risk) / math.log1p(-fraction))
    # ceil() of an exact integer quotient gives an n where the probability equals risk.
    return n + 1 if (1.0 - fraction) ** n >= risk else n
