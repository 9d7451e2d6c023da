"""Progress bars that show on a terminal and stay quiet in CI logs and under DVC."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: float | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
        smoothing=0.1,
        **kwargs,
    )
