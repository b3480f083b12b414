"""The error tree: drawn in errors.py's docstring exactly as the classes are, with exit_code and
transient as properties of each class; retries decide by the property."""

from __future__ import annotations

import re

import pytest

import hfbatch
from hfbatch import errors
from hfbatch.backends.http import HttpClient, RetryPolicy, RetryableHTTPError
from hfbatch.errors import BackendError, HfbatchError, RemoteError, Terminated, TerminalBackendError, is_transient

PUBLIC = [obj for obj in vars(errors).values()
          if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__]


def drawn_tree() -> dict[str, str | None]:
    """{class: parent} as the module docstring draws it (4 columns a level; roots have None)."""
    parents: dict[str, str | None] = {}
    at_level: dict[int, str] = {}
    for line in errors.__doc__.splitlines():
        match = re.match(r"^(?P<lead>[ │├└─]*?)(?P<name>[A-Z]\w+)\b", line)
        if not match or not line.startswith("    ") or match.group("name") not in vars(errors):
            continue
        level = (len(match.group("lead")) - 4) // 4
        at_level[level] = match.group("name")
        parents[match.group("name")] = at_level[level - 1] if level else None
    return parents


def test_the_docstring_draws_every_class_where_it_is() -> None:
    tree = drawn_tree()
    assert set(tree) == {cls.__name__ for cls in PUBLIC}
    for cls in PUBLIC:
        base = cls.__base__.__name__
        assert tree[cls.__name__] == (None if base in ("Exception", "BaseException") else base), cls


def test_every_error_has_an_exit_code_and_transient() -> None:
    for cls in PUBLIC:
        error = cls() if cls is not Terminated else cls(15, "SIGTERM")
        assert isinstance(error.exit_code, int) and isinstance(error.transient, bool), cls
        assert isinstance(cls.transient, bool), cls  # a property of the class, not of one instance
    assert {cls.__name__ for cls in PUBLIC if cls.transient} == {"TransientBackendError"}
    assert errors.InputError.exit_code == 2 and Terminated(1, "SIGHUP").exit_code == 129
    exported = [getattr(hfbatch, n) for n in hfbatch.__all__ if isinstance(getattr(hfbatch, n), type)]
    assert all(issubclass(cls, HfbatchError) for cls in exported if issubclass(cls, BaseException))


def test_http_failures_are_remote_errors_of_two_kinds() -> None:
    # `except RemoteError` catches every HTTP failure; the kinds keep their public names
    assert issubclass(errors.TransientBackendError, RemoteError) and issubclass(TerminalBackendError, RemoteError)
    assert issubclass(RemoteError, BackendError)


class _Overloaded(RemoteError):
    """A transient error that is not a TransientBackendError: retried all the same."""

    transient = True


class _Scripted(HttpClient):
    """HttpClient whose one try plays a script of outcomes (a custom error class cannot come off a
    real wire; the real server's faults are in test_backends_remote.py)."""

    def __init__(self, *outcomes: object) -> None:
        super().__init__("test", retry=RetryPolicy(attempts=3, base_wait_seconds=0.001))
        self.outcomes = list(outcomes)

    def _post(self, url: str, body: object) -> object:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_retries_decide_by_the_property_not_the_class() -> None:
    assert is_transient(errors.TransientBackendError("x")) and is_transient(_Overloaded("x"))
    assert not is_transient(RemoteError("x")) and not is_transient(TerminalBackendError("x"))
    assert not is_transient(ValueError("x"))

    client = _Scripted(_Overloaded("busy"), RetryableHTTPError("503", "503"), {"ok": True})
    assert client.post_json("http://127.0.0.1:9/x", {}) == {"ok": True} and client.stats["retries"] == 2

    client = _Scripted(_Overloaded("busy"), _Overloaded("busy"), _Overloaded("still busy"))
    with pytest.raises(errors.TransientBackendError, match="still busy .*gave up after 3 attempts"):
        client.post_json("http://127.0.0.1:9/x", {})

    client = _Scripted(RemoteError("malformed"), {"ok": True})
    with pytest.raises(RemoteError, match="malformed"):
        client.post_json("http://127.0.0.1:9/x", {})
    assert client.stats["retries"] == 0


def test_first_line_is_what_a_one_line_error_quotes() -> None:
    """The one helper every module quotes a library's message with (there were seven copies)."""
    from hfbatch.errors import first_line

    assert first_line(RuntimeError("\n  \n  Exception from src/core.cpp:123:\n  details")) == "Exception from src/core.cpp:123:"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("x" * 500)) == "x" * 297 + "..."
    assert first_line(OSError("x" * 500), 240) == "x" * 237 + "..."
    assert first_line(KeyError("k")) == "'k'"


def test_one_redaction_hides_every_kind_of_secret(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What the CLI prints, the records and the store errors go through one redact_text: hub tokens,
    API keys, store credentials (the CLI's own copy used to miss these) and user:password@ in URLs."""
    from hfbatch.errors import redact_text

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("HFBATCH_API_KEY", "sk-local-key-123")
    text = ("denied for wJalrXUtnFEMI at http://bob:pw@store.local/b with hf_abcdefghijkl "
            "and Bearer sk-local-key-123")
    shown = redact_text(text)
    assert "wJalrXUtnFEMI" not in shown and "sk-local-key-123" not in shown and "bob:pw" not in shown
    assert "hf_abcdefghijkl" not in shown and "http://***@store.local/b" in shown
