"""User-facing errors: the CLI prints these as one clear message, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunelabError(Exception):
    """A problem the user can fix (bad config, bad data row, resource exhausted).

    The message must say what is wrong and where (config field, file:line:field, training
    step) and, when there is one, the fix.
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"; did you mean X?" for the choice closest to a misspelt `word` (difflib's ratio ≥ 0.6),
    or "" when none is close: appended to an "unknown ..." message."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]}?" if close else ""
