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


EXIT_USAGE = 2            # a bad invocation: option, file or value the user can fix
EXIT_BACKEND_FAILED = 3   # the run finished, but at least one backend configuration failed


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached the parent. A BaseException, like KeyboardInterrupt,
    so no `except Exception` on the way up swallows it before the workers are stopped."""

    def __init__(self, signame: str, run_dir: object = None) -> None:
        super().__init__(signame)
        self.signame, self.run_dir = signame, run_dir

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signame, signal.SIGINT))

    def hint(self) -> str:
        if self.run_dir is None:
            return "stopped before the run folder was written; nothing to resume"
        import shlex

        return (f"results written so far are kept; continue with "
                f"python -m suite run --resume {shlex.quote(str(self.run_dir))}")
