"""Sync by --id-column: what changed since the target's last run, and only that embedded and written.

Before any model work, `plan_sync` reads the input's id, text and kept columns once and gives
each row a content hash (`row_hashes`: the text, the kept columns and the options that shape
the vector), refuses null or duplicated ids (exit 2, naming rows), reads the target's (id, hash)
pairs and joins the two: an id that is new or whose hash differs is to be embedded and upserted;
an id the input no longer has is gone (deleted only with --delete-missing, and only when that is
at most --max-delete-fraction of the target's ids: a truncated or empty input never wipes an
index). Changes are found by comparing hashes, never by embedding.

The job then runs on the chunk core as any other (`SyncRun` is its hooks: `select` keeps a
chunk's changed rows and adds their hash; `open_sink` gives where they go), so every reader,
backend, cache and option works the same. Where the rows go is jobs/sync_sinks.py's: a table
target (Lance, Delta) gets them staged in a local Parquet file and committed, with the deletes,
as one version at the end; a Parquet target is rewritten whole, its unchanged rows carried from
the last run's file.

`--changes FILE.parquet` holds the upserted rows and, with op "delete", the ids gone: removing
from yesterday's output every row whose id is in it, then adding its upserts, gives today's. It
is published before the target's commit, so a run killed between the two leaves a change file
that the rerun writes again (applying one twice is harmless).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..io.readers import Chunk, open_reader
from ..io.stores import RemotePath
from ..io.targets import (HASH_COLUMN, ForeignTable, Target, TargetSpec, open_target, parse_target, space_difference,
                          vector_record)
from ..io.writers import read_metadata
from ..validate import ValidatedChunk

log = logging.getLogger(__name__)

SHOWN_ROWS = 5  # rows named in an error message


def space_of(task: Any, opts: Any) -> dict[str, Any]:
    """The vector space of this run, known before any model work (the fields of SPACE_FIELDS;
    `dim` None where the backend cannot tell it without a model call)."""
    backend = task.backend
    hint = task.out_dim_hint()
    space = {"fingerprint": backend.fingerprint(), "model_id": backend.model_id, "prompt": backend.prompt,
             "dim": hint, "truncate_dim": opts.truncate_dim, "precision": opts.output_precision,
             "normalize": opts.normalize,
             "split": {"tokens": opts.split_tokens, "overlap": opts.window_overlap, "aggregate": opts.aggregate}
             if opts.split else None,
             "id_column": opts.id_column}
    # another kind names itself (a dense space keeps the keys it always had: its rows' hashes start
    # from them); as embed_provenance records it, so a day-2 run finds its own space
    if backend.kind == "sparse":
        space.update(normalize=False, kind="sparse", top_k=opts.sparse_top_k, vocab=opts.sparse_vocab)
    elif backend.kind != "dense":
        space.update(kind=backend.kind)
    return space


def hash_prefix(space: Mapping[str, Any]) -> bytes:
    """What every row's hash starts from: the options that shape its vector (not its dim, which a
    remote model tells only once it has answered, and which the fingerprint fixes anyway)."""
    shaping = {k: v for k, v in space.items() if k not in ("dim", "id_column")}
    return json.dumps(shaping, sort_keys=True, default=str).encode()


def row_hashes(batch: pa.RecordBatch | pa.Table, columns: Sequence[str], prefix: bytes) -> pa.Array:
    """Each row's content hash (32 hex digits) over `columns` (the text first) and `prefix`."""
    values = [batch.column(name).to_pylist() for name in columns]
    out = []
    for row in zip(*values):
        h = hashlib.blake2b(prefix, digest_size=16)
        h.update(repr(row).encode("utf-8", "surrogatepass"))
        out.append(h.hexdigest())
    return pa.array(out, pa.string())


