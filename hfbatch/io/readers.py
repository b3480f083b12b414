"""Open CSV, JSONL or Parquet as one stream of Arrow record batches of `chunk_size` rows.

The format is decided here, once; the rest of hfbatch never asks which format a row came from.
Nothing reads the whole file into memory: Parquet by row batches, CSV by blocks, JSONL by lines.

Type rules (documented in the README):
- CSV columns are read as strings, exactly as written, so ids keep leading zeros and a late row
  cannot change a column's type halfway through a stream.
- JSONL is scanned once before the job (cheap next to the model) to fix one schema for every
  chunk, count rows and reject broken lines before any model work. A key whose values mix types,
  or hold objects/lists, becomes a string column of JSON text. The text column is always a
  string column; a non-string value there becomes null and is reported per row.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError

FORMATS = ("csv", "jsonl", "parquet")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_CSV_BLOCK_BYTES = 1 << 20
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass
class Chunk:
    """One slice of the input: its rows, where they start, and problems the reader already saw."""

    batch: pa.RecordBatch
    first_row: int  # 0-based index of the chunk's first row in the whole input
    # Row index inside the chunk -> why its text is unusable (e.g. a JSON number in the text column).
    invalid: dict[int, str] = field(default_factory=dict)


class Reader:
    """Common face of the three readers: schema and row count known up front, chunks on demand."""

    path: Path
    format: str
    schema: pa.Schema  # the columns being read
    all_columns: list[str]  # every column the file has, for error messages
    total_rows: int | None

    def chunks(self) -> Iterator[Chunk]:  # pragma: no cover - interface
        raise NotImplementedError


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format named by --format, else by the extension (a trailing .gz is looked through)."""
    if fmt:
        fmt = fmt.lower()
        if fmt == "ndjson":
            fmt = "jsonl"
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r} is not supported; use one of: {', '.join(FORMATS)}.")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _EXTENSIONS:
        raise InputError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
            f"pass --format {'|'.join(FORMATS)}."
        )
    return _EXTENSIONS[ext]


