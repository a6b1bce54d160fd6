"""The one exception type users see.

Every failure caused by user input (a bad option, a missing file, a model softprune cannot handle)
raises :class:`SoftpruneError` with a message that says what was wrong, what was expected and what
to do. The command line prints the message on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SoftpruneError(Exception):
    """A problem with the user's input or environment, with a message meant to be read by a person."""


def choice_error(what: str, value: object, choices: Iterable[str]) -> SoftpruneError:
    """An error for a value outside a fixed set, listing the choices and the closest match."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return SoftpruneError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}.{hint}")


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise choice_error(what, value, choices)
    return value
