"""Where a sync run's rows go (jobs/sync.py decides which rows): staged locally, then
committed as a table's one new version (TableSink), or written with the unchanged rows carried
from the last output as a whole Parquet file (ParquetSyncSink); --changes beside either
(ChangeSink), published before the target so a run killed between them is rerun whole."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import __version__
from ..errors import OutputError
from ..io.sidecars import sidecar_path
from ..io.stores import RemotePath
from ..io.targets import Target, TargetSpec, vector_record
from ..io.writers import ParquetSink, publish_table, remove_stale_temps, temp_path_for, write_json_atomic

if TYPE_CHECKING:
    from .sync import SyncPlan

log = logging.getLogger(__name__)

OP_COLUMN = "op"  # --changes: "upsert" or "delete"


class ChangeSink:
    """--changes FILE.parquet: the upserted rows (op "upsert"), then the gone ids (op "delete")."""

    def __init__(self, path: Any, schema: pa.Schema, plan: SyncPlan):
        self.schema = pa.schema([*schema, pa.field(OP_COLUMN, pa.string())])
        self.plan = plan
        self.sink = ParquetSink(path, self.schema)
        self.path = path

    def write(self, batch: pa.RecordBatch) -> None:
        self.sink.write(batch.append_column(OP_COLUMN, pa.array(["upsert"] * batch.num_rows, pa.string())))

    def commit(self, document: Mapping[str, Any], dropped: pa.Array | None = None) -> None:
        """Publish the file: the upserts written so far, then the gone ids and `dropped` (changed
        rows that are no longer written: skipped as invalid) as deletes."""
        gone = self.plan.gone if dropped is None or not len(dropped) else \
            pa.concat_arrays([self.plan.gone, dropped.cast(self.plan.gone.type)])
        if len(gone):
            columns = [gone.cast(f.type) if f.name == self.plan.id_column else
                       pa.array(["delete"] * len(gone), pa.string()) if f.name == OP_COLUMN else pa.nulls(len(gone), f.type)
                       for f in self.schema]
            self.sink.write(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.sink.commit(document, sidecar=sidecar_path(self.path))

    def abort(self) -> None:
        self.sink.abort()


class Staged:
    """Rows staged in a local Parquet file until a sink's commit (a killed run's: removed by the next)."""

    def __init__(self, spec: TargetSpec, schema: pa.Schema):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.location.name)[:80]  # (a table's own name, made a file name)
        base = Path(tempfile.gettempdir()) / f"hfbatch-stage-{name}.parquet"
        remove_stale_temps(base)
        self.path, self.schema, self.given, self.rows = temp_path_for(base), schema, spec.given, 0
        try:
            self._writer = pq.ParquetWriter(str(self.path), schema, compression="zstd")
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot stage rows for {spec.given} in {self.path} ({exc}); check TMPDIR.") from exc

    def write(self, batch: pa.RecordBatch) -> None:
        try:
            self._writer.write_batch(batch)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"staging rows for {self.given} in {self.path} failed ({exc}); nothing was written "
                              "there.") from exc
        self.rows += batch.num_rows

    def close(self) -> pq.ParquetFile:
        self._writer.close()
        return pq.ParquetFile(str(self.path))

    def remove(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already closed or broken: the file goes either way
            pass
        self.path.unlink(missing_ok=True)


class StagedSink:
    """What both sinks of a sync share: the run's rows staged locally (and, with --changes, also
    written there) until the commit; `abort` removes both."""

    def __init__(self, schema: pa.Schema, plan: SyncPlan, changes: ChangeSink | None):
        self.schema, self.plan, self.changes = schema, plan, changes
        self.staged = Staged(plan.spec, schema)

    @property
    def rows(self) -> int:
        return self.staged.rows

    def write(self, batch: pa.RecordBatch) -> None:
        self.staged.write(batch)
        if self.changes is not None:
            self.changes.write(batch)

    def abort(self) -> None:
        self.staged.remove()
        if self.changes is not None:
            self.changes.abort()


class ParquetSyncSink(StagedSink):
    """A Parquet output synced by id: its changed rows computed (staged), its unchanged rows
    carried from the output the last run left at -o (neither embedded nor looked up again), and
    the whole output written in input order, atomically, by ParquetSink. The carried rows are
    read into memory at the commit (the columns of the unchanged rows)."""

    def __init__(self, output: Any, schema: pa.Schema, plan: SyncPlan, changes: ChangeSink | None):
        super().__init__(schema, plan, changes)
        self.output = output

    def commit(self, document: dict[str, Any], sidecar: Any = None) -> None:
        plan = self.plan
        try:
            computed = self.staged.close().read()
            parts = [computed]
            unchanged = plan.ids.filter(pa.array(~plan.changed))
            if len(unchanged):
                where = plan.spec.location
                source: Any = where.open(ranged=True) if isinstance(where, RemotePath) else str(where)
                previous = pq.read_table(source, filters=pc.is_in(pc.field(plan.id_column), value_set=unchanged))
                carried = pc.count_distinct(previous.column(plan.id_column)).as_py()
                if carried != len(unchanged) or ("chunk_index" not in plan.key and previous.num_rows != len(unchanged)):
                    raise OutputError(f"{plan.spec.given} changed while this run read it ({carried:,} of the "
                                      f"{len(unchanged):,} unchanged ids found at the end); nothing was written: "
                                      "run one job per output, and run this one again.")
                parts.append(previous.select(self.schema.names).cast(self.schema))
            whole = pa.concat_tables(parts)
            # input order: each row's input row by its id (a join of the ids alone: Arrow joins carry
            # no fixed-size lists), then with --split the window's index
            order = pa.table({plan.id_column: plan.ids, "_row": pa.array(np.arange(len(plan.ids)), pa.int64())})
            at = pa.table({plan.id_column: whole.column(plan.id_column),
                           "_at": pa.array(np.arange(whole.num_rows), pa.int64()),
                           **({"chunk_index": whole.column("chunk_index")} if "chunk_index" in plan.key else {})})
            keys = [("_row", "ascending")] + ([("chunk_index", "ascending")] if "chunk_index" in plan.key else [])
            placed = at.join(order, plan.id_column, join_type="inner").sort_by(keys)
            whole = whole.take(placed.column("_at"))
            if "parent_row" in whole.schema.names:  # --split: a carried window's row is its row in this input
                at_column = whole.schema.get_field_index("parent_row")
                whole = whole.set_column(at_column, whole.schema.field(at_column), placed.column("_row"))
            record_sync(document, plan, None)
            document["provenance"]["output"]["rows"] = whole.num_rows
            document["metrics"]["rows_written"] = whole.num_rows
            if self.changes is not None:
                self.changes.commit(document)
            publish_table(self.output, whole, document, sidecar, schema=self.schema, batch_rows=8192)
        finally:
            self.staged.remove()


class TableSink(StagedSink):
    """A table target's rows, staged in a local Parquet file and committed as one version
    (`index`: then its vector index built, --index). With `commit_every` (--commit-every, a
    Postgres target) every that many staged rows are committed as a part of the run, in their own
    transaction (PostgresTarget.commit_part), and the final commit adds the rest, the deletes and
    the new version."""

    def __init__(self, target: Target, schema: pa.Schema, plan: SyncPlan, changes: ChangeSink | None, *,
                 index: bool = False, index_type: str | None = None, commit_every: int | None = None):
        super().__init__(schema, plan, changes)
        self.target, self.index, self.index_type = target, index, index_type
        self.commit_every = commit_every
        self.job = target.new_job() if commit_every else None  # type: ignore[attr-defined]
        self.part_ids: list[pa.Array] = []  # the ids the committed parts wrote

    @property
    def rows(self) -> int:
        return self.staged.rows + (self.job["rows_committed"] if self.job else 0)

    def write(self, batch: pa.RecordBatch) -> None:
        super().write(batch)
        if self.commit_every and self.staged.rows >= self.commit_every:
            self._commit_part()

    def _commit_part(self) -> None:
        plan = self.plan
        source = self.staged.close()
        self.part_ids.append(source.read(columns=[plan.id_column]).column(plan.id_column).combine_chunks())
        reader = pa.RecordBatchReader.from_batches(self.schema, source.iter_batches(batch_size=8192))
        self.target.commit_part(reader, key=plan.key, replace=plan.replace, job=self.job)  # type: ignore[attr-defined]
        log.info("%s: part %d committed (%d rows so far)", plan.spec.given, self.job["parts"], self.job["rows_committed"])
        self.staged.remove()
        self.staged = Staged(plan.spec, self.schema)

    def commit(self, document: dict[str, Any], sidecar: Any = None) -> None:
        plan = self.plan
        try:
            source = self.staged.close()
            # a changed row not written (--on-invalid skip: its text is no longer valid) must not
            # keep its old vector in the table: its id goes, with the deletes
            last = source.read(columns=[plan.id_column]).column(plan.id_column).combine_chunks() \
                if self.staged.rows else None
            pieces = [*self.part_ids, *([last] if last is not None else [])]
            written = pa.concat_arrays([p.cast(plan.changed_ids.type) for p in pieces]) if pieces else \
                pa.array([], plan.changed_ids.type)
            dropped = pc.filter(plan.changed_ids, pc.invert(pc.is_in(plan.changed_ids,
                                                                      value_set=written.cast(plan.changed_ids.type))))
            stale = [*plan.stale, *dropped.to_pylist()]
            if len(dropped):
                plan.counts["deleted"] += len(dropped)
                plan.counts["dropped_invalid"] = len(dropped)
            if self.changes is not None:
                self.changes.commit(document, dropped)
            provenance = document["provenance"]
            record = vector_record(provenance, id_column=plan.id_column,
                                   stored_as="delta" if plan.spec.kind == "delta" else None)
            record["key"] = plan.key
            if not plan.replace and not self.rows and not stale and not self.target.pending:
                result = {"version": plan.version_before, "bytes_added": 0}  # nothing changed: no new version
            else:
                reader = pa.RecordBatchReader.from_batches(self.schema, source.iter_batches(batch_size=8192))
                result = self.target.commit(reader, key=plan.key, id_column=plan.id_column, stale=stale,
                                            record=record, replace=plan.replace,
                                            **({"job": self.job} if self.job is not None else {}))
                if self.job is not None:
                    result["parts"] = self.job["parts"] + 1
            record_sync(document, plan, result)
            if self.index:  # (Lance and Postgres: the options refuse it for Delta)
                built = self.target.build_index(self.index_type)
                document["provenance"]["output"]["table"]["index"] = built
                if "error" in built:
                    log.warning("%s: the rows are in (version %s), but the --index could not be built: %s",
                                plan.spec.given, result.get("version"), built["error"])
            if sidecar is not None:
                write_json_atomic(sidecar, document)
        finally:
            self.staged.remove()


def record_sync(document: dict[str, Any], plan: SyncPlan, result: Mapping[str, Any] | None) -> None:
    """What the run did to its target, in the document (sidecar, --json): counts in metrics.sync,
    the target and its versions in provenance.output.table."""
    metrics = document.setdefault("metrics", {})
    metrics["rows_total"] = len(plan.ids)  # every input row was read (the unchanged ones were not worked on)
    metrics["sync"] = {**plan.counts, "bytes_added": (result or {}).get("bytes_added")}
    output = document.setdefault("provenance", {}).setdefault("output", {})
    output["table"] = {"kind": plan.spec.kind, "id_column": plan.id_column, "key": plan.key,
                       "version_before": plan.version_before, "version": (result or {}).get("version"),
                       "replaced": plan.replace, "hfbatch_version": __version__}
    if (result or {}).get("parts"):
        output["table"]["transactions"] = result["parts"]  # type: ignore[index]  # --commit-every