def open_reader(
    path: str | Path,
    *,
    fmt: str | None = None,
    chunk_size: int = 10_000,
    columns: Sequence[str] | None = None,
    text_column: str | None = None,
) -> Reader:
    """Open `path` for streaming. `columns` limits what is read (None: all).

    Raises InputError (exit 2) when the file is missing, unreadable or of an unknown format.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass a CSV, JSONL or Parquet file.")
    if chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1 (got {chunk_size}).")
    fmt = detect_format(path, fmt)
    cls = {"csv": CsvReader, "jsonl": JsonlReader, "parquet": ParquetReader}[fmt]
    return cls(path, chunk_size=chunk_size, columns=columns, text_column=text_column)


def rechunk(batches: Iterator[pa.RecordBatch], size: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Regroup batches of any size into batches of exactly `size` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending, schema=schema)
            yield table.slice(0, size).combine_chunks().to_batches()[0]
            rest = table.slice(size)
            pending = rest.combine_chunks().to_batches() if rest.num_rows else []
            held = rest.num_rows
    if held:
        table = pa.Table.from_batches(pending, schema=schema).combine_chunks()
        yield table.to_batches()[0]


def _select(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(schema.names)
    return [name for name in schema.names if name in set(columns)]


class ParquetReader(Reader):
    format = "parquet"

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None, text_column: str | None):
        self.path, self.chunk_size = path, chunk_size
        try:
            # buffered page-by-page reads: a file written as one huge row group still streams
            self._file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({_short(exc)}).") from exc
        full = self._file.schema_arrow
        dupes = sorted({n for n in full.names if full.names.count(n) > 1})
        if dupes:
            raise InputError(f"{path}: column name(s) {', '.join(dupes)} appear more than once; rename them so each is unique.")
        self._columns = _select(full, columns)
        self.all_columns = list(full.names)
        self.schema = pa.schema([full.field(name) for name in self._columns], metadata=None)
        self.total_rows = self._file.metadata.num_rows

    def chunks(self) -> Iterator[Chunk]:
        try:
            batches = self._file.iter_batches(batch_size=self.chunk_size, columns=self._columns)
            start = 0
            for batch in rechunk(batches, self.chunk_size, self.schema):
                yield Chunk(batch, start)
                start += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: Parquet data is damaged ({_short(exc)}).") from exc


class CsvReader(Reader):
    format = "csv"

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None, text_column: str | None):
        self.path, self.chunk_size = path, chunk_size
        self._delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
        names = self._header()
        self.all_columns = names
        self._columns = names if columns is None else [n for n in names if n in set(columns)]
        self.schema = pa.schema([pa.field(n, pa.string()) for n in self._columns])
        self.total_rows = self._count_rows()

    def _open(self, columns: Sequence[str] | None, types: dict[str, pa.DataType] | None) -> pacsv.CSVStreamingReader:
        stream = pa.input_stream(str(self.path), compression="detect")
        return pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter=self._delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=types or {},
                include_columns=list(columns) if columns is not None else None,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    def _header(self) -> list[str]:
        try:
            with self._open(None, None) as reader:
                names = list(reader.schema.names)
        except (pa.ArrowException, OSError, StopIteration) as exc:
            raise InputError(f"{self.path}: not a readable CSV file ({_short(exc)}).") from exc
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"{self.path}: the header repeats column(s) {', '.join(dupes)}; give each column a unique name.")
        return names

    def _count_rows(self) -> int:
        """Rows in the file, by a fast parse of the first column only (quoted newlines counted right)."""
        first = self._columns[:1] or None
        rows = 0
        for batch in self._batches(first):
            rows += batch.num_rows
        return rows

    def _batches(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        types = {n: pa.string() for n in (columns if columns is not None else self._columns)}
        rows_before = 0
        try:
            with self._open(columns, types) as reader:
                for batch in reader:
                    rows_before += batch.num_rows
                    yield batch
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{self.path}: CSV parse error after data row {rows_before} ({_short(exc)}); "
                "fix the row (quote fields that hold the delimiter or newlines) or convert the file."
            ) from exc

    def chunks(self) -> Iterator[Chunk]:
        start = 0
        for batch in rechunk(self._batches(self._columns), self.chunk_size, self.schema):
            yield Chunk(batch, start)
            start += batch.num_rows


class JsonlReader(Reader):
    format = "jsonl"

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None, text_column: str | None):
        self.path, self.chunk_size = path, chunk_size
        self._wanted = set(columns) if columns is not None else None
        self._text_column = text_column
        self._kinds: dict[str, set[str]] = {}
        self._seen: dict[str, None] = {}  # every key, in first-seen order
        self.total_rows = self._scan()
        self.all_columns = list(self._seen)
        self.schema = pa.schema([pa.field(name, self._arrow_type(name)) for name in self._kinds])
        # Columns whose values are written as JSON text (mixed or nested types).
        self._as_json = {f.name for f in self.schema if f.type == pa.string() and self._kinds[f.name] - {"str", "null"}}
        self._as_json.discard(text_column or "")

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(line number, object) for each non-blank line; None object for a blank line."""
        opener = gzip.open if self.path.suffix.lower() == ".gz" else open
        line_no = 0
        try:
            # Bytes, split on b"\n" only (never on U+2028 or a lone \r inside a JSON string),
            # decoded line by line so a bad byte is reported on its own line.
            with opener(self.path, "rb") as handle:  # type: ignore[operator]
                for line_no, raw in enumerate(handle, start=1):
                    try:
                        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        raise InputError(
                            f"{self.path}: line {line_no} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                            "re-encode the file as UTF-8."
                        ) from None
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(
                            f"{self.path}: line {line_no} is not valid JSON ({exc.msg} at column {exc.colno}); "
                            "fix or remove that line."
                        ) from None
                    if not isinstance(obj, dict):
                        raise InputError(
                            f"{self.path}: line {line_no} holds a JSON {type(obj).__name__}, not an object; "
                            "each line must be one object like {\"text\": \"...\"}."
                        )
                    yield line_no, obj
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{self.path}: cannot read after line {line_no} ({_short(exc)}).") from exc

    def _scan(self) -> int:
        rows = 0
        for _, obj in self._lines():
            rows += 1
            for key, value in obj.items():
                self._seen.setdefault(key)
                if self._wanted is None or key in self._wanted:
                    self._kinds.setdefault(key, set()).add(_kind(value))
        return rows

    def _arrow_type(self, name: str) -> pa.DataType:
        if name == self._text_column:
            return pa.string()
        kinds = self._kinds[name] - {"null"}
        if not kinds:
            return pa.string()
        if kinds == {"bool"}:
            return pa.bool_()
        if kinds == {"int"}:
            return pa.int64()
        if kinds <= {"int", "float"}:
            return pa.float64()
        return pa.string()

    def chunks(self) -> Iterator[Chunk]:
        start = 0
        rows: list[dict[str, Any]] = []
        for _, obj in self._lines():
            rows.append(obj)
            if len(rows) == self.chunk_size:
                yield self._to_chunk(rows, start)
                start += len(rows)
                rows = []
        if rows:
            yield self._to_chunk(rows, start)

    def _to_chunk(self, rows: list[dict[str, Any]], start: int) -> Chunk:
        invalid: dict[int, str] = {}
        arrays = []
        for f in self.schema:
            values = [row.get(f.name) for row in rows]
            if f.name == self._text_column:
                for i, value in enumerate(values):
                    if value is not None and not isinstance(value, str):
                        invalid[i] = f"not a string ({_kind(value)})"
                        values[i] = None
                    elif isinstance(value, str) and not _encodable(value):
                        invalid[i] = "not valid Unicode (a lone surrogate escape such as \\ud800)"
                        values[i] = None
            elif f.name in self._as_json:
                values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
            if f.type == pa.string() and f.name != self._text_column:
                # a lone surrogate cannot be stored as UTF-8: passthrough text keeps U+FFFD in its place
                values = [v if v is None or _encodable(v) else _SURROGATE_RE.sub("\ufffd", v) for v in values]
            arrays.append(pa.array(values, type=f.type))
        return Chunk(pa.RecordBatch.from_arrays(arrays, schema=self.schema), start, invalid)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else "bigint"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


__all__ = ["Chunk", "Reader", "open_reader", "detect_format", "rechunk", "FORMATS"]
