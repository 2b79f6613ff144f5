"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback, exit code 2."""

import difflib


class UserError(Exception):
    """A problem in the recipe, the data or the command line; the message names the problem and the fix."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
