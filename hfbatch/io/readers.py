"""Open CSV, JSONL or Parquet as one stream of Arrow record batches of `chunk_size` rows.

The format is decided here, once; the rest of hfbatch never asks which format a row came from.
Nothing reads the whole file into memory: Parquet by row batches, CSV by blocks, JSONL by lines.
A JSONL line or CSV row longer than `max_line_bytes` (--max-line-bytes, default 64 MiB) is refused
once that many bytes are read, so a small gzip that inflates to one endless line cannot fill memory.

CSV delimiters: a comma, a tab for `.tsv` files and `-f tsv`, or one ASCII character named by
--delimiter, which options fold into the format value every reader call already carries
(`format_with_delimiter`: "tsv", "csv:;"), so the format is still decided here, once. A CSV read
with the default comma whose header is one column holding `;` or a tab is refused with the fix
(use --delimiter), never embedded as one column named "id;text".

Type rules (documented in the README):
- CSV columns are read as strings, exactly as written, so ids keep leading zeros and a late row
  cannot change a column's type halfway through a stream.
- JSONL is scanned once before the job (cheap next to the model) to fix one schema for every
  chunk, count rows and reject broken lines before any model work. A key whose values mix types,
  or hold objects/lists, becomes a string column of JSON text. The text column is always a
  string column; a non-string value there becomes null and is reported per row.

Pipes and standard input: every reader reads its file more than once (a counting scan, then the
rows), which a stream cannot give. `open_reader` refuses `-`, a FIFO and a character device
(`/dev/stdin` fed by a pipe) with the fix instead of reading 0 rows; a job wraps its input in
`spooled_input(path, fmt)` first, which copies such a stream once to a temp file, yields that
path for the reader (and the input hash, bytes, ...) and removes it when the job ends, on success
or failure. A stream has no extension, so the format comes from `-f` (or a FIFO's own name), and
gzip is told by its magic bytes. The `--max-line-bytes` cap applies to the spooled copy as to any
file; spooling itself holds one copy buffer in memory, whatever the line lengths.
Objects in a store (`s3://...`, a RemotePath from stores.py) are read where they are: Parquet by
ranged reads of its footer and the needed column chunks, CSV and JSONL as streams, each read
twice like a local file (the counting or schema scan, then the rows): rows in == rows out needs
the count, and the Ray engine needs it to know when a part is complete.

Why not Polars (measured 2026-11-29 with polars 2.1.0 and pyarrow 26.0.1 on a 2-core AMD EPYC,
50,000 rows of ~200-character text into 10,000-row batches): Polars' scan_csv / scan_ndjson read
them in 31 ms / 0.48 s against 52 ms / 1.7 s here, yet a warm rerun (every text a cache hit) ran
only 1.03-1.13x faster with Polars readers swapped in (~20k -> 21k rows/s): the cache stage takes
1.2-1.8 s of ~2.4 s, CSV reading ~3% of the run, and JSONL reading overlaps the cache stage in
the read-ahead thread, so no reader can make the 1.5x asked for. And Polars breaks documented
rules. CSV: no row numbers in errors; short rows padded silently; blank lines become rows; lone
`\r` line endings give 0 rows; no --max-line-bytes cap (a 400 MiB one-line gzip took 1.3 GiB).
JSONL: a repeated key keeps its first value (the README: the last); a non-string text value
becomes a string instead of a null reported on its row; mixed or nested values raise or become
Struct/List columns, not JSON text; a UTF-8 BOM is refused; "\ud800" becomes NUL; errors carry no
line numbers. So CSV stays on pyarrow's streaming reader and JSONL on this module's line reader.
(pyarrow's CSV streaming reader itself holds more memory on longer files: 75 -> 115 MiB peak for
a 9 -> 75 MB file read by pyarrow alone, the same from a local disk or a store.)
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError, first_line
from .stores import RemotePath, is_remote, location

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
# every suffix that names a data file or its compression: what a part's output name drops
DATA_SUFFIXES = frozenset({*_EXTENSIONS, ".gz"})
STDIN = "-"  # the input name that means standard input
_GZIP_MAGIC = b"\x1f\x8b"
_CSV_BLOCK_BYTES = 1 << 20  # CSV starts with this block and grows it (x8, up to the cap) for a longer row
_READ_BLOCK_BYTES = 1 << 20  # JSONL is read in blocks of this many (decompressed) bytes
DEFAULT_MAX_LINE_BYTES = 64 << 20
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
# byte order marks of encodings hfbatch does not read (UTF-32 first: its LE mark starts like UTF-16's)
_FOREIGN_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32", "FF FE 00 00"),
    (b"\x00\x00\xfe\xff", "UTF-32", "00 00 FE FF"),
    (b"\xff\xfe", "UTF-16", "FF FE"),
    (b"\xfe\xff", "UTF-16", "FE FF"),
)


@dataclass
class Chunk:
    """One slice of the input: its rows, where they start, and problems the reader already saw."""

    batch: pa.RecordBatch
    first_row: int  # 0-based index of the chunk's first row in the whole input
    # Row index inside the chunk -> why its text is unusable (e.g. a JSON number in the text column).
    invalid: dict[int, str] = field(default_factory=dict)
    # each row's 0-based index in the whole input, where the rows are not first_row, first_row + 1...
    # (a sync run keeps only a chunk's changed rows); None: they are
    row_numbers: np.ndarray | None = None


class Reader:
    """Common face of the three readers: schema and row count known up front, chunks on demand."""

    path: Path
    format: str
    schema: pa.Schema  # the columns being read
    all_columns: list[str]  # every column the file has, for error messages
    total_rows: int | None

    def chunks(self) -> Iterator[Chunk]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def local_path(self) -> Path | RemotePath:
        """Where this reader reads the bytes: the file, or a store's CSV/JSONL downloaded once
        (a second reader of the same input, e.g. the calibration sample, opens this instead of
        downloading again; it lasts as long as this reader)."""
        return self.path


_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def parse_delimiter(value: str) -> str:
    """--delimiter: one ASCII character, or tab (also `\\t`), comma, semicolon, pipe, space.
    InputError for anything pyarrow cannot split on (a quote, a line break, two characters)."""
    text = str(value)
    delimiter = _DELIMITER_NAMES.get(text.lower(), text)
    if len(delimiter) != 1 or not delimiter.isascii() or delimiter in '"\r\n':
        raise InputError(f"--delimiter {text!r} is not one ASCII character other than a quote or a line break; "
                         "give e.g. --delimiter ';', --delimiter '|' or --delimiter tab.")
    return delimiter


def _split_format(fmt: str | None) -> tuple[str | None, str | None]:
    """A format value -> (format name, CSV delimiter it names or None): 'tsv' -> ('csv', tab),
    'csv:;' -> ('csv', ';'), 'JSONL' -> ('jsonl', None)."""
    if not fmt:
        return None, None
    text = str(fmt)
    if text.lower() == "tsv":
        return "csv", "\t"
    if text[:4].lower() == "csv:" and len(text) == 5:
        return "csv", text[4]
    return text.lower(), None


def format_with_delimiter(fmt: str | None, delimiter: str | None, input: str | Path | None = None) -> str | None:
    """--format and --delimiter as the one format value every reader call takes: the format
    itself without a delimiter, else 'tsv' (tab) or 'csv:<character>'. A delimiter means CSV:
    InputError when --format, or `input`'s extension, names another format, or -f tsv another
    delimiter. Idempotent: a value made here comes back unchanged."""
    if delimiter is None:
        return fmt
    delimiter = parse_delimiter(delimiter)
    name, named = _split_format(fmt)
    if name is None and input is not None and not is_stream(input):
        try:
            name = detect_format(Path(str(input)))
        except InputError:
            name = None  # a directory, a glob, a name without an extension: CSV is what --delimiter says
    if name not in (None, "csv"):
        raise InputError(f"--delimiter is for CSV input; {fmt if fmt else input} is {name}: drop --delimiter.")
    if named is not None and named != delimiter:
        raise InputError(f"--format {fmt} and --delimiter {delimiter!r} name two delimiters; give one.")
    return "tsv" if delimiter == "\t" else f"csv:{delimiter}"


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format named by --format (or a value of format_with_delimiter), else by the extension
    (a trailing .gz is looked through)."""
    if fmt:
        fmt, _ = _split_format(fmt)
        if fmt == "ndjson":
            fmt = "jsonl"
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r} is not supported; use one of: csv, tsv, jsonl, parquet.")
        return fmt  # type: ignore[return-value]
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
    max_line_bytes: int | None = None,
) -> Reader:
    """Open `path` for streaming. `fmt`: a format name or a value of format_with_delimiter (None:
    from the extension). `columns` limits what is read (None: all); `max_line_bytes` caps one JSONL
    line or CSV row (None: DEFAULT_MAX_LINE_BYTES; Parquet has no lines).

    Raises InputError (exit 2) when the file is missing, unreadable or of an unknown format, and
    for a stream (`-`, a pipe, a terminal), which must go through `spooled_input` first.
    """
    if is_stream(path):
        raise InputError(f"{_shown(path)}: is a pipe or device, which can be read only once and hfbatch reads its "
                         "input twice (a counting scan, then the rows); open it through spooled_input(), or save it "
                         "to a file and pass that.")
    path = location(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass a CSV, JSONL or Parquet file.")
    if chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1 (got {chunk_size}).")
    limit = DEFAULT_MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    if limit < 1:
        raise InputError(f"--max-line-bytes must be at least 1 (got {limit}).")
    _, delimiter = _split_format(fmt)
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        return ParquetReader(path, chunk_size=chunk_size, columns=columns)
    if fmt == "csv":
        return CsvReader(path, chunk_size=chunk_size, columns=columns, text_column=text_column, max_line_bytes=limit,
                         delimiter=delimiter)
    return JsonlReader(path, chunk_size=chunk_size, columns=columns, text_column=text_column, max_line_bytes=limit)


def is_stream(path: str | Path) -> bool:
    """`-` (standard input), a FIFO or a character device: input that can be read only once."""
    if str(path) == STDIN:
        return True
    if is_remote(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


@contextmanager
def spooled_input(path: str | Path, fmt: str | None = None, *, directory: Path | None = None,
                  stdin: BinaryIO | None = None) -> Iterator[Path]:
    """Yield a path every reader can read: `path` itself for a file, or for a stream (`is_stream`;
    `-` reads `stdin`, default sys.stdin's bytes) a temp file in `directory` (None: TMPDIR)
    holding one copy of it, removed when the block exits however it exits. The copy is named for
    its format, with `.gz` when its first bytes are gzip's, so open_reader(copy, fmt=fmt) reads it.

    Raises InputError (exit 2): a stream without `fmt` whose name tells no format, a socket, or a
    stream that cannot be read or copied (e.g. no room in `directory`: the fix is TMPDIR).
    """
    if is_remote(path):  # an object in a store is read where it is, as often as needed
        yield location(path)  # type: ignore[misc]
        return
    if not is_stream(path):
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            raise InputError(f"{path}: is a socket, which hfbatch does not open; pipe it in instead "
                             "(... | hfbatch embed - -f jsonl).")
        yield Path(path)
        return
    shown = _shown(path)
    try:
        fmt = detect_format(Path(path), fmt)
    except InputError:
        raise InputError(f"{shown}: a stream has no file extension to tell its format; pass --format "
                         f"{'|'.join(FORMATS)} (-f).") from None
    fix = "check what feeds it"
    try:  # standard input stays open (the process owns it); a named stream is closed here
        with nullcontext(stdin or sys.stdin.buffer) if str(path) == STDIN else open(path, "rb") as source:
            head = source.read(len(_GZIP_MAGIC))
            suffix = _spool_suffix(Path(path), fmt) + (".gz" if head == _GZIP_MAGIC else "")
            copy = _copy_to_temp(source, suffix, shown, directory=directory, head=head, fix=fix)
    except OSError as exc:  # opening the stream or reading its first bytes
        raise InputError(f"{shown}: reading it failed ({exc.strerror or exc}); {fix}.") from None
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _spool_suffix(path: Path, fmt: str) -> str:
    """The copy's extension: the stream's own (a FIFO named rows.tsv keeps tab delimiting) when it
    names `fmt`, else the format's."""
    names = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return names[-1] if names and _EXTENSIONS.get(names[-1]) == fmt else f".{fmt}"


def _shown(path: str | Path) -> str:
    return "standard input (-)" if str(path) == STDIN else str(path)


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


def _select(names: list[str], columns: Sequence[str] | None) -> list[str]:
    """`names` in file order, limited to `columns`; one set lookup per name (a file may have 100k)."""
    if columns is None:
        return list(names)
    wanted = set(columns)
    return [name for name in names if name in wanted]


def _repeated(names: Iterable[str]) -> list[str]:
    """Names that appear more than once, counted in one pass (list.count per name is quadratic)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


class ParquetReader(Reader):
    format = "parquet"

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None):
        self.path, self.chunk_size = path, chunk_size
        try:
            # buffered page-by-page reads: a file written as one huge row group still streams
            self._file = pq.ParquetFile(path.open(ranged=True) if isinstance(path, RemotePath) else path,
                                        buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({_short(exc)}).") from exc
        full = self._file.schema_arrow
        names = full.names  # a new list on every access: taken once
        dupes = _repeated(names)
        if dupes:
            raise InputError(f"{path}: column name(s) {shown_names(dupes)} appear more than once; rename them so each is unique.")
        self._columns = _select(names, columns)
        self.all_columns = names
        wanted = set(self._columns)
        self.schema = pa.schema([f for f in full if f.name in wanted], metadata=None)
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

    @property
    def local_path(self) -> Path:
        return self._bytes

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None, text_column: str | None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, delimiter: str | None = None):
        self.path, self.chunk_size, self._limit = path, chunk_size, max_line_bytes
        # pyarrow refuses a row longer than its block; the block grows only for a file that needs it
        self._block = min(_CSV_BLOCK_BYTES, max_line_bytes)
        self._header_ends = self._head_full = False  # the header ends in / fills the first block (_header_hint)
        # --delimiter (or -f tsv), else by the extension; only a comma nobody asked for is second-guessed
        self._delimiter = delimiter or ("\t" if ".tsv" in [s.lower() for s in path.suffixes] else ",")
        self._sniff = delimiter is None and self._delimiter == ","
        self._bytes = _spooled(self, path)  # a store's object: downloaded once, read from here by every pass
        _check_encoding(self._bytes, shown=path)
        names = self._header()
        self.all_columns = names
        self._columns = _select(names, columns)
        self._every_column = len(self._columns) == len(names)  # then no include list is passed to pyarrow
        self.schema = pa.schema([pa.field(n, pa.string()) for n in self._columns])
        self.total_rows = self._count_rows()

    def _open(self, columns: Sequence[str] | None, types: dict[str, pa.DataType] | None) -> pacsv.CSVStreamingReader:
        stream = input_stream(self._bytes)
        return pacsv.open_csv(
            stream,
            # one thread: as fast for narrow files, and 3x faster to open a file of 100k columns
            read_options=pacsv.ReadOptions(block_size=self._block, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=self._delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=types or {},
                include_columns=list(columns) if columns is not None else None,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    def _grow(self) -> bool:
        """A bigger block (x8, up to the cap) after a row longer than the block; False at the cap."""
        if self._block >= self._limit:
            return False
        self._block = min(self._limit, self._block * 8)
        return True

    def _too_long(self, where: str) -> InputError:
        return InputError(
            f"{self.path}: {where} is longer than --max-line-bytes ({_size(self._limit)}), or opens a quote that is "
            f"never closed; raise --max-line-bytes (e.g. --max-line-bytes {_size(self._limit * 4, unit=True)}) "
            "if the row is real, or fix its quoting."
        )

    def _header_hint(self) -> dict[str, pa.DataType]:
        """The header as Python's csv reads it from the first MiB, typed string: pyarrow then skips
        inferring a type per column (seconds for 100k columns). Only a hint: pyarrow's own parse of
        the header decides the names. Also notes whether the header ends within that MiB."""
        size = min(self._block, _CSV_BLOCK_BYTES)  # 100k names fit; a bomb's line is not copied thrice
        try:
            with input_stream(self._bytes) as stream:
                raw = stream.read(size)
            self._head_full = len(raw) == size
            head = raw.decode("utf-8-sig", errors="replace")
            text = io.StringIO(head, newline="")
            names = next(csv.reader(text, delimiter=self._delimiter), [])
        except (pa.ArrowException, OSError, csv.Error):  # csv.Error: a field past csv's own limit
            return {}
        self._header_ends = head[: text.tell()].endswith(("\n", "\r"))
        if self._sniff and len(names) == 1:
            self._refuse_other_delimiter(names[0])
        return {name: pa.string() for name in names}

    def _refuse_other_delimiter(self, header: str) -> None:
        """A header read with the default comma as one column that holds semicolons or tabs is a
        file with another delimiter: refused with the flag that reads it (--delimiter , keeps it
        as one column)."""
        counts = {d: header.count(d) for d in (";", "\t")}
        found = max(counts, key=lambda d: counts[d])
        if not counts[found]:
            return
        shown = header if len(header) <= 60 else header[:57] + "..."
        fix = "use --delimiter tab (or -f tsv)" if found == "\t" else "use --delimiter ';'"
        raise InputError(f"{self.path}: the header {shown!r} has no comma but {'tabs' if found == chr(9) else 'semicolons'}; "
                         f"{fix} to read its columns (or --delimiter , if it really is one column).")

    def _header(self) -> list[str]:
        hint = self._header_hint()
        while True:
            try:
                with self._open(None, hint) as reader:
                    names = reader.schema.names
                break
            except (pa.ArrowException, OSError, StopIteration) as exc:
                # pyarrow's words for a row past the block, and for a header past it
                header_past_block = self._head_full and not self._header_ends and "infer number of columns" in str(exc)
                too_long = _straddles(exc) or header_past_block
                if too_long and self._grow():
                    continue
                if too_long:
                    raise self._too_long("data row 1" if self._header_ends else "the header row") from None
                raise InputError(f"{self.path}: not a readable CSV file ({_short(exc)}).") from exc
        dupes = _repeated(names)
        if dupes:
            raise InputError(f"{self.path}: the header repeats column(s) {shown_names(dupes)}; give each column a unique name.")
        return names

    def _count_rows(self) -> int:
        """Rows in the file, by a fast parse of the first column only (quoted newlines counted right).
        This first pass also finds the block size the file's longest row needs."""
        first = self._columns[:1] or None
        rows = 0
        for batch in self._batches(first):
            rows += batch.num_rows
        return rows

    def _batches(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        """Record batches of `columns` (None: all). A row longer than the block restarts the read
        with a bigger block, skipping the rows already given."""
        types = {n: pa.string() for n in (columns if columns is not None else self._columns)}
        given = 0  # rows already yielded, over every restart
        while True:
            seen = 0
            try:
                with self._open(columns, types) as reader:
                    for batch in reader:
                        if seen + batch.num_rows > given:
                            yield batch.slice(max(0, given - seen))
                            given = seen + batch.num_rows
                        seen += batch.num_rows
                return
            except (pa.ArrowException, OSError) as exc:
                if _straddles(exc) and self._grow():
                    continue
                if _straddles(exc):
                    raise self._too_long(f"data row {seen + 1}") from None
                raise InputError(
                    f"{self.path}: CSV parse error after data row {seen} ({_short(exc)}); "
                    "fix the row (quote fields that hold the delimiter or newlines) or convert the file."
                ) from exc

    def chunks(self) -> Iterator[Chunk]:
        start = 0
        batches = self._batches(None if self._every_column else self._columns)
        for batch in rechunk(batches, self.chunk_size, self.schema):
            yield Chunk(batch, start)
            start += batch.num_rows


class JsonlReader(Reader):
    format = "jsonl"

    @property
    def local_path(self) -> Path:
        return self._bytes

    def __init__(self, path: Path, *, chunk_size: int, columns: Sequence[str] | None, text_column: str | None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.path, self.chunk_size, self._limit = path, chunk_size, max_line_bytes
        self._bytes = _spooled(self, path)  # a store's object: downloaded once, read from here by both passes
        _check_encoding(self._bytes, shown=path)
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
        """(line number, object) for each non-blank line. A key given twice in one object keeps
        its last value (Python's json, like JavaScript's JSON.parse)."""
        line_no = 0
        try:
            # Bytes, split on b"\n" only (never on U+2028 or a lone \r inside a JSON string),
            # decoded line by line so a bad byte is reported on its own line.
            with _open_lines(self._bytes) as handle:
                for line_no, raw in _capped_lines(handle, self._limit, self.path):
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


def _straddles(exc: BaseException) -> bool:
    """pyarrow's CSV error for a row longer than its block ("straddling object straddles two block boundaries")."""
    return isinstance(exc, pa.ArrowInvalid) and "straddl" in str(exc)


def _capped_lines(stream: IO[bytes], limit: int, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the b"\\n") for each line of `stream`, read a block at a time.
    A line is refused once `limit` of its bytes are read, so memory stays near `limit` plus a
    block even when a small gzip inflates to one endless line."""
    partial: list[bytes] = []  # the pieces of a line that spans blocks
    held = line_no = 0
    while block := stream.read(_READ_BLOCK_BYTES):
        *complete, rest = block.split(b"\n")
        for piece in complete:
            line_no += 1
            if held + len(piece) > limit:
                raise _line_too_long(path, line_no, limit)
            if partial:
                piece, partial, held = b"".join([*partial, piece]), [], 0
            yield line_no, piece
        if rest:
            partial.append(rest)
            held += len(rest)
            if held > limit:
                raise _line_too_long(path, line_no + 1, limit)
    if partial:  # a last line with no newline
        yield line_no + 1, b"".join(partial)


def _line_too_long(path: Path, line_no: int, limit: int) -> InputError:
    return InputError(
        f"{path}: line {line_no} is longer than --max-line-bytes ({_size(limit)}); raise --max-line-bytes "
        f"(e.g. --max-line-bytes {_size(limit * 4, unit=True)}) if the line is real."
    )


def _check_encoding(path: Path, shown: Path | RemotePath | None = None) -> None:
    """Refuse UTF-16/UTF-32 text (Excel's "Unicode text") up front with the fix, instead of a
    parse error full of NUL bytes later. `shown`: the name the user gave (a store's object read
    from its local copy)."""
    named = shown if shown is not None else path
    try:
        with input_stream(path) as stream:
            head = stream.read(4)
    except (pa.ArrowException, OSError):
        return  # the reader itself reports an unreadable or damaged file
    for bom, encoding, mark in _FOREIGN_BOMS:
        if head.startswith(bom):
            raise InputError(f"{named}: is {encoding} encoded (byte order mark {mark}); hfbatch reads UTF-8: "
                             f"re-save it as UTF-8 (e.g. iconv -f {encoding} -t UTF-8 {named.name} > utf8-{named.name}).")
    if len(head) >= 2 and (head[0] == 0) != (head[1] == 0):  # "i\0d\0" or "\0i\0d": ASCII as UTF-16
        encoding = "UTF-16LE" if head[1] == 0 else "UTF-16BE"
        raise InputError(f"{named}: looks {encoding} encoded (a NUL byte between the first characters, no byte order "
                         f"mark); hfbatch reads UTF-8: re-save it as UTF-8 (e.g. iconv -f {encoding} -t UTF-8 "
                         f"{named.name} > utf8-{named.name}).")


def local_copy(path: Path | RemotePath) -> Path:
    """`path` itself for a local file; for a store's object, one download of it to a temp file
    (TMPDIR, named for its format, `.gz` kept) that every pass then reads: a CSV or JSONL is read
    twice (a counting scan, then the rows) and its head more often, and each would be a download.
    The reader that asked removes it when it is let go of (`_spooled`), or the process at exit;
    a killed process leaves it as .hfbatch-spool-* in TMPDIR."""
    if not isinstance(path, RemotePath):
        return path
    with path.open() as source:
        return _copy_to_temp(source, "".join(path.suffixes[-2:]) or ".data", path)


def _copy_to_temp(source: BinaryIO, suffix: str, shown: Any, *, directory: Path | None = None, head: bytes = b"",
                  fix: str | None = None) -> Path:
    """`head` then the rest of `source` in a new .hfbatch-spool-*`suffix` file in `directory`
    (None: TMPDIR). Interrupted or failed (also Ctrl-C or SIGTERM), no copy is left behind. A full
    disk is an InputError naming `shown` and the fix; so is any other OSError when `fix` says what
    to do about it (else it is raised as it came: a store that fails mid-download is not a usage error)."""
    copy: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(prefix=".hfbatch-spool-", suffix=suffix, dir=directory, delete=False) as sink:
            copy = Path(sink.name)
            sink.write(head)
            shutil.copyfileobj(source, sink, _READ_BLOCK_BYTES)
    except BaseException as exc:
        if copy is not None:
            copy.unlink(missing_ok=True)
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (isinstance(exc, OSError) and fix is not None):
            raise InputError(f"{shown}: copying it to a temp file in {directory or tempfile.gettempdir()} failed "
                             f"({exc.strerror or exc}); "
                             f"{'make room there, or point TMPDIR at a disk that has it' if full else fix}.") from None
        raise
    return copy


def _spooled(reader: Reader, path: Path | RemotePath) -> Path:
    """local_copy(path), removed when `reader` is garbage collected or at exit, whichever comes
    first (a many-part job over a bucket holds one part's copy at a time)."""
    copy = local_copy(path)
    if copy is not path:
        weakref.finalize(reader, copy.unlink, missing_ok=True)
    return copy


def input_stream(path: Path | RemotePath) -> pa.NativeFile:
    """The file's bytes as a stream, gunzipped when its name ends in .gz (a store's object read as
    it streams in, never whole)."""
    if not isinstance(path, RemotePath):
        return pa.input_stream(str(path), compression="detect")
    raw = pa.PythonFile(path.open(), mode="r")
    return pa.CompressedInputStream(raw, "gzip") if path.suffix.lower() == ".gz" else raw


def _open_lines(path: Path | RemotePath) -> IO[bytes]:
    """A binary handle for line-by-line reading, gunzipped when the name ends in .gz."""
    gz = path.suffix.lower() == ".gz"
    if isinstance(path, RemotePath):
        raw = path.open()
        return gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[return-value]
    return gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[return-value]


def shown_names(names: Sequence[str], most: int = 20) -> str:
    """Column names for an error message: the first `most`, then how many more (a file may have 100k)."""
    shown = ", ".join(names[:most]) if names else "(none)"
    return shown if len(names) <= most else f"{shown}, ... ({len(names) - most:,} more)"


def _size(n: int, *, unit: bool = False) -> str:
    """64 MiB as "64 MiB" (or "64MiB", a value --max-line-bytes takes), odd sizes in bytes."""
    for factor, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n % factor == 0:
            return f"{n // factor}{'' if unit else ' '}{name}"
    return str(n) if unit else f"{n:,} bytes"


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
    """A library's message as one short line; control bytes (a NUL from a mis-encoded file) escaped."""
    line = first_line(exc)
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


__all__ = ["Chunk", "Reader", "open_reader", "detect_format", "format_with_delimiter", "parse_delimiter", "rechunk", "shown_names", "FORMATS",
           "DEFAULT_MAX_LINE_BYTES", "DATA_SUFFIXES", "STDIN", "is_stream", "spooled_input"]
