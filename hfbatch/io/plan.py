"""The file checks every job (embed, generate) makes before any model work, in one place.

Input opened and its columns checked, output and monitoring paths proved writable, stale temp
files of killed runs removed: all as InputError (exit 2), so a bad path never costs a model load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from ..errors import InputError
from ..validate import check_columns
from .readers import Reader, open_reader
from .writers import check_writable, remove_stale_temps


@dataclass
class JobFiles:
    reader: Reader
    passthrough: pa.Schema  # the input columns copied to the output


def check_output_path(input: Path, output: Path) -> None:
    """The output is a .parquet file that is not the input."""
    if input.resolve() == output.resolve():
        raise InputError(f"-o {output} is the input file; choose another output path.")
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(f"-o {output}: the output is Parquet; give it a .parquet name.")


def open_job_files(
    *,
    input: Path,
    output: Path,
    fmt: str | None,
    chunk_size: int,
    text_column: str,
    keep: Sequence[str] | None,
    added_columns: Sequence[str],
    extra_outputs: Sequence[tuple[str, Path | None]] = (),
    max_line_bytes: int | None = None,
) -> JobFiles:
    """Open the input, check its columns, and prove every output path writable."""
    check_output_path(input, output)
    columns = None if keep is None else list(dict.fromkeys([*keep, text_column]))
    reader = open_reader(input, fmt=fmt, chunk_size=chunk_size, columns=columns, text_column=text_column,
                         max_line_bytes=max_line_bytes)
    check_columns(input, reader.schema, text_column, keep, reader.all_columns, added_columns=added_columns)
    passthrough = pa.schema([reader.schema.field(n) for n in (keep if keep is not None else reader.schema.names)])
    if output.is_dir():
        raise InputError(f"-o {output} is a directory; give the output file's path, e.g. {output / 'out.parquet'}.")
    remove_stale_temps(output)
    for flag, path in extra_outputs:
        if path is not None and (path.is_dir() or (path.exists() and not os.access(path, os.W_OK))):
            raise InputError(f"{flag} {path}: is a directory or not writable; choose another path.")
    for flag, path in (("-o", output), *extra_outputs):
        try:
            if path is not None:
                check_writable(path)
        except OSError as exc:
            raise InputError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose another path.") from None
    return JobFiles(reader, passthrough)