def id_array(column: pa.Array | pa.ChunkedArray, name: str, where: Any, first_row: int = 0) -> pa.Array:
    """The id column as int64 or string; anything else (floats above all: NaN is no key, 1.0 and
    1 are one id or two depending on who reads them) is refused."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_integer(kind):
        top = pc.max(column).as_py() if pa.types.is_uint64(kind) and len(column) else None
        if top is not None and top > 2**63 - 1:
            raise InputError(f"{where}: --id-column {name!r} holds integers above 2^63-1; give ids as text.")
        return column.cast(pa.int64())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return column.cast(pa.string())
    detail = ""
    if pa.types.is_floating(kind):
        nan = pc.indices_nonzero(pc.fill_null(pc.is_nan(column), False)).to_pylist() if len(column) else []
        detail = f" (NaN in row {first_row + nan[0] + 1})" if nan else ""
        detail += "; floats are no exact keys"
    raise InputError(f"{where}: --id-column {name!r} is {kind}{detail}; ids must be integers or text "
                     "(cast the column, e.g. to int64, before the run).")


KIND_NAMES = {"lance": "Lance", "delta": "Delta", "postgres": "Postgres"}


@dataclass
class SyncPlan:
    """What one sync run will do, decided before any model work."""

    spec: TargetSpec
    id_column: str
    key: list[str]  # the merge key: the id, with --split (one row per window) and its chunk_index
    ids: pa.Array  # per input row
    changed: np.ndarray  # per input row: embed and upsert it
    hashes: pa.Array  # per input row
    changed_ids: pa.Array
    gone: pa.Array  # ids the target has and the input does not
    stale: list[Any]  # ids whose rows not upserted are deleted by the commit
    counts: dict[str, int]  # inserted, updated, unchanged, deleted, kept_missing
    target_ids: int
    version_before: int | None
    replace: bool  # create or rebuild: the target becomes exactly this run's rows
    recorded: dict[str, Any] | None

    def changed_rows(self, batch: pa.RecordBatch, first: int) -> tuple[pa.RecordBatch, np.ndarray]:
        """Of the input rows `batch` (whose first is input row `first`): the changed ones with
        their hash column, and their indices in `batch`."""
        n = batch.num_rows
        rows = np.flatnonzero(self.changed[first:first + n])
        batch = batch.append_column(HASH_COLUMN, self.hashes.slice(first, n))
        return (batch if len(rows) == n else batch.take(pa.array(rows, pa.int64()))), rows


def plan_sync(opts: Any, task: Any, source: Any, passthrough: pa.Schema, target: Target | None) -> SyncPlan:
    """Read the input's ids and hashes, check them, and diff them with the target's (see module)."""
    spec = target.spec if target is not None else parse_target(opts.output, kind=opts.target)
    id_column = opts.id_column
    space = space_of(task, opts)
    try:
        recorded = target.record() if target is not None else None
    except ForeignTable:
        if not opts.rebuild:
            raise
        recorded = None  # replaced whole by this run
    replace_all = bool(target is not None and (recorded is None or opts.rebuild))
    if target is not None and recorded is not None and not opts.rebuild:
        differ = space_difference(recorded, space | {"dim": space["dim"] or recorded.get("dim")})
        if differ:
            raise InputError(f"-o {spec.given} holds vectors of another space than this run's ({'; '.join(differ)}); "
                             "one table keeps one vector space: run with the options it records, write to another "
                             "target, or give --rebuild to replace it (one new version).")
        if recorded.get("ranges") is not None:  # int8/uint8: the table's ranges, whatever else was given
            if opts.calibration is not None:
                raise InputError(f"--calibration {opts.calibration}: -o {spec.given} keeps its own int8/uint8 ranges, "
                                 "which every row it holds was quantised with; drop --calibration (or --rebuild).")
            task.ranges = np.asarray(recorded["ranges"], dtype=np.float32)
            task.calibration = {"source": f"target {spec.given}"}
    if target is not None and recorded is not None and not opts.rebuild:
        check_columns(spec, target.schema(), [*passthrough.names, HASH_COLUMN, *task.added_columns],
                      others_kept=spec.kind == "postgres")
    hashed = [opts.input_column] + [n for n in passthrough.names if n not in (id_column, opts.input_column)]
    reader = open_reader(source, fmt=opts.format, chunk_size=opts.chunk_size or 10_000,
                         columns=list(dict.fromkeys([id_column, *hashed])), text_column=opts.input_column,
                         max_line_bytes=opts.max_line_bytes)
    if id_column not in reader.schema.names:
        raise InputError(f"{opts.input}: no column {id_column!r} for --id-column; columns are: "
                         f"{', '.join(reader.all_columns[:20])}.")
    prefix = hash_prefix(space)
    ids: list[pa.Array] = []
    hashes: list[pa.Array] = []
    for chunk in reader.chunks():
        batch = chunk.batch
        if target is not None:  # a value the target cannot store: refused before any work
            target.check_rows(batch, [n for n in passthrough.names if n in batch.schema.names], opts.input,
                              chunk.first_row)
        ids.append(id_array(batch.column(id_column), id_column, opts.input, chunk.first_row))
        hashes.append(row_hashes(batch, [n for n in hashed if n in batch.schema.names], prefix))
    id_type = ids[0].type if ids else pa.int64()
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], id_type)
    all_hashes = pa.concat_arrays(hashes) if hashes else pa.array([], pa.string())
    check_ids(all_ids, id_column, opts.input)

    mode = task.split_mode
    key = [id_column, "chunk_index"] if mode == "rows" else [id_column]
    rewrite_all = replace_all  # every row embedded and written (a new or rebuilt table, a Parquet output of another space)
    if target is not None and not replace_all:
        state = target.state(id_column)
        version_before = target.version()
    elif target is None:
        state, carried = previous_parquet_state(spec, id_column, space,
                                                [*passthrough.names, HASH_COLUMN, *task.added_columns])
        rewrite_all = state is not None and carried is None
        if carried is not None and carried.get("ranges") is not None:  # its rows keep their quantisation
            if opts.calibration is not None:
                raise InputError(f"--calibration {opts.calibration}: {spec.given} holds int8/uint8 rows quantised with "
                                 "its own ranges, carried into this run's output; drop --calibration.")
            task.ranges = np.asarray(carried["ranges"], dtype=np.float32)
            task.calibration = {"source": f"the previous output {spec.given}"}
        version_before = None
    else:  # a rebuild: what the table holds now says what goes (the counts, --changes, the guard)
        try:
            state = target.state(id_column) if target.exists() and target.count_rows() else None
        except (InputError, OSError, ValueError):
            state = None  # not keyed by this id column: nothing to compare with
        version_before = target.version()
    if state is None:
        state = pa.table({id_column: pa.array([], id_type), HASH_COLUMN: pa.array([], pa.string())})
    try:
        state = _typed_state(state, id_column, id_type, spec.given)
    except InputError:
        if not replace_all:
            raise
        state = pa.table({id_column: pa.array([], id_type), HASH_COLUMN: pa.array([], pa.string())})  # replaced anyway
    if mode == "rows" or replace_all:  # one (id, hash) per document (window rows; a rebuilt table's repeats)
        state = state.group_by(id_column).aggregate([(HASH_COLUMN, "min")]).rename_columns([id_column, HASH_COLUMN])
    elif target is not None and state.num_rows and not replace_all:
        check_target_ids(state.column(id_column).combine_chunks(), id_column, spec.given)
    rows = pa.table({id_column: all_ids, "_new": all_hashes, "_row": pa.array(np.arange(len(all_ids)), pa.int64())})
    joined = rows.join(state, id_column, join_type="left outer").sort_by("_row")
    old = joined.column(HASH_COLUMN)
    new_id = pc.is_null(old)
    differs = pc.fill_null(pc.not_equal(old, joined.column("_new")), True)
    changed = np.asarray(differs.to_numpy(zero_copy_only=False), dtype=bool)
    if rewrite_all:
        changed[:] = True
    inserted = int(pc.sum(new_id).as_py() or 0)
    gone = state.join(rows.select([id_column]), id_column, join_type="left anti").column(id_column).combine_chunks()
    target_ids = state.num_rows
    # a Parquet output is rewritten whole and a rebuilt table replaced: what is gone is gone
    deleting = bool(opts.delete_missing) or target is None or replace_all
    if (opts.delete_missing or replace_all) and target is not None and target_ids \
            and len(gone) > opts.max_delete_fraction * target_ids:
        raise InputError(
            f"{opts.input} would delete {len(gone):,} of the {target_ids:,} ids in {spec.given} "
            f"({len(gone) / target_ids:.0%}), more than --max-delete-fraction {opts.max_delete_fraction:g}; nothing was "
            "changed. Check that the input is whole; if the deletes are meant, raise --max-delete-fraction.")
    changed_ids = all_ids.filter(pa.array(changed))
    stale = (gone.to_pylist() if deleting and target is not None else [])
    if mode == "rows" and target is not None and not replace_all:  # an updated document's old windows
        stale += [i for i in changed_ids.to_pylist() if i is not None]
    counts = {"inserted": inserted, "updated": int(changed.sum()) - inserted, "unchanged": int((~changed).sum()),
              "deleted": len(gone) if deleting else 0, "kept_missing": 0 if deleting else len(gone)}
    if counts["kept_missing"]:
        log.warning("%s: %d ids are in %s but no longer in the input; kept (--delete-missing deletes them).",
                    opts.input, counts["kept_missing"], spec.given)
    return SyncPlan(spec=spec, id_column=id_column, key=key, ids=all_ids, changed=changed, hashes=all_hashes,
                    changed_ids=changed_ids, gone=gone if deleting else pa.array([], id_type), stale=stale,
                    counts=counts, target_ids=target_ids, version_before=version_before, replace=replace_all,
                    recorded=recorded)


def check_columns(spec: TargetSpec, schema: pa.Schema | None, writes: Sequence[str], *,
                  others_kept: bool = False) -> None:
    """A run writes the columns the table has (else its commit would fail after all the work);
    `others_kept` (Postgres): columns of the table's own that the run does not write (a user's
    tsvector, a created_at with a default) are left as they are."""
    have = list(schema.names) if schema is not None else []
    if schema is None or sorted(have) == sorted(writes):
        return
    missing, extra = [n for n in have if n not in writes], [n for n in writes if n not in have]
    if others_kept:
        missing = []
        if not extra:
            return
    said = "; ".join(part for part in (f"the table has {', '.join(map(repr, missing))} and this run does not"
                                       if missing else "",
                                       f"this run writes {', '.join(map(repr, extra))}, which the table has not"
                                       if extra else "") if part)
    raise InputError(f"-o {spec.given}: {said}; keep the columns the table was made with (--keep), or give --rebuild "
                     "to replace it.")


def check_target_ids(ids: pa.Array, name: str, where: str) -> None:
    """A table hfbatch synced holds each id once; one that holds an id twice was written to by
    something else, and a merge by id cannot say which row to keep: refused, the table untouched."""
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]
        raise InputError(f"{where} holds id {first['values'].as_py()!r} {first['counts'].as_py()} times (written to "
                         f"by another tool?){f' and {len(repeated) - 1:,} more ids more than once' if len(repeated) > 1 else ''}; "
                         f"a sync by --id-column {name} keeps each id once: remove the extra rows, or --rebuild it.")


def check_ids(ids: pa.Array, name: str, where: Any) -> None:
    """No null and no repeated id: exit 2 naming the rows (1-based, as an editor numbers them)."""
    nulls = pc.indices_nonzero(pc.is_null(ids)).to_pylist() if ids.null_count else []
    if nulls:
        shown = ", ".join(str(i + 1) for i in nulls[:SHOWN_ROWS])
        raise InputError(f"{where}: --id-column {name!r} is null in row{'s' if len(nulls) > 1 else ''} {shown}"
                         f"{f' and {len(nulls) - SHOWN_ROWS:,} more' if len(nulls) > SHOWN_ROWS else ''}; every row "
                         "needs an id: fill them, or drop those rows.")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]["values"].as_py()
        rows = pc.indices_nonzero(pc.equal(ids, pa.scalar(first, ids.type))).to_pylist()
        raise InputError(f"{where}: --id-column {name!r} repeats id {first!r} (rows "
                         f"{', '.join(str(r + 1) for r in rows[:SHOWN_ROWS])})"
                         f"{f' and {len(repeated) - 1:,} more ids repeat' if len(repeated) > 1 else ''}; ids must be "
                         "unique: remove the duplicates.")


def _typed_state(state: pa.Table, id_column: str, id_type: pa.DataType, where: str) -> pa.Table:
    """The target's (id, hash) with the id typed as this input's ids; a target keyed by another
    kind of id (text against integers) is refused."""
    column = state.column(id_column)
    have = column.type
    if pa.types.is_integer(have) == pa.types.is_integer(id_type):
        state = state.set_column(0, id_column, column.cast(id_type)) if have != id_type else state
        return state.select([id_column, HASH_COLUMN])
    raise InputError(f"{where} keys its rows by {have} ids and this input's --id-column {id_column!r} is {id_type}; "
                     "give ids of the target's type, or --rebuild.")


def previous_parquet_state(spec: TargetSpec, id_column: str, space: Mapping[str, Any],
                           columns: Sequence[str]) -> tuple[pa.Table | None, dict[str, Any] | None]:
    """(id, hash) of the Parquet output an earlier sync left at -o (None: none, or not keyed by
    `id_column`), and its vector record when its rows can be carried into this run's output as
    they are: the same vector space and the same columns (None: every row is written again)."""
    where = spec.location
    try:
        if not where.exists():
            return None, None
        source: Any = where.open(ranged=True) if isinstance(where, RemotePath) else str(where)
        names = pq.ParquetFile(source).schema_arrow.names
        if id_column not in names or HASH_COLUMN not in names:
            return None, None
        source = where.open(ranged=True) if isinstance(where, RemotePath) else str(where)
        state = pq.read_table(source, columns=[id_column, HASH_COLUMN])
        provenance = read_metadata(where).get("provenance") or {}
        recorded = vector_record(provenance, id_column=((provenance.get("output") or {}).get("table") or {}).get("id_column"))
        if sorted(names) != sorted(columns) or space_difference(recorded, dict(space) | {"dim": space.get("dim") or recorded.get("dim")}):
            return state, None
        return state, recorded
    except (OSError, pa.ArrowException, InputError, ValueError):
        return None, None  # not an earlier output hfbatch can read: every row is new to it


class SyncRun:
    """The chunk core's hooks for a sync run (jobs/core.run_task)."""

    def __init__(self, plan: SyncPlan, opts: Any, task: Any, target: Target | None):
        self.plan, self.opts, self.task, self.target = plan, opts, task, target

    def passthrough(self, schema: pa.Schema) -> pa.Schema:
        if self.plan.id_column not in schema.names:  # (the options add it to --keep)
            raise InputError(f"--keep must include --id-column {self.plan.id_column!r} (the target's key).")
        return pa.schema([*schema, pa.field(HASH_COLUMN, pa.string())])

    def select(self, v: ValidatedChunk) -> ValidatedChunk:
        """The chunk's changed rows, with their hash: what the run computes and writes."""
        n = v.chunk.batch.num_rows
        first = v.chunk.first_row
        batch, rows = self.plan.changed_rows(v.chunk.batch, first)
        if len(rows) == n:
            return replace(v, chunk=replace(v.chunk, batch=batch))
        at = {int(r): k for k, r in enumerate(rows)}
        chunk = Chunk(batch, first,
                      {at[i]: why for i, why in v.chunk.invalid.items() if i in at}, row_numbers=rows + first)
        pick = rows.tolist()
        return ValidatedChunk(chunk, [v.texts[i] for i in pick], [v.errors[i] for i in pick],
                              [v.n_tokens[i] for i in pick], [v.truncated[i] for i in pick])

    def open_sink(self, schema: pa.Schema) -> Any:
        from .sync_sinks import ChangeSink, ParquetSyncSink, TableSink

        changes = ChangeSink(self.opts.changes, schema, self.plan) if self.opts.changes is not None else None
        if self.target is None:
            return ParquetSyncSink(self.opts.output, schema, self.plan, changes)
        return TableSink(self.target, schema, self.plan, changes, index=self.opts.index, index_type=self.opts.index_type,
                         commit_every=self.opts.commit_every)

    def close(self) -> None:
        """The run is over (done or failed): the target lets go of its connection and lock."""
        if self.target is not None:
            self.target.close()


