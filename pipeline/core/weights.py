"""Weights on disk and in modules: safetensors files (never a pickle), tied tensors, and
the one way gptpipe loads a state dict into a module (:func:`load_state`)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from pipeline.core.errors import GptpipeError


def unique_state(module: Any) -> dict[str, Any]:
    """``module``'s state dict without the later names of tied tensors (an output matrix
    tied to the embedding, say): safetensors refuses two names for one storage, and
    loading the first name re-ties the rest."""
    tied = tied_names(module)
    return {name: tensor.detach().contiguous()
            for name, tensor in module.state_dict().items() if name not in tied}


def tied_names(module: Any) -> set[str]:
    """The names in ``module``'s state dict that repeat an earlier name's tensor (the same
    storage, dtype, shape and strides): what :func:`unique_state` leaves out."""
    tied, seen = set(), set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def load_state(module: Any, state: dict[str, Any], mismatch: str) -> None:
    """Load ``state`` into ``module`` in place, the one way gptpipe loads weights: every
    tensor must be there under its name, in its shape, except the later names of tied
    tensors (:func:`tied_names`, left out when saving: loading the first re-ties them).
    Anything else is one :class:`GptpipeError` line, ``mismatch`` (what does not match
    what) then the first problem in brackets."""
    tied = tied_names(module)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        problem = str(err).strip().splitlines()[-1].strip()
        raise GptpipeError(f"{mismatch} ({problem})") from None
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptpipeError(f"{mismatch} ({problem})")


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its write errors raised as OSError so that
    :func:`pipeline.core.io.atomic_dir` reports them in one line (a full disk, say)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        full = "No space" in str(err) or "os error 28" in str(err)
        raise OSError(errno.ENOSPC if full else errno.EIO, str(err)) from None


def load_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (never a pickle: a planted one is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise GptpipeError(
            f"{path}: not a readable safetensors file ({err}); gptpipe never loads pickles"
        ) from None
