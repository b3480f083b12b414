"""A Delta Lake table as a sync target (deltalake, delta-rs).

Every write is one JSON commit in `_delta_log`, put only if that version is still free, so a
reader during a run sees the version before it, a run killed at any moment leaves the old version
(its unfinished data files are unreferenced; `VACUUM` removes them), and of two runs on one
table the second's commit conflicts and is retried or refused by delta-rs's conflict checker. One
run is one commit: a MERGE on the key upserts the changed rows and, in the same commit, deletes
the ids that are gone (`when_not_matched_by_source_delete` with the ids named).

Delta has no half floats and no unsigned bytes: float16 vectors are stored as float (the same
values, exactly), uint8/ubinary as short; `stored_as` in the record says so, and readers (search)
cast back. Vectors are `array<...>` (Delta has no fixed-size list). The vector record is the
table's description (Delta keeps its configuration for `delta.*` properties).

Delta rewrites every data file a MERGE touches (copy on write: delta-rs writes no deletion
vectors), so a day's changes spread over the table cost a rewrite of the files that hold them.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa

from ...errors import InputError, OutputError, first_line
from . import HASH_COLUMN, FileTable, ForeignTable, RECORD_KEY, TargetSpec, decode_record, encode_record, in_list, storage_options, tree_bytes

# value types Delta cannot hold -> what they are stored as (exactly)
STORED_AS = {pa.float16(): pa.float32(), pa.uint8(): pa.int16()}


def _deltalake() -> Any:
    try:
        import deltalake
    except ImportError as exc:  # pragma: no cover - a dependency of hfbatch
        raise InputError(f"Delta targets need deltalake: pip install deltalake ({exc}).") from None
    return deltalake


def quoted(column: str) -> str:
    """A column name in a delta-rs (DataFusion) predicate: in double quotes, quotes doubled."""
    return '"' + column.replace('"', '""') + '"'


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with types Delta holds: fixed-size lists as lists, STORED_AS for their values."""
    fields = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            value = f.type.value_type
            f = f.with_type(pa.list_(STORED_AS.get(value, value)))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """Arrow's view types (delta-rs answers strings as string_view) as the plain ones, which every
    pyarrow kernel (joins, take) and reader takes."""
    plain = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}
    return pa.schema([f.with_type(plain.get(f.type, f.type)) for f in schema], metadata=schema.metadata)


class DeltaTarget(FileTable):
    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._table: Any = None

    def exists(self) -> bool:
        return (self.spec.location / "_delta_log").exists()

    def _open(self) -> Any:
        if self._table is None:
            if not self.exists():
                return None
            try:
                self._table = _deltalake().DeltaTable(self.spec.uri, storage_options=storage_options(self.spec))
            except Exception as exc:  # noqa: BLE001 - delta-rs raises its own TableNotFoundError, DeltaError...
                raise InputError(f"{self.spec.given}: not a Delta table hfbatch can read "
                                 f"({first_line(str(exc))[:200]}); give another -o, or remove it.") from None
        return self._table

    def record(self) -> dict[str, Any] | None:
        if not self.exists():
            where = self.spec.location
            if where.exists() and where.is_file():
                raise InputError(f"-o {self.spec.given}: a file is there, not a Delta table (a folder); give another -o.")
            return None
        table = self._open()
        description = table.metadata().description
        raw = None
        if description:
            try:
                raw = json.loads(description).get(RECORD_KEY)
            except (ValueError, AttributeError):
                raw = None
        if raw is None:
            raise ForeignTable(f"-o {self.spec.given}: a Delta table that hfbatch did not write (no hfbatch record in "
                             "its description); give another -o, or --rebuild to replace it.")
        return decode_record(raw if isinstance(raw, str) else json.dumps(raw), self.spec.given)

    def version(self) -> int | None:
        table = self._open()
        return int(table.version()) if table is not None else None

    def _query(self, sql: str) -> pa.RecordBatchReader:
        """`sql` over the table as `t`, run by delta-rs's own engine. (Not through
        to_pyarrow_dataset: its scanner threads can abort the interpreter at exit, delta-rs #2184.)"""
        reader = pa.RecordBatchReader.from_stream(_deltalake().QueryBuilder().register("t", self._open()).execute(sql))
        schema = plain_schema(reader.schema)
        if schema == reader.schema:
            return reader
        return pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in reader))

    def count_rows(self) -> int:
        if self._open() is None:
            return 0
        return int(self._query("SELECT count(*) AS n FROM t").read_all().column(0)[0].as_py())

    def schema(self) -> pa.Schema | None:
        table = self._open()
        return plain_schema(pa.schema(table.schema().to_arrow())) if table is not None else None

    def state(self, id_column: str) -> pa.Table:
        names = self.schema().names
        if id_column not in names or HASH_COLUMN not in names:
            missing = id_column if id_column not in names else HASH_COLUMN
            raise InputError(f"{self.spec.given}: has no column {missing!r}, so it was not synced by --id-column "
                             f"{id_column}; use --rebuild to replace it, or another -o.")
        return self._query(f"SELECT {quoted(id_column)}, {quoted(HASH_COLUMN)} FROM t").read_all()

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        if self._open() is None:
            return iter(())
        picked = ", ".join(quoted(c) for c in columns) if columns is not None else "*"
        return iter(self._query(f"SELECT {picked} FROM t"))

    def size_bytes(self) -> int:
        return tree_bytes(self.spec.location)

    def close(self) -> None:
        self._table = None

    def build_index(self, kind: str | None = None) -> dict[str, Any]:
        return {"type": None, "error": "a Delta table has no vector index; hfbatch search reads it exactly"}

    def commit(self, rows: pa.RecordBatchReader, *, key: Sequence[str], id_column: str, stale: Sequence[Any],
               record: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        deltalake = _deltalake()
        before = self.size_bytes()
        schema = delta_schema(rows.schema)
        data = pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in rows))
        description = json.dumps({RECORD_KEY: encode_record(record)})
        try:
            table = self._open() if self.exists() else None
            if replace or table is None:
                deltalake.write_deltalake(self.spec.uri, data, mode="overwrite" if table is not None else "error",
                                          schema_mode="overwrite" if table is not None else None,
                                          description=description, storage_options=storage_options(self.spec))
            else:
                predicate = " AND ".join(f"t.{quoted(k)} = s.{quoted(k)}" for k in key)
                merger = (table.merge(data, predicate, source_alias="s", target_alias="t")
                          .when_matched_update_all().when_not_matched_insert_all())
                if len(stale):
                    merger = merger.when_not_matched_by_source_delete(predicate=in_list(f"t.{quoted(id_column)}", stale))
                merger.execute()
                self._table = table  # (now at this merge's version, not a later run's)
                return {"version": int(table.version()), "bytes_added": max(0, self.size_bytes() - before)}
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - delta-rs raises DeltaError, CommitFailedError, OSError...
            raise OutputError(f"{self.spec.given}: the Delta commit failed ({first_line(str(exc))[:300]}); the "
                              "table is at the version it had before this run.") from exc
        self._table = None
        return {"version": self.version(), "bytes_added": max(0, self.size_bytes() - before)}
