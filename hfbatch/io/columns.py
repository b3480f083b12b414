"""The columns a job reads and adds: checked against the input's schema before any work.

A check on names only, taken from the schema the reader reads (and every column of the file, for
the message): io asks nothing of validate, which imports io's readers, so the two make no import
circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa

from ..errors import InputError
from .readers import shown_names

EMBED_COLUMNS = ("embedding", "n_tokens", "truncated", "embedding_error")  # what an embed output adds


def check_columns(path: Path, schema: pa.Schema, text_column: str, keep: Sequence[str] | None,
                  all_columns: Sequence[str] | None = None, added_columns: Sequence[str] = EMBED_COLUMNS) -> None:
    """Exit-2 errors for columns that do not exist or clash with the output columns.

    `schema` holds the columns being read; `all_columns`, every column of the file (shown in errors).
    """
    names = schema.names
    present = set(names)  # membership in a set: a file may have 100k columns, --keep as many
    everything = list(all_columns) if all_columns is not None else names
    if text_column not in present:
        raise InputError(f"{path} has no column {text_column!r}; columns are: {shown_names(everything)}. Use --text-column.")
    missing = [c for c in keep or [] if c not in present]
    if missing:
        raise InputError(f"{path}: --keep names column(s) {shown_names(missing)} that do not exist; "
                         f"columns are: {shown_names(everything)}.")
    added = set(added_columns)
    clash = [c for c in (keep if keep is not None else names) if c in added]
    if clash:
        raise InputError(
            f"{path} already has column(s) {', '.join(clash)} that hfbatch writes; "
            "use --keep to choose the columns to pass through (e.g. leave those out)."
        )


__all__ = ["EMBED_COLUMNS", "check_columns"]
