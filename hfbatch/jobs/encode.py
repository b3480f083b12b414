"""encode(): embeddings in memory, no files: texts or a table in, vectors or the table out.

    vectors = hfbatch.encode(["a query", "a document"])          # np.ndarray (2, 384) float32
    query = hfbatch.encode("what is the return policy?")         # np.ndarray (384,)
    df = hfbatch.encode(df, text_column="body", prompt="query: ")  # the DataFrame + embed's columns

The same embed Task on the same chunk core as `hfbatch embed`: options are EmbedOptions' fields,
resolved from the settings (environment, `.env`) as a job resolves them, so a text gets the
vector a job would write for it, from the same cache namespace (distinct texts looked up once,
misses batched by length, stored as they are made), with prompts, --split windows, --truncate-dim,
--output-precision and every backend. Nothing is written but the cache.

A backend is kept per identical options for the life of the process, so a second call (one
query) neither loads nor chooses a runtime again.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from ..backends import Backend, make_backend
from ..cache import NullCache, open_cache
from ..errors import InputError
from ..io.readers import Chunk
from ..monitoring import NullObserver, Observer
from ..options import EmbedOptions
from ..provenance import Metrics
from ..settings import Settings
from ..validate import ON_INVALID, ValidatedChunk, validate_chunk
from ..vectors import CALIBRATED
from .core import Cache, ChunkProcessor, sampler
from .embed import EmbedTask, embed_task, embed_columns

# EmbedOptions' fields that name files, or that the engines set: not options of an in-memory call
_FILE_FIELDS = frozenset({"input", "output", "keep", "format", "max_errors", "max_line_bytes", "relative_paths",
                          "metrics_file", "log_file", "command", "sidecar_file", "calibration_record"})
OPTIONS = tuple(f.name for f in fields(EmbedOptions) if f.name not in _FILE_FIELDS)
# what make_backend reads: calls with the same values share one backend (and its loaded model)
_BACKEND_FIELDS = ("backend", "model", "device", "normalize", "max_length", "precision", "runtime", "quantize",
                   "trust_remote_code", "prompt", "prompt_name", "endpoint", "fallback", "api_batch_size",
                   "api_concurrency", "api_timeout", "api_retries", "api_retry_ceiling", "remote_pooling", "tokenizer")
_KEPT_BACKENDS = 4
_backends: "OrderedDict[str, Backend]" = OrderedDict()
_backends_lock = threading.Lock()
_MEMORY = Path("<in memory>")  # the options' input and output: named in messages, never opened
_FLOATS = ("float32", "float16")


def encode(data: Any, *, model: str | None = None, text_column: str | None = None, on_invalid: str | None = None,
           backend: str | Backend = "local", observer: Observer | None = None, settings: Settings | None = None,
           **options: Any) -> Any:
    """Embed `data` in this process, writing nothing but the cache.

    `data`: a str (-> one vector, shape (dim,)); a sequence of str (list, tuple, numpy array,
    pandas / Polars Series, pyarrow Array) -> np.ndarray (n, dim) in input order, float32 (the
    dtype and width of `output_precision`: float16, int8/uint8, packed binary/ubinary); or a
    pyarrow Table, pandas or Polars DataFrame -> the same kind of table, its rows and columns
    kept (index too), plus embed's columns: `embedding`, `n_tokens`, `truncated`, `embedding_error`
    (with `split`, the window columns), as `hfbatch embed` writes them to Parquet.
    A sparse model's texts give a list of SparseVector (indices, values), a multi-vector model's a
    list of (tokens, dim) arrays (None for an invalid text under "mark"); their tables the columns
    `embed` writes.

    `model`, `backend` (a name, or a Backend object to use), `text_column` (tables; default
    "text") and `**options` are EmbedOptions' fields (prompt, prompt_name, normalize, max_length,
    truncate_dim, output_precision, split, aggregate, use_cache, cache_dir, endpoint, ...).

    Invalid texts (None, NaN, empty, whitespace only, not a string), by `on_invalid`: "fail" (the
    default for a sequence) raises InputError naming the first one's index before any model work;
    "mark" (the default for a table) keeps the row: a table gets a null embedding and the reason
    in `embedding_error`, an array a row of NaN (float precisions only); "skip" drops the row
    (tables only: an array's rows stay aligned with the input).

    Raises InputError for bad options, data or columns (before any model work), other
    HfbatchErrors (BackendError...) after; TypeError for an unknown option or kind of data.
    `observer` (optional) is told start / advance / chunk(first_row, rows, Metrics) / done /
    failed, as a job's is: `done` gets {"provenance": ..., "metrics": ...} (no file facts).
    """
    opts, given_backend = _options(model, text_column, on_invalid, backend, options, data, settings)
    column = opts.input_column
    kind, table, texts = _take(data, column)
    one = kind == "str"
    if kind in ("sequence", "str"):
        if opts.split is not None and opts.aggregate != "mean":
            raise InputError("split without aggregate='mean' gives one row per window, which an array cannot hold "
                             "in input order: pass aggregate='mean', or a table (to get parent_row, chunk_index...).")
        if opts.on_invalid == "skip":
            raise InputError("on_invalid='skip' would drop rows of the array, out of line with the input: use 'fail' "
                             "(the default) or 'mark' (NaN rows).")
        if opts.on_invalid == "mark" and opts.output_precision not in _FLOATS:
            raise InputError(f"on_invalid='mark' gives invalid texts a row of NaN, which output_precision "
                             f"{opts.output_precision!r} cannot hold: use 'fail', or a float precision.")
    else:
        clash = [c for c in embed_columns(opts) if c in _names(table)]
        if clash:
            raise InputError(f"the {_kind_name(kind)} already has column(s) {', '.join(clash)} that encode adds; "
                             "drop or rename them first.")
    chunks = _validated(texts, opts, kind)

    task = embed_task(given_backend or _shared_backend(opts), opts)
    out, parents, document = _run(task, opts, chunks, texts, observer or NullObserver())
    if kind in ("sequence", "str"):
        vectors = _values(task.backend.kind, out.column("embedding"))
        return vectors[0] if one else vectors
    return _attach(kind, table, column, out, parents, task.split_mode)


# --- options and data ------------------------------------------------------------------------


def _options(model: str | None, text_column: str | None, on_invalid: str | None, backend: str | Backend,
             options: Mapping[str, Any], data: Any, settings: Settings | None) -> tuple[EmbedOptions, Backend | None]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        named = ("model", "text_column", "on_invalid", "backend")
        raise TypeError(f"encode() got unknown option(s) {', '.join(unknown)}; options are EmbedOptions' fields: "
                        f"{', '.join(o for o in OPTIONS if o not in named)}.")
    given = None if isinstance(backend, str) else backend
    if on_invalid is None:
        on_invalid = "mark" if _is_table(data) else "fail"
    if on_invalid not in ON_INVALID:
        raise InputError(f"on_invalid {on_invalid!r} is not one of: {', '.join(ON_INVALID)}.")
    raw = EmbedOptions(input=_MEMORY, output=_MEMORY.with_suffix(".parquet"), model=model, text_column=text_column,
                       on_invalid=on_invalid, backend=backend if isinstance(backend, str) else backend.name, **options)
    return raw.resolved(settings or Settings.load()), given


def _shared_backend(opts: EmbedOptions) -> Backend:
    """One backend per identical backend options for the process (the last few kept): a second
    call neither chooses a runtime nor loads again. Building one loads nothing (backends are lazy)."""
    key = repr(tuple(getattr(opts, name) for name in _BACKEND_FIELDS))
    with _backends_lock:
        found = _backends.get(key)
        if found is None:
            found = _backends[key] = make_backend(opts)
            while len(_backends) > _KEPT_BACKENDS:
                _backends.popitem(last=False)
        _backends.move_to_end(key)
        return found


def _is_table(data: Any) -> bool:
    return _table_kind(data) is not None


def _table_kind(data: Any) -> str | None:
    if isinstance(data, pa.Table):
        return "arrow"
    pd = sys.modules.get("pandas")  # a DataFrame exists only once its library is imported: no import here
    if pd is not None and isinstance(data, pd.DataFrame):
        return "pandas"
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(data, pl.DataFrame):
        return "polars"
    return None


def _kind_name(kind: str) -> str:
    return {"arrow": "pyarrow Table", "pandas": "pandas DataFrame", "polars": "Polars DataFrame"}[kind]


def _names(table: Any) -> list[Any]:
    return list(table.column_names if isinstance(table, pa.Table) else table.columns)


def _take(data: Any, column: str) -> tuple[str, Any, list[Any]]:
    """(kind, the table or None, the texts as Python values)."""
    kind = _table_kind(data)
    if kind is not None:
        names = _names(data)
        if names.count(column) > 1:
            raise InputError(f"the {_kind_name(kind)} has {names.count(column)} columns named {column!r}; rename them.")
        if column not in names:
            shown = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "")
            raise InputError(f"the {_kind_name(kind)} has no column {column!r}; columns are: {shown or '(none)'}. "
                             "Pass text_column=.")
        if kind == "arrow":
            values = data.column(column).to_pylist()
        elif kind == "polars":
            values = data.get_column(column).to_list()
        else:
            values = data[column].tolist()
        return kind, data, values
    if isinstance(data, str):
        return "str", None, [data]
    if isinstance(data, (bytes, bytearray, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"encode() takes a str, a sequence of str, a pyarrow Table or a pandas/Polars DataFrame; "
                        f"got {type(data).__name__}.")
    if isinstance(data, (pa.Array, pa.ChunkedArray)):
        return "sequence", None, data.to_pylist()
    to_list = getattr(data, "tolist", None) or getattr(data, "to_list", None)  # numpy, pandas and Polars Series
    return "sequence", None, list(to_list() if callable(to_list) else data)


def _not_a_string(value: Any) -> str | None:
    """Why a value that is not a str cannot be embedded (None and NaN: a null text, as a file's empty cell)."""
    missing = type(value).__name__ in ("NAType", "NaTType")  # pandas' missing values
    if value is None or missing or (isinstance(value, float) and math.isnan(value)):
        return "null text"
    return f"not a string ({type(value).__name__})"


def _validated(values: list[Any], opts: EmbedOptions, kind: str) -> list[ValidatedChunk]:
    """The texts in chunks of `chunk_size` rows (as a job reads them), each row checked; under
    on_invalid='fail' the first invalid row is an InputError before any model work."""
    invalid = {i: _not_a_string(v) for i, v in enumerate(values) if not isinstance(v, str)}
    texts = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
    batch = pa.RecordBatch.from_arrays([texts], names=[opts.input_column])
    size = opts.chunk_size or 10_000
    chunks = []
    for start in range(0, len(values), size):
        inside = {i - start: r for i, r in invalid.items() if start <= i < start + size}
        chunk = Chunk(batch.slice(start, size), start, {i: r for i, r in inside.items() if r != "null text"})
        chunks.append(validate_chunk(chunk, path=_MEMORY, text_column=opts.input_column, on_invalid="mark"))
    if opts.on_invalid == "fail":
        bad = [(c.chunk.first_row + i, e) for c in chunks for i, e in enumerate(c.errors) if e]
        if bad:
            where, reason = bad[0]
            at = f"texts[{where}]" if kind in ("sequence", "str") else \
                f"row {where} (0-based) of column {opts.input_column!r}"
            more = f" ({len(bad)} invalid in all)" if len(bad) > 1 else ""
            raise InputError(f"{at}: {reason}{more}; pass non-empty strings, or on_invalid='mark' "
                             f"({'a NaN row' if kind in ('sequence', 'str') else 'a null embedding'}).")
    return chunks


# --- the work --------------------------------------------------------------------------------


def _run(task: EmbedTask, opts: EmbedOptions, chunks: list[ValidatedChunk], values: list[Any],
         observer: Observer) -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """Every chunk through the chunk core, as run_task takes a file's: the cache opened under the
    backend's fingerprint (which chooses nothing: the runtime is chosen when a vector is first
    computed), int8/uint8 calibrated. Returns the output rows (the text
    column, then the task's), the input row each came from, and a document of what it did."""
    metrics = Metrics(job=task.job)
    cache: Cache = NullCache()
    observer.start(len(values))
    try:
        texts = [t for c in chunks for t in c.texts if t is not None]
        task.watch(observer.note)  # as run_task does: measuring the runtimes or exporting shows
        if opts.use_cache:
            cache = open_cache(opts.cache_dir, task.backend.fingerprint(),  # type: ignore[arg-type]
                               size_limit_bytes=opts.cache_size_bytes or 0)
        processor = ChunkProcessor(task, cache, metrics, observer, passthrough=chunks[0].chunk.batch.schema if chunks
                                   else pa.schema([pa.field(opts.input_column, pa.string())]),
                                   on_invalid=opts.on_invalid, text_column=opts.input_column)
        if opts.output_precision in CALIBRATED:
            sample = _sampler(task, opts, cache, texts)
            task.calibrate(sample)
            metrics.add_work(sample.metrics)  # type: ignore[attr-defined]
        batches, parents = [], []
        for validated in chunks:
            metrics.chunks += 1
            metrics.rows_total += validated.chunk.batch.num_rows
            out, rows = processor.process_rows(validated)
            batches.append(out)
            parents.append(rows + validated.chunk.first_row)
            metrics.rows_written += out.num_rows
            observer.chunk(validated.chunk.first_row, validated.chunk.batch.num_rows, metrics)
        table = pa.Table.from_batches(batches, schema=processor.schema())
        document = {"provenance": {"job": "encode", "model_id": opts.model, "backend": task.backend.name,
                                   "fingerprint": task.backend.fingerprint(), **task.provenance()},
                    "metrics": metrics.as_dict(cache={"enabled": cache.directory is not None,
                                                      "directory": str(cache.directory) if cache.directory else None},
                                               api={}, model_load_seconds=task.backend.load_seconds)}
    except BaseException as exc:
        observer.failed(exc)
        raise
    finally:
        cache.close()
    observer.done(document)
    parents_all = np.concatenate(parents) if parents else np.zeros(0, dtype=np.int64)
    return table, parents_all, document


def _sampler(task: EmbedTask, opts: EmbedOptions, cache: Cache, texts: list[str]) -> Any:
    """calibrate's `sample(k, path=None)`: the first k values of these texts (or of the file of
    texts `calibration` names, read as a job reads it), through the cache."""
    from_file = sampler(task, opts, cache)
    metrics = from_file.metrics  # type: ignore[attr-defined]

    def sample(k: int, path: Path | None = None) -> list[Any]:
        if path is not None:
            return from_file(k, path)
        first = pa.RecordBatch.from_arrays([pa.array(texts[:k], pa.string())], names=[opts.input_column])
        validated = validate_chunk(Chunk(first, 0), path=_MEMORY, text_column=opts.input_column, on_invalid="mark")
        processor = ChunkProcessor(task, cache, metrics, passthrough=pa.schema([]), on_invalid="mark")
        return processor.values(validated)[:k]

    def valid_rows(n: int, path: Path | None = None) -> int:
        if path is not None:
            return from_file.valid_rows(n, path)
        return min(n, sum(1 for t in texts if isinstance(t, str) and t.strip()))

    sample.metrics = metrics  # type: ignore[attr-defined]
    sample.valid_rows = valid_rows  # type: ignore[attr-defined]
    return sample


# --- what comes back -------------------------------------------------------------------------


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    """The embedding column as an (n, width) array of its value type; a null row (an invalid
    text under on_invalid='mark') is NaN."""
    width = column.type.list_size
    dtype = column.type.value_type.to_pandas_dtype()
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(array) == 0:
        return np.zeros((0, width), dtype=dtype)
    flat = array.values.slice(array.offset * width, len(array) * width)  # null rows hold placeholder values
    vectors = flat.to_numpy(zero_copy_only=False).astype(dtype, copy=True).reshape(len(array), width)
    if array.null_count:
        vectors[array.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return vectors


def _attach(kind: str, table: Any, column: str, out: pa.Table, parents: np.ndarray, mode: str | None) -> Any:
    """The input table's rows (each output row's own: all of them in order, unless skipped or
    split into windows) with the output's columns after its own. With split into rows, the text
    column holds each window's text, as embed writes it."""
    added = out.drop_columns([column])
    same_rows = len(parents) == _height(kind, table) and bool((parents == np.arange(len(parents))).all())
    windows = out.column(column) if mode == "rows" else None
    if kind == "arrow":
        base = table if same_rows else table.take(pa.array(parents, pa.int64()))
        if windows is not None:
            at = base.column_names.index(column)
            base = base.set_column(at, pa.field(column, _cast(windows, base.schema.field(at).type).type),
                                   _cast(windows, base.schema.field(at).type))
        for field in added.schema:
            base = base.append_column(field, added.column(field.name))
        return base
    if kind == "polars":
        import polars as pl

        base = table if same_rows else table[parents]
        if windows is not None:
            base = base.with_columns(pl.Series(column, windows.to_pylist(), dtype=base.schema[column]))
        return pl.concat([base, pl.from_arrow(added)], how="horizontal")  # type: ignore[list-item]
    base = table.copy(deep=False) if same_rows else table.iloc[parents]
    if windows is not None:
        base[column] = windows.to_pylist()
    frame = added.to_pandas()  # the columns as pandas reads embed's Parquet output
    for name in frame.columns:
        base[name] = frame[name].array  # by position: the index may repeat (windows)
    return base


def _height(kind: str, table: Any) -> int:
    return table.num_rows if kind == "arrow" else len(table)


def _cast(values: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    try:
        return values.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return values


__all__ = ["encode", "OPTIONS"]


def _values(kind: str, column: Any) -> Any:
    """A sequence's result: the array of dense vectors, or a list of a sparse or multi-vector model's values."""
    if kind == "sparse":
        from ..sparse_vectors import from_arrow

        return from_arrow(column)
    if kind == "multivector":
        from ..token_vectors import from_arrow as matrices

        return matrices(column)
    return _vectors(column)
