"""One exception type for every user-facing problem; the CLI turns it into one line and exit 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SimcostError(ValueError):
    """Bad input: an unknown name, an impossible configuration, a malformed file."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the nearest valid names, or '' when none is close."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> SimcostError:
    choices = sorted(set(choices))
    hint = closest(name, choices)
    if not hint:
        shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
        hint = f"; valid: {shown}"
    return SimcostError(f"unknown {what} '{name}'{hint}")
