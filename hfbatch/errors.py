"""The error hierarchy users can catch.

Each error carries the exit code the CLI returns for it, and a message that says what went wrong,
where (file, row, column) and the fix. The CLI prints the message on one line; tracebacks only
with --debug.
"""

from __future__ import annotations


class HfbatchError(Exception):
    """Base of every error hfbatch raises on purpose."""

    exit_code = 1


class InputError(HfbatchError):
    """Bad flag, unreadable file, missing column or invalid row (with --on-invalid fail)."""

    exit_code = 2


class TooManyErrors(HfbatchError):
    """More rows were invalid than --max-errors allows: the job stops, nothing is written."""

    exit_code = 1


class OutputError(HfbatchError):
    """The output could not be written; nothing was left at the output path."""

    exit_code = 1


class BackendError(HfbatchError):
    """A backend could not produce vectors."""

    exit_code = 1


class ModelLoadError(BackendError):
    """The model could not be found, downloaded or loaded."""


class TransientBackendError(BackendError):
    """A failure worth retrying (timeouts, overloaded servers)."""


class TerminalBackendError(BackendError):
    """A failure that retrying will not fix (bad request, wrong credentials)."""


class RemoteError(BackendError):
    """An HTTP backend answered with an error or an answer of the wrong shape."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a scheduler, `kill`, or a closed terminal stopping the job): unwinds like
    Ctrl-C, so the output is abandoned whole and the CLI exits 128 + the signal's number (143,
    129). A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    swallows it."""

    def __init__(self, signum: int = 15, name: str = "SIGTERM"):
        super().__init__(name)
        self.signum, self.name = signum, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
