"""The project's exceptions.

Core modules raise these; the CLI turns each into a one-line message and an exit code
(`exit_code`), so no user ever sees a traceback for a problem they can fix. Anything else
that escapes is a bug.
"""

from __future__ import annotations


class OmniError(Exception):
    """Base class: a problem the user can act on. `exit_code` is what cron sees."""

    exit_code = 1


class UsageError(OmniError):
    """A bad option value or argument, caught before any work starts."""

    exit_code = 2


class LabelsError(UsageError):
    """The labels file is missing, empty or malformed."""


class InputNotFound(UsageError):
    """An input PATH does not exist."""


class InputUnreadable(OmniError):
    """An input folder cannot be listed, or would empty the output: nothing is touched."""


class ModelError(OmniError):
    """The model cannot be found or loaded (missing, pickled weights, not a CLIP)."""


class OutputError(OmniError):
    """The output file cannot be written; nothing was touched."""


class LockedError(OmniError):
    """Another `omni tag` holds the output's lock."""

    exit_code = 4


class DecodeError(Exception):
    """One input file could not be turned into pixels; becomes an `error` row, never fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run flushes its rows as on Ctrl-C."""


class Interrupted(OmniError):
    """A run stopped by SIGINT (exit 130) or SIGTERM (143) after saving what was finished."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
