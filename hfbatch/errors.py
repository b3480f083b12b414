"""The error hierarchy users can catch.

    HfbatchError                  exit 1   every error hfbatch raises on purpose
    ├── InputError                exit 2   bad flag, file, column or row: found before any work
    ├── TooManyErrors             exit 1   more invalid rows than --max-errors
    ├── OutputError               exit 1   the output could not be written
    │   └── InputChangedError              the input was replaced while it was read: nothing
    │                                      published for it, never recorded as done
    └── BackendError              exit 1   no vectors (or completions) for a batch
        ├── ModelLoadError                 the model cannot be found, downloaded or loaded
        │                                  (hfbatch.resources.MemoryGuardError: it would not fit)
        └── RemoteError                    an HTTP backend failed or answered wrongly
            ├── TransientBackendError      transient: unreachable, timed out, 429, 5xx (retried first)
            └── TerminalBackendError       refused: 4xx, a redirect elsewhere, one text too large
    Terminated (a BaseException)  exit 128 + signal: SIGTERM / SIGHUP, unwinds like Ctrl-C

Two properties of each class, read by the code that handles them, never inferred from a message:
- `exit_code`: what the CLI returns for it;
- `transient`: whether the same request may succeed if tried again. Retries (backends/http.py)
  decide by this property alone. Only TransientBackendError is transient; every other error,
  a malformed answer included, is terminal. TransientBackendError and TerminalBackendError are
  the two kinds of RemoteError, named so `except TransientBackendError` reads as what it means.

Each message says what went wrong, where (file, row, column) and the fix. The CLI prints it on one
line; tracebacks only with --debug.
"""

from __future__ import annotations

import os
import re


class HfbatchError(Exception):
    """Base of every error hfbatch raises on purpose."""

    exit_code = 1
    transient = False


class InputError(HfbatchError):
    """Bad flag, unreadable file, missing column or invalid row (with --on-invalid fail)."""

    exit_code = 2


class TooManyErrors(HfbatchError):
    """More rows were invalid than --max-errors allows: the job stops, nothing is written."""


class OutputError(HfbatchError):
    """The output could not be written; nothing was left at the output path."""


class InputChangedError(OutputError):
    """The input was replaced or rewritten while the job read it (`provenance.InputIdentity`):
    nothing was published for it, and no record says it is done, so a rerun reads it again. (In a
    many-part job, either engine, only that part fails.) Exit 1: the job ran, so it is no usage error."""


class BackendError(HfbatchError):
    """A backend could not produce vectors (or completions)."""


class ModelLoadError(BackendError):
    """The model could not be found, downloaded or loaded."""


class RemoteError(BackendError):
    """An HTTP backend failed: it could not be reached, refused the request, or answered with
    something that is not what was asked for (wrong shape, not JSON, NaN)."""


class TransientBackendError(RemoteError):
    """A failure worth retrying (timeouts, refused connections, 429, overloaded servers); raised
    once the retries are spent."""

    transient = True


class TerminalBackendError(RemoteError):
    """A request the server refused in a way retrying will not fix (bad request, wrong credentials,
    a redirect to another server, a single text too large)."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a scheduler, `kill`, or a closed terminal stopping the job): unwinds like
    Ctrl-C, so the output is abandoned whole and the CLI exits 128 + the signal's number (143,
    129). A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    swallows it."""

    transient = False

    def __init__(self, signum: int = 15, name: str = "SIGTERM"):
        super().__init__(name)
        self.signum, self.name = signum, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` may go away if the same request is tried again: the `transient` property of
    hfbatch's errors; anything else (a bug, an OSError) is not retried."""
    return isinstance(exc, HfbatchError) and exc.transient


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-blank line (its type's name when it has none), cut to `limit`
    characters: what a one-line error quotes of a library's message (OpenVINO's run to C++ file
    and line, transformers' to five lines)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return type(exc).__name__


# Secrets a message may carry: hub tokens (by shape), the values of the variables that hold tokens,
# API keys and store credentials (a server or library may echo them), and user:password@ in a URL
# (greedy up to the last @ before the path, as URL parsers split it).
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{6,}")
_USERINFO_RE = re.compile(r"\b([a-z][a-z0-9+.\-]*://)[^/?#\s'\"<>]*@", re.IGNORECASE)
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:ssl)?password=)[^&#\s'\"<>]*", re.IGNORECASE)  # libpq URLs take ?password=
SECRET_VARIABLES = ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HFBATCH_API_KEY",
                    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY",
                    "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "PGPASSWORD")


def redact_text(text: str) -> str:
    """`text` with every secret above replaced by ***: what any message, log line or record
    passes through before it is shown or written."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    text = _USERINFO_RE.sub(r"\1***@", text)
    text = _QUERY_PASSWORD_RE.sub(r"\1***", text)
    return _TOKEN_RE.sub("hf_***", text)
