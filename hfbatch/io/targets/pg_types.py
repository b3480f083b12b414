"""Arrow columns as Postgres + pgvector columns, and back: the types a table is made with, the
values a binary COPY sends, and the rows a read returns as Arrow batches."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ...errors import InputError
from . import encode_record

HALFVEC_SINCE = (0, 7, 0)  # pgvector's halfvec


def pg_type(field: pa.Field, pgvector: tuple[int, ...]) -> str:
    """The Postgres type of one output column (the vector's by --output-precision)."""
    t = field.type
    if pa.types.is_fixed_size_list(t):
        value, size = t.value_type, t.list_size
        if value == pa.float32():
            return f"vector({size})"
        if value == pa.float16() and pgvector >= HALFVEC_SINCE:
            return f"halfvec({size})"
        if value == pa.float16():
            raise InputError(f"--output-precision float16 needs pgvector's halfvec (pgvector 0.7.0 or later); this "
                             f"server has pgvector {'.'.join(map(str, pgvector))}: use float32, or upgrade pgvector.")
        raise InputError(f"{field.name}: {value} vectors (--output-precision int8, uint8, binary, ubinary) have no "
                         "pgvector type hfbatch writes; a Postgres target holds float32 (vector) or float16 "
                         "(halfvec, pgvector 0.7.0 or later).")
    # (the names Postgres's format_type gives back, so an existing table's shape compares equal)
    simple = [(pa.types.is_boolean, "boolean"), (pa.types.is_int8, "smallint"), (pa.types.is_int16, "smallint"),
              (pa.types.is_int32, "integer"), (pa.types.is_int64, "bigint"), (pa.types.is_uint8, "smallint"),
              (pa.types.is_uint16, "integer"), (pa.types.is_uint32, "bigint"), (pa.types.is_uint64, "numeric"),
              (pa.types.is_float16, "real"), (pa.types.is_float32, "real"), (pa.types.is_float64, "double precision"),
              (pa.types.is_string, "text"), (pa.types.is_large_string, "text"), (pa.types.is_binary, "bytea"),
              (pa.types.is_large_binary, "bytea"), (pa.types.is_date, "date"), (pa.types.is_decimal, "numeric")]
    for test, name in simple:
        if test(t):
            return name
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp without time zone"
    return "jsonb"  # lists, structs, maps: as JSON


def family(sql_type: str) -> str:
    """What a column holds, for comparing a table made on an earlier day with this run: integer
    widths are one family (Postgres casts between them), as are float widths; a vector's type is
    itself (its dimensions)."""
    bare = re.sub(r"^[^(]*\.", "", sql_type)  # (pgvector outside the search path: public.vector(384))
    for group, members in (("integer", ("smallint", "integer", "bigint", "numeric")), ("float", ("real", "double precision"))):
        if bare in members:
            return group
    return bare


def vector_value(values: np.ndarray) -> Any:
    from pgvector import Vector

    return Vector(np.asarray(values, dtype=np.float32))


def jsonb_value(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(json.loads(encode_record(value)) if isinstance(value, Mapping) else value)


def copy_rows(batch: pa.RecordBatch, key: Sequence[str] = ()) -> Iterator[tuple[Any, ...]]:
    """A batch's rows as COPY values: vectors as pgvector objects (NULL for a row without one),
    nested values as JSON; a key column's null (an invalid row's chunk_index, with --split) as 0,
    since a primary key holds no NULL."""
    from pgvector import HalfVector, Vector

    columns: list[list[Any]] = []
    for name, column in zip(batch.schema.names, batch.columns):
        t = column.type
        if pa.types.is_fixed_size_list(t):
            size = t.list_size
            # (the child values of every slot, nulls' included: flatten() would leave those out)
            flat = column.values.slice(column.offset * size, len(column) * size).to_numpy(zero_copy_only=False)
            flat = flat.reshape(len(column), size)
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            make = Vector if t.value_type == pa.float32() else HalfVector
            columns.append([make(v) if ok else None for v, ok in zip(flat, valid)])
        elif pa.types.is_nested(t):
            columns.append([None if v is None else jsonb_value(v) for v in column.to_pylist()])
        elif name in key[1:] and column.null_count:
            columns.append(column.fill_null(0).to_pylist())
        else:
            columns.append(column.to_pylist())
    return zip(*columns)


def arrow_batch(rows: Sequence[tuple[Any, ...]], columns: Sequence[tuple[str, str]]) -> pa.RecordBatch:
    arrays = []
    for k, (name, sql_type) in enumerate(columns):
        values = [r[k] for r in rows]
        kind = family(sql_type)
        if kind.startswith(("vector(", "halfvec(")):
            size = int(kind.split("(")[1].rstrip(")"))
            dense = [None if v is None else np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, np.float32)
                     for v in values]
            flat = np.concatenate([v if v is not None else np.zeros(size, np.float32) for v in dense]) if dense else \
                np.zeros(0, np.float32)
            mask = pa.array([v is None for v in dense], pa.bool_())
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size, mask=mask))
        elif sql_type == "jsonb":
            arrays.append(pa.array([None if v is None else json.dumps(v) for v in values], pa.string()))
        else:
            arrays.append(pa.array(values))
    return pa.RecordBatch.from_arrays(arrays, names=[n for n, _ in columns])
