"""User-facing errors.

Anything a user can fix (a bad value, a missing file, an unknown option) is raised as
:class:`RlkdError` with a message of one line that names the problem and the fix. The CLI prints
that line and exits non-zero; the traceback is shown only with ``--debug`` or ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations


class RlkdError(Exception):
    """A problem with the user's input or environment, with a one-line message saying how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))


def require(condition: bool, message: str) -> None:
    """Raise :class:`RlkdError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RlkdError(message)
