"""Row checks and tokenizer-exact token counts, before any model work.

A row whose text is unusable (null, empty, whitespace only, not a string) is marked with a
reason; `--on-invalid` decides whether it stays (mark, the default: null embedding plus the
reason in `embedding_error`), is dropped (skip) or stops the job (fail). Token counts come from
the model's own tokenizer; a text longer than max_length is truncated by the model and flagged.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from .errors import InputError
from .io.readers import Chunk

ON_INVALID = ("mark", "skip", "fail")


@dataclass
class ValidatedChunk:
    """A chunk plus, per row, the text to embed (None if invalid) and what validation found."""

    chunk: Chunk
    texts: list[str | None]
    errors: list[str | None]
    n_tokens: list[int | None]
    truncated: list[bool | None]

    @property
    def valid_rows(self) -> list[int]:
        return [i for i, t in enumerate(self.texts) if t is not None]


def validate_chunk(
    chunk: Chunk,
    *,
    path: Path,
    text_column: str,
    on_invalid: str,
    max_length: int | None = None,
    token_counts: Callable[[Sequence[str]], list[int]] | None = None,
) -> ValidatedChunk:
    """Mark invalid rows and, given a tokenizer, count tokens of the rest and flag truncation.

    The pipeline passes no tokenizer: it counts only texts the cache does not know. Raises
    InputError under --on-invalid fail.
    """
    column = chunk.batch.column(text_column)
    if pa.types.is_dictionary(column.type) and _stringlike(column.type.value_type):
        column = column.cast(pa.string())  # categorical text (pandas / Polars) is still text
    elif pa.types.is_string_view(column.type):
        column = column.cast(pa.string())
    is_string = _stringlike(column.type)
    try:
        values = column.to_pylist() if is_string else [None] * len(column)
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: column {text_column!r} holds bytes that are not valid UTF-8 in rows "
            f"{chunk.first_row + 1}-{chunk.first_row + len(column)}; re-encode the file as UTF-8."
        ) from None
    texts: list[str | None] = []
    errors: list[str | None] = []
    for i, value in enumerate(values):
        reason = chunk.invalid.get(i)
        if reason is None:
            if not is_string and column[i].is_valid:
                reason = f"not a string ({column.type})"
            elif value is None:
                reason = "null text"
            elif value == "":
                reason = "empty text"
            elif not value.strip():
                reason = "whitespace-only text"
        if reason is not None and on_invalid == "fail":
            raise InputError(
                f"{path}: row {chunk.first_row + i + 1}, column {text_column!r}: {reason}; "
                "fix the row, or pass --on-invalid mark (keep it, marked) or skip (drop it)."
            )
        texts.append(None if reason else value)
        errors.append(reason)
    valid = [i for i, t in enumerate(texts) if t is not None]
    n_tokens: list[int | None] = [None] * len(texts)
    truncated: list[bool | None] = [None] * len(texts)
    if token_counts is not None and max_length is not None and valid:
        for i, count in zip(valid, token_counts([texts[i] for i in valid])):  # type: ignore[misc]
            n_tokens[i] = min(count, max_length)
            truncated[i] = count > max_length
    return ValidatedChunk(chunk, texts, errors, n_tokens, truncated)


def _stringlike(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def pair_key(query: str, document: str) -> str:
    """A (query, document) pair as one text: what the chunk core dedupes, and the cache keys (with
    the scorer's fingerprint). JSON, so no choice of texts can make two pairs one key."""
    return json.dumps([query, document], ensure_ascii=False)


def parse_pair_key(key: str) -> tuple[str, str]:
    query, document = json.loads(key)
    return query, document


def validate_pairs(chunk: Chunk, *, path: Path, query_column: str, text_column: str, on_invalid: str) -> ValidatedChunk:
    """Both sides of each row checked as validate_chunk checks a text (the reason names the side's
    column); a valid row's text is its pair key (pair_key)."""
    for column, flag in ((query_column, "--query-column"), (text_column, "--text-column")):
        if column not in chunk.batch.schema.names:
            raise InputError(f"{path} has no column {column!r} ({flag}); columns are: "
                             f"{', '.join(chunk.batch.schema.names[:20])}.")
    queries = validate_chunk(chunk, path=path, text_column=query_column, on_invalid=on_invalid)
    documents = validate_chunk(chunk, path=path, text_column=text_column, on_invalid=on_invalid)
    texts: list[str | None] = []
    errors: list[str | None] = []
    for q, d, q_error, d_error in zip(queries.texts, documents.texts, queries.errors, documents.errors):
        reasons = [f"{name}: {why}" for name, why in ((query_column, q_error), (text_column, d_error)) if why]
        texts.append(pair_key(q, d) if q is not None and d is not None else None)
        errors.append("; ".join(reasons) or None)
    none: list[Any] = [None] * len(texts)
    return ValidatedChunk(chunk, texts, errors, list(none), list(none))