def sync_hooks(opts: Any, task: Any, source: Any, files: Any) -> SyncRun | None:
    """The sync hooks of a run: None without --id-column on a Parquet output (today's job)."""
    spec = parse_target(opts.output, kind=opts.target)
    if opts.id_column is None:
        if spec.is_table:
            raise InputError(f"-o {spec.given} is a {KIND_NAMES.get(spec.kind, spec.kind)} table, which is synced by id: give --id-column COL "
                             "(a column of unique ids).")
        if opts.changes is not None:
            raise InputError("--changes lists the rows that changed by id: give --id-column COL.")
        return None
    if spec.kind in ("lance", "delta") and any(c in opts.id_column for c in '`"'):
        raise InputError(f"--id-column {opts.id_column!r}: Lance and Delta cannot merge on a column whose name holds "
                         "` or \"; rename the column.")
    target = open_target(spec) if spec.is_table else None
    try:
        if target is not None:
            target.check_run(opts.output_precision, [*files.passthrough.names, *task.added_columns])
            target.lock(opts.lock_timeout)  # (Postgres: held until the run ends; the next run plans on its result)
        plan = plan_sync(opts, task, source, files.passthrough, target)
    except BaseException:
        if target is not None:
            target.close()
        raise
    return SyncRun(plan, opts, task, target)

