"""The one exception type the pipeline raises for bad input or bad params.

Its message is a single line that names the file, key or value at fault and says
what is allowed; the CLI prints it and exits non-zero, with no traceback.
"""

from __future__ import annotations

import click


class GptpipeError(click.ClickException):
    """Bad input, bad params or an impossible request; ``str(err)`` is one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep the promise of one line even when a caller formats a multi-line value.
        super().__init__(" ".join(message.split()))
