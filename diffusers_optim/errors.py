"""User-facing errors: one clear line, no traceback, raised before any training starts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user. The CLI prints `error: <message>` and exits with status 2."""


def closest_match(name: str, choices: Iterable[str]) -> str | None:
    """The choice that looks most like `name`, or None if nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """An error for an unknown name that lists the valid ones and the closest match."""
    choices = sorted(choices)
    hint = closest_match(name, choices)
    did_you_mean = f" Did you mean '{hint}'?" if hint else ""
    return UserError(f"unknown {kind} '{name}'.{did_you_mean} Valid: {', '.join(choices)}")
