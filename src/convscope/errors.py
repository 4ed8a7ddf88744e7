"""User-facing errors.

Every error a user can cause (a wrong name, a bad file, missing weights offline) is a
:class:`ConvscopeError` whose message says what to do next. The CLI prints it on one line
and exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ConvscopeError", "suggest"]


class ConvscopeError(Exception):
    """An error caused by the user's input; the message says how to fix it."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A ``" Did you mean: a, b?"`` hint for ``name`` among ``choices`` (empty if none is close)."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""
