"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SuiteError(Exception):
    """A problem the user can fix (bad name, bad file, bad option)."""


class BackendUnavailable(SuiteError):
    """The backend's optional library is missing; the message says which extra installs it."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the nearest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> SuiteError:
    choices = sorted(choices)
    return SuiteError(
        f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(choices)}"
    )
