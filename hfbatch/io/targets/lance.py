"""A Lance dataset as a sync target (pylance).

Lance is versioned: every write is a new manifest, committed by one atomic step, so a reader
during a run sees the version before it, and a run killed at any moment leaves the old version
(its unfinished data files are unreferenced, and go with Lance's own cleanup). One run is one
commit: `merge_insert` on the key upserts the changed rows and, in the same commit, deletes the
ids that are gone (`when_not_matched_by_source_delete` with the ids named). Lance's conflict
detection orders two runs on one dataset: the second retries on the first's version, or fails.

The vector record is the schema's metadata (RECORD_KEY), written with the version that creates
or rebuilds the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa

from ...errors import InputError, OutputError, first_line
from . import HASH_COLUMN, FileTable, ForeignTable, RECORD_KEY, TargetSpec, decode_record, encode_record, in_list, storage_options, tree_bytes


def _lance() -> Any:
    try:
        import lance
    except ImportError as exc:  # pragma: no cover - a dependency of hfbatch
        raise InputError(f"-o *.lance needs pylance: pip install pylance ({exc}).") from None
    return lance


def quoted(column: str) -> str:
    """A column name in a Lance (DataFusion) filter: in backticks, backticks doubled."""
    return "`" + column.replace("`", "``") + "`"


class LanceTarget(FileTable):
    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._dataset: Any = None

    # --- reading ------------------------------------------------------------------------------

    def _open(self) -> Any:
        if self._dataset is None:
            lance = _lance()
            try:
                self._dataset = lance.dataset(self.spec.uri, storage_options=storage_options(self.spec))
            except (ValueError, OSError, RuntimeError) as exc:
                if not self.exists():
                    return None
                raise InputError(f"{self.spec.given}: not a Lance dataset hfbatch can read "
                                 f"({first_line(str(exc))[:200]}); give another -o, or remove it.") from None
        return self._dataset

    def exists(self) -> bool:
        return self.spec.location.exists()

    def record(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        where = self.spec.location
        if isinstance(where, Path) and where.is_file():
            raise InputError(f"-o {self.spec.given}: a file is there, not a Lance dataset (a folder); give another -o.")
        if isinstance(where, Path) and where.is_dir() and not any(where.iterdir()):
            return None  # an empty folder: made by the user for the dataset
        dataset = self._open()
        if dataset is None:
            return None
        raw = (dataset.schema.metadata or {}).get(RECORD_KEY.encode())
        record = decode_record(raw, self.spec.given)
        if record is None:
            raise ForeignTable(f"-o {self.spec.given}: a Lance dataset that hfbatch did not write (no hfbatch record in "
                             "its schema metadata); give another -o, or --rebuild to replace it.")
        return record

    def version(self) -> int | None:
        dataset = self._open_quietly()  # (an empty folder made for the dataset: none yet)
        return int(dataset.version) if dataset is not None else None

    def count_rows(self, where: str | None = None) -> int:
        """Rows in the dataset (those matching the Lance filter `where`)."""
        dataset = self._open_quietly()
        return int(dataset.count_rows(filter=where)) if dataset is not None else 0

    def schema(self) -> pa.Schema | None:
        dataset = self._open() if self.exists() else None
        return dataset.schema if dataset is not None else None

    def state(self, id_column: str) -> pa.Table:
        dataset = self._open()
        names = dataset.schema.names
        if id_column not in names or HASH_COLUMN not in names:
            missing = id_column if id_column not in names else HASH_COLUMN
            raise InputError(f"{self.spec.given}: has no column {missing!r}, so it was not synced by --id-column "
                             f"{id_column}; use --rebuild to replace it, or another -o.")
        return dataset.to_table(columns=[id_column, HASH_COLUMN])

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        dataset = self._open()
        if dataset is None:
            return iter(())
        return dataset.to_batches(columns=list(columns) if columns is not None else None)

    def nearest(self, vector: Any, k: int, columns: Sequence[str], metric: str = "cosine",
                probes: int = 256) -> pa.Table:
        """Lance's own search, with `_distance`: flat (exact) without an index; with --index's
        IVF_FLAT probing up to `probes` partitions (all that hfbatch makes: exact too)."""
        return self._open().to_table(columns=list(columns), nearest={"column": "embedding", "q": vector, "k": k,
                                                                     "metric": metric, "nprobes": probes})

    def size_bytes(self) -> int:
        return tree_bytes(self.spec.location)

    # --- writing ------------------------------------------------------------------------------

    def commit(self, rows: pa.RecordBatchReader, *, key: Sequence[str], id_column: str, stale: Sequence[Any],
               record: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        lance = _lance()
        before = self.size_bytes()
        schema = rows.schema.with_metadata({RECORD_KEY: encode_record(record)})
        try:
            if replace or self._open_quietly() is None:
                exists = self._open_quietly() is not None
                dataset = lance.write_dataset(_with_schema(rows, schema), self.spec.uri, schema=schema,
                                              mode="overwrite" if exists else "create",
                                              storage_options=storage_options(self.spec))
            else:
                dataset = self._open()
                builder = dataset.merge_insert(list(key)).when_matched_update_all().when_not_matched_insert_all()
                if len(stale):  # (without an expression Lance would delete every row not upserted)
                    builder = builder.when_not_matched_by_source_delete(in_list(quoted(id_column), stale))
                builder.execute(_with_schema(rows, dataset.schema))  # (`dataset` is now at its own commit's
                # version: not the latest, which another run may have made since)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - Lance raises OSError, ValueError, RuntimeError...
            raise OutputError(f"{self.spec.given}: the Lance commit failed ({first_line(str(exc))[:300]}); the "
                              "dataset is at the version it had before this run.") from exc
        self._dataset = dataset
        return {"version": int(dataset.version), "bytes_added": max(0, self.size_bytes() - before)}

    def close(self) -> None:
        self._dataset = None

    def build_index(self, kind: str | None = None) -> dict[str, Any]:
        """An IVF_FLAT index on `embedding` (cosine) for Lance's own search, replacing an earlier
        one: its own version, after the data's. Flat within each partition, so a search that
        probes every partition is exact."""
        dataset = self._open()
        rows = dataset.count_rows()
        partitions = max(1, min(256, int(rows ** 0.5) // 4 or 1))
        try:
            dataset.create_index("embedding", "IVF_FLAT", metric="cosine", num_partitions=partitions, replace=True)
        except Exception as exc:  # noqa: BLE001 - Lance's errors are many (too few rows, a vector type it cannot index)
            return {"type": "IVF_FLAT", "error": first_line(str(exc))[:300]}
        self._dataset = None
        return {"type": "IVF_FLAT", "metric": "cosine", "partitions": partitions, "version": self.version()}

    def _open_quietly(self) -> Any:
        try:
            return self._open() if self.exists() else None
        except InputError:
            return None


def _with_schema(rows: pa.RecordBatchReader, schema: pa.Schema) -> pa.RecordBatchReader:
    """`rows` as a reader of `schema` (the table's own metadata and nullability)."""
    def cast() -> Iterator[pa.RecordBatch]:
        for batch in rows:
            yield pa.RecordBatch.from_arrays(batch.columns, schema=schema) if batch.schema != schema else batch

    return pa.RecordBatchReader.from_batches(schema, cast())
