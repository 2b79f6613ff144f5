"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback, exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class UserError(Exception):
    """A problem in the recipe, the data or the command line; the message names the problem and the fix."""


def did_you_mean(word: str, choices: Iterable[object]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), Python's MemoryError, or the CPU allocator's RuntimeError. Matched by name
    and message so that this module stays free of a torch import."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def out_of_memory(device: torch.device, knobs: str) -> UserError:
    return UserError(
        f"out of memory on {device}. To fit: {knobs}. (On a CPU machine, a run killed without this message was "
        "most likely stopped by the kernel's out-of-memory killer: the same knobs apply.)"
    )
