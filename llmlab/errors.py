"""The one exception type for user mistakes.

The CLI turns an `LlmlabError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

import difflib


class LlmlabError(Exception):
    """A mistake in the user's input: a bad path, key, value or file. Its message says how to fix it."""


def nearest(word: str, options) -> str | None:
    """The option most like `word`, or None when nothing is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def closest(word: str, options) -> str:
    """' (did you mean X?)' for the nearest option, or '' when nothing is close."""
    match = nearest(word, options)
    return f" (did you mean '{match}'?)" if match else ""
