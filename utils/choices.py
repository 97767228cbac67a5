"""Checking a name the user wrote against the valid ones, with a "did you mean" suggestion.

Standard library only: the configuration reads a YAML file with it, and reading one needs no torch.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def did_you_mean(name: str, choices: Iterable[str], *, cutoff: float = 0.6, ignore_case: bool = False) -> str:
    """`` (did you mean 'X'?)`` for the closest choice, or an empty string.

    Args:
        name: what the user wrote.
        choices: the valid names.
        cutoff: the least similarity (:func:`difflib.get_close_matches`) worth suggesting.
        ignore_case: compare lower-cased (for names whose case users get wrong, as ``softdice``);
            the suggestion keeps the choice's own case.
    """
    by_key = {(str(c).lower() if ignore_case else str(c)): str(c) for c in choices}
    key = str(name).lower() if ignore_case else str(name)
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=cutoff)
    return f" (did you mean {by_key[close[0]]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ValueError naming ``name``, the valid choices and the closest one unless ``value`` is one of them."""
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        raise ValueError(f"{name}={value!r} is not one of {choices}{hint}")
