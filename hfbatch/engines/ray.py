"""`--engine ray`: the same per-chunk work as the local engines, spread over a Ray cluster.

Shape of the job (each step named for the trap it avoids; measured with Ray 2.60):
- Plan: the same `PartsJob` as the local many-part engine (engines/parts.py): part names, every
  path planned and checked, resume, the job sidecar. Each part's columns are checked
  (`jobs.core.open_files`) before the cluster starts; a bad part is marked failed.
- Read: one Ray Data task per input part runs hfbatch's own reader (the same CSV-as-strings,
  JSONL schema and Parquet buffering as `run_embed`). Every row carries its part (`__part`), its
  index (`__row`) and its chunk (`__chunk`, the chunk's first row): Ray merges what a task yields
  into blocks, so the actor splits the chunks again, and each chunk is the local engine's chunk
  (the same batches, distinct texts and cache counts in the sidecar).
- Blocks: Ray merges what a read task yields into blocks of up to 128 MB, so a file of one
  block would go to one actor while the others wait; a streaming repartition at the chunk size
  cuts them again, each block one chunk (a part's last, short chunk ends its block: measured, the
  cuts fall on the chunks of the local engine). The cutting tasks take a CPU each (Ray's default),
  so actors take what the reads and the cutting leave; where that would be under 0.05 CPU an actor
  the blocks stay uncut, and more actors than the cluster can start beside its reads are refused.
- Embed: `map_batches` with `EmbedActor`, an actor class that builds the same backend and cache
  as the local pipeline and calls the same `validate_chunk` + `ChunkProcessor.process`
  (jobs/core.py) on each chunk. Each chunk's first row carries a JSON report (`__report`): the
  chunk's Metrics, what the backend's describe() gained (load seconds, requests), its fingerprint
  and the cache's facts. Rows that --on-invalid skip drops stay in, flagged (`__keep`), so every
  chunk has a first row for its report; the driver drops them. Actors take a fraction of a CPU
  and one torch thread, so read tasks are never starved (two 1-CPU actors on a 2-CPU machine hang
  forever). Compute is `ActorPoolStrategy(size=N)`; failed actors restart and their tasks retry
  (`max_restarts`, `max_task_retries`); `max_errored_blocks` is never used: it drops rows silently.
- Write: with `preserve_order` the parts arrive one after another, their rows in order. The driver
  streams each part's rows into its ParquetSink as they come (rows that arrive early wait for the
  gap to fill) and publishes it as soon as every row of the input is in, with the sidecar that
  `provenance.build_document` makes for every engine (the actors' Metrics merged with
  `Metrics.add`; the backend built here, which loads nothing, for what it is; the actors' reports
  for what it did). So the driver holds one part's rows in flight, however many parts there are.
  Rows in == rows out (`jobs.core.check_rows`), or the part is not published.
- Input identity: each part's (`provenance.InputIdentity`: a local file's stat, a store object's
  ETag and size) is taken in the driver before its first read (the column check, before any read
  task) and checked again at its commit, after its last read (the row count). A part replaced or
  rewritten in between is marked failed (`InputChangedError`: never recorded as done, its earlier
  output removed as the local engine does, rows still coming for it dropped); the other parts go on
  and the job exits 1.
A shared cache directory (NFS, or one machine) is shared by all actors: diskcache is process-safe.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import os
import socket
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..backends import Backend, make_backend
from ..cache import NullCache, open_cache
from ..errors import HfbatchError, InputChangedError, InputError, OutputError
from ..io.columns import EMBED_COLUMNS
from ..io.parts import Part
from ..io.readers import Chunk, open_reader
from ..io.writers import ParquetSink
from ..jobs.core import ChunkProcessor, check_rows, open_files, window_fields
from ..jobs.embed import embed_task, embed_columns, embed_provenance, split_mode
from ..options import EmbedOptions
from ..provenance import InputFacts, InputIdentity, Metrics, OutputFacts, build_document, utc_now
from ..settings import Settings
from ..validate import validate_chunk
from .parts import PartsJob, PartsResult, plan_parts, settle_identity, settle_ranges

_META = ("__part", "__row", "__chunk", "__invalid")
FAILED = "__failed"  # the one column of an actor's answer that is an hfbatch error (see EmbedActor.__call__)
ACTOR_RETRIES = 2  # max_restarts / max_task_retries of the embedding actors
# what a backend's describe() counts up over its life (an actor's serves many parts): a part's
# sidecar gets what they gained over its own chunks
_COUNTERS = frozenset({"requests", "retries", "batch_halvings", "retry_causes", "texts_computed", "load_seconds"})


def _read_part(batch: pa.Table, *, options: EmbedOptions) -> Iterator[pa.Table]:
    """A Ray Data task: one part (a row of `batch`) read by hfbatch's reader, chunk by chunk."""
    for part, path in zip(batch.column("part").to_pylist(), batch.column("path").to_pylist()):
        reader = open_reader(path, fmt=options.format, chunk_size=options.chunk_size or 10_000,
                             columns=None if options.keep is None else list(dict.fromkeys([*options.keep, options.input_column])),
                             text_column=options.input_column, max_line_bytes=options.max_line_bytes)  # type: ignore[arg-type]
        for chunk in reader.chunks():
            n = chunk.batch.num_rows
            table = pa.Table.from_batches([chunk.batch])
            table = table.append_column("__part", pa.array([str(part)] * n, pa.string()))
            table = table.append_column("__row", pa.array(range(chunk.first_row, chunk.first_row + n), pa.int64()))
            table = table.append_column("__chunk", pa.array([chunk.first_row] * n, pa.int64()))
            table = table.append_column("__invalid", pa.array([chunk.invalid.get(i) for i in range(n)], pa.string()))
            yield table


class EmbedActor:
    """Holds one backend (model loaded once per actor) and runs the local pipeline's chunk work."""

    job = "embed"

    def __init__(self, options: EmbedOptions):
        # one core per actor: more threads than cores thrash. torch reads OMP_NUM_THREADS when it is
        # first imported; an actor on an exported runtime never imports it (seconds per actor)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        else:
            os.environ["OMP_NUM_THREADS"] = "1"
        self.options = options
        self.backend = self.build(options)
        self.cache = actor_cache(options, self.backend.fingerprint())
        self.id = uuid.uuid4().hex[:12]  # distinct ids seen by the driver = actor starts (restarts show)

    def __call__(self, table: pa.Table) -> pa.Table:
        """The embedded rows of every chunk in `table` (a block: whole chunks, as read)."""
        keys = list(zip(table.column("__part").to_pylist(), table.column("__chunk").to_pylist()))
        starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
        try:
            pieces = [self.chunk(table.slice(a, b - a)) for a, b in zip(starts, [*starts[1:], len(keys)])]
        except HfbatchError as exc:  # (a bad row with --on-invalid fail): handed to the driver, which raises it
            # as the local engine would; raised here, Ray would carry only its own wrapper's words
            return pa.table({FAILED: [json.dumps({"type": type(exc).__name__, "message": str(exc)})]})
        return pa.concat_tables(pieces, promote_options="default") if pieces else table

    def build(self, options: Any) -> Any:
        """The backend the options name (loaded once per actor, when it first computes)."""
        return make_backend(options)

    def validate(self, chunk: Chunk, part: Path) -> Any:
        """The chunk's rows checked as the local engine checks them (named by the part they are in)."""
        opts = self.options
        return validate_chunk(chunk, path=part, text_column=opts.input_column, on_invalid=opts.on_invalid)

    def task(self) -> Any:
        """The job's Task (jobs/core.py) over this actor's backend."""
        return embed_task(self.backend, self.options)

    def chunk(self, table: pa.Table) -> pa.Table:
        opts = self.options
        n = table.num_rows
        metrics = Metrics(job=self.job, chunks=1, rows_total=n)
        data = table.drop_columns(list(_META)).combine_chunks()
        invalid = {i: msg for i, msg in enumerate(table.column("__invalid").to_pylist()) if msg}
        chunk = Chunk(data.to_batches()[0], table.column("__row")[0].as_py(), invalid)
        passthrough = pa.schema([data.schema.field(c) for c in (data.schema.names if opts.keep is None else opts.keep)])
        with metrics.stage("validate"):
            validated = self.validate(chunk, Path(table.column("__part")[0].as_py()))
        described = self.backend.describe()
        # rows --on-invalid skip drops are kept (marked) and flagged, so the chunk has a row for its report
        task = self.task()
        processor = ChunkProcessor(task, self.cache, metrics, passthrough=passthrough,
                                   on_invalid="mark" if opts.on_invalid == "skip" else opts.on_invalid,
                                   text_column=opts.input_column)
        batch, parents = processor.process_rows(validated)  # with --split, many rows of one input row
        out = pa.Table.from_batches([batch])
        keep = np.ones(n, dtype=bool)
        if opts.on_invalid == "skip":
            keep[:] = False
            keep[validated.valid_rows] = True
            metrics.rows_skipped = int(n - keep.sum())
        report = {
            "actor": self.id,
            "dim": task.dim() if hasattr(task, "dim") else None,  # (a score has no width)
            "metrics": {f.name: getattr(metrics, f.name) for f in fields(Metrics) if not f.name.startswith("_")},
            "backend": gained(self.backend.describe(), described),
            "fingerprint": self.backend.fingerprint(),
            "cache": {"directory": str(self.cache.directory) if self.cache.directory else None,
                      "disabled": self.cache.disabled, "volume_bytes": self.cache.volume_bytes()},
        }
        rows = pa.array(parents)
        out = out.append_column("__part", table.column("__part").take(rows))
        out = out.append_column("__row", table.column("__row").take(rows))
        out = out.append_column("__keep", pa.array(keep[parents]))
        return out.append_column("__report", pa.array([json.dumps(report, default=str)] + [None] * (out.num_rows - 1),
                                                      pa.string()))


def gained(after: Mapping[str, Any], before: Mapping[str, Any], counting: bool = False) -> dict[str, Any]:
    """`after` (a describe()) with each counter (see _COUNTERS, and numbers inside them) replaced
    by what it gained since `before`; other values as they are now."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        count = counting or key in _COUNTERS
        if isinstance(value, Mapping):
            out[key] = gained(value, old if isinstance(old, Mapping) else {}, count)
        elif count and _number(value):
            out[key] = round(value - (old if _number(old) else 0), 3)
        else:
            out[key] = value
    return out


def summed(total: Mapping[str, Any], more: Mapping[str, Any], counting: bool = False) -> dict[str, Any]:
    """Two `gained` reports as one: counters added, other values the later report's."""
    out = dict(total)
    for key, value in more.items():
        old = total.get(key)
        count = counting or key in _COUNTERS
        if isinstance(value, Mapping):
            out[key] = summed(old if isinstance(old, Mapping) else {}, value, count)
        elif count and _number(value) and _number(old):
            out[key] = round(old + value, 3)
        else:
            out[key] = value
    return out


def actor_cache(opts: EmbedOptions, fingerprint: str) -> Any:
    return (open_cache(opts.cache_dir, fingerprint, size_limit_bytes=opts.cache_size_bytes or 0)  # type: ignore[arg-type]
            if opts.use_cache else NullCache())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ReportedBackend:
    """The backend as build_document and embed_provenance see it, for a part the actors embedded:
    what it is from the backend built in the driver (building one loads nothing), what it did
    (device, load seconds, requests, a fallback) as the actors reported it."""

    def __init__(self, backend: Backend, described: Mapping[str, Any] | None, fingerprint: str | None):
        self.name, self.kind = backend.name, backend.kind
        self.backend, self.described, self.reported_fingerprint = backend, described, fingerprint

    def fingerprint(self) -> str:
        return self.reported_fingerprint or self.backend.fingerprint()

    def describe(self) -> dict[str, Any]:
        return dict(self.described) if self.described is not None else self.backend.describe()

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    @property
    def prompt(self) -> str | None:
        return self.backend.prompt


@dataclass(frozen=True)
class ReportedCache:
    """The cache as the actors last reported it: what build_document reads of a cache."""

    directory: str | None
    disabled: str | None
    volume: int

    def volume_bytes(self) -> int:
        return self.volume


@dataclass
class PlannedPart:
    """A part the actors will embed: checked, with what its writer needs."""

    part: Part
    opts: EmbedOptions  # resolved, with this part's input, output and sidecar
    passthrough: pa.Schema
    format: str
    rows: int  # rows the input had when it was checked
    identity: InputIdentity  # the input before its first read: checked again after its last

    @property
    def path(self) -> Path:
        return self.part.input


class PartStream:
    """One part's rows as the actors return them: written in input order into its ParquetSink as
    they come, published with its sidecar once every row of the input is in."""

    job = "embed"

    def __init__(self, planned: PlannedPart):
        self.planned = planned
        self.metrics = Metrics(job=self.job)
        self.started, self.clock = utc_now(), time.perf_counter()
        self.next_row = 0  # rows before it are written (or dropped on purpose)
        self.waiting: dict[int, pa.Table] = {}  # rows that came before a gap, by first row
        self.sink: ParquetSink | None = None
        self.dim: int | None = None
        self.described: dict[str, Any] | None = None
        self.fingerprint: str | None = None
        self.cache: ReportedCache | None = None
        self.actors: set[str] = set()
        self.shown: Path | None = None  # the input as the user named it, when the part is a copy of it
        self.ray: dict[str, Any] | None = None  # the cluster's facts, for a sidecar of its own (one output)

    @property
    def complete(self) -> bool:
        return self.next_row >= self.planned.rows

    def add(self, table: pa.Table) -> None:
        """Rows of this part (consecutive input rows, as one actor call returned them; with --split
        an input row's windows are consecutive rows with its row number)."""
        rows = table.column("__row")
        first, last = rows[0].as_py(), rows[-1].as_py()
        if last - first + 1 != len(pc.unique(rows)) or first < self.next_row or first in self.waiting:
            raise OutputError(f"{self.planned.path}: the Ray job returned rows {first + 1:,}-{last + 1:,} twice or out of "
                              "order; the part was not written.")
        self.waiting[first] = table
        while self.next_row in self.waiting:
            self._write(self.waiting.pop(self.next_row))

    def _write(self, table: pa.Table) -> None:
        for text in table.column("__report").drop_null().to_pylist():
            report = json.loads(text)
            self.actors.add(report["actor"])
            self.metrics.add(Metrics(**report["metrics"]))
            self.described = summed(self.described or {}, report["backend"])
            self.fingerprint = report["fingerprint"]
            self.dim = report["dim"]
            cache = report["cache"]
            self.cache = ReportedCache(cache["directory"], cache["disabled"], cache["volume_bytes"])
        if self.sink is None:
            self.sink = self.open_sink(self.schema(table))
        with self.metrics.stage("write"):
            # no copies in the usual case (every row kept, types as planned): the rows are written
            # from the block Ray handed over, and the driver's own memory stays what it was
            keep = table.column("__keep")
            data = (table if pc.all(keep).as_py() else table.filter(keep)).select(self.sink.schema.names)
            if data.schema != self.sink.schema:
                data = data.cast(self.sink.schema)
            for batch in data.to_batches(max_chunksize=65_536):
                self.sink.write(batch)
        self.metrics.rows_written += data.num_rows
        self.next_row += len(pc.unique(table.column("__row")))

    def schema(self, table: pa.Table) -> pa.Schema:
        """The output's columns: the input's kept ones, then the job's, typed as the actors made them."""
        return pa.schema([*self.planned.passthrough, *window_fields(split_mode(self.planned.opts)),
                          *(table.schema.field(name) for name in EMBED_COLUMNS)])

    def open_sink(self, schema: pa.Schema) -> Any:
        """Where the part's rows go: its Parquet output (a sync's stream: the target's sink)."""
        return ParquetSink(self.planned.opts.output, schema)

    def empty(self, backend: Backend) -> tuple[Any, Any]:
        """The sink and cache of a part without rows, which the actors never saw."""
        task = embed_task(backend, self.planned.opts)
        schema = task.schema(pa.schema([*self.planned.passthrough, *window_fields(task.split_mode)]))
        self.dim = task.dim()
        return ParquetSink(self.planned.opts.output, schema), actor_cache(self.planned.opts, backend.fingerprint())

    def details(self, reported: "ReportedBackend") -> dict[str, Any]:
        """What only this job records in the sidecar's provenance."""
        opts = self.planned.opts
        return embed_provenance(reported, opts, self.dim or 0,  # type: ignore[arg-type]
                                ranges=np.asarray(opts.ranges) if opts.ranges else None,
                                calibration=opts.calibration_record)

    def commit(self, backend: Backend) -> dict[str, Any]:
        """Check rows in == rows out, publish the output and its sidecar; returns the sidecar document."""
        opts, planned = self.planned.opts, self.planned
        cache: Any = self.cache
        try:
            if self.sink is None:  # a part without rows: the actors never saw it
                self.sink, cache = self.empty(backend)
            reader = open_reader(planned.path, fmt=opts.format, chunk_size=opts.chunk_size or 10_000,
                                 columns=[opts.input_column], text_column=opts.input_column,
                                 max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]  # the rows it has now
            try:
                check_rows(opts, reader, self.metrics, self.sink)
            except OutputError:  # a replaced input miscounts too: say that it changed, not that rows were lost
                planned.identity.check(shown=planned.path)
                raise
            # after its last read, the input is still what it was before its first (else InputChangedError)
            facts = InputFacts.of(planned.path, planned.format, self.metrics.rows_total, identity=planned.identity,
                                  shown=self.shown)
            reported = ReportedBackend(backend, self.described, self.fingerprint)
            document = build_document(job=self.metrics.job, backend=reported, options=opts, metrics=self.metrics,
                                      started=self.started, cache=cache, engine="ray", input=facts,
                                      output=OutputFacts(opts.output, self.metrics.rows_written),
                                      details=self.details(reported))
            if self.ray is not None:
                document["ray"] = {**self.ray, "actor_starts": len(self.actors)}
            self.sink.commit(document, sidecar=opts.sidecar)
        except BaseException:
            self.abort()
            raise
        finally:
            if cache is not self.cache:
                cache.close()
        return document

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()


class StreamWriter:
    """What `run_on_ray` hands the actors' rows to when the job has one stream (a sync's changed
    rows, a score job's input): rows in == rows out is checked at the stream's commit."""

    def __init__(self, stream: PartStream):
        self.stream, self.actors = stream, stream.actors

    def add(self, table: pa.Table) -> None:
        self.stream.add(table)

    def finish(self) -> None:
        return None


class PartsWriter:
    """The driver's side: the actors' rows, part by part, into PartStreams; each part published
    (and recorded in the job sidecar) as soon as it is complete, so only parts in flight are held."""

    def __init__(self, job: PartsJob, planned: dict[str, PlannedPart], backend: Backend):
        self.job, self.planned, self.backend = job, planned, backend
        self.open: dict[str, PartStream] = {}
        self.actors: set[str] = set()
        self.changed: set[str] = set()  # parts failed as their input changed: rows still coming are dropped

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        parts = table.column("__part").to_pylist()
        starts = [i for i in range(len(parts)) if i == 0 or parts[i] != parts[i - 1]]
        for a, b in zip(starts, [*starts[1:], len(parts)]):
            relative = parts[a]
            if relative in self.changed:
                continue  # (a replaced input may have more rows than were counted)
            stream = self.open.get(relative)
            if stream is None:
                if relative not in self.planned or relative in self.job.records:
                    raise OutputError(f"the Ray job returned rows of {relative} after it was written; nothing more was kept.")
                stream = self.open[relative] = PartStream(self.planned[relative])
            stream.add(table.slice(a, b - a))
            if stream.complete:
                self.commit(relative)

    def commit(self, relative: str) -> None:
        stream = self.open.pop(relative, None) or PartStream(self.planned[relative])
        try:
            document = stream.commit(self.backend)  # (nothing published when it raises)
        except InputChangedError as exc:
            self.changed_part(relative, stream, exc)
            return
        self.actors |= stream.actors
        self.job.done(stream.planned.part, document, stream.clock)

    def changed_part(self, relative: str, stream: PartStream, exc: InputChangedError) -> None:
        """The part's input changed while it was read: failed, never done, its earlier output gone
        (PartsJob.failed), and any of its rows still to come dropped; the other parts go on."""
        stream.abort()
        self.actors |= stream.actors
        self.changed.add(relative)
        self.job.failed(stream.planned.part, str(exc), stream.clock)

    def finish(self) -> None:
        """Every part was published, or failed as its input changed (a replaced input can have fewer
        rows than were counted), or the job fails with the rows it lost."""
        for relative, stream in list(self.open.items()):
            try:
                stream.planned.identity.check(shown=stream.planned.path)
            except InputChangedError as exc:
                del self.open[relative]
                self.changed_part(relative, stream, exc)
        if self.open:
            stream = next(iter(self.open.values()))
            self.abort()
            raise OutputError(f"{stream.planned.path}: the Ray job returned {stream.next_row:,} rows of the "
                              f"{stream.planned.rows:,} it has; the part was not written.")

    def abort(self) -> None:
        for stream in self.open.values():
            stream.abort()
        self.open.clear()


def shared_chunk_size(opts: Any, *, given: int | None, rows: int, workers: int, per_worker: int = 4) -> Any:
    """`opts` with a chunk size that gives each of `workers` actors about `per_worker` chunks of a
    job of `rows` rows (at most the resolved size, at least 64 rows), unless --chunk-size was
    `given`. Chunks are what the actors share (measured: 2,000 pairs in the default 10,000-row
    chunk were one chunk, so one actor scored them all while the other waited)."""
    if given is not None or not rows:
        return opts
    resolved = opts.chunk_size or 10_000  # (HFBATCH_CHUNK_SIZE below 64 is kept: set small on purpose)
    return replace(opts, chunk_size=min(resolved, max(64, -(-rows // (workers * per_worker)))))


def run_embed_ray(options: EmbedOptions, *, shard: tuple[int, int] = (1, 1), address: str | None = None,
                  num_workers: int = 2, gpus_per_worker: float = 0, settings: Settings | None = None) -> PartsResult:
    """Embed a file, directory or glob with Ray Data; outputs and sidecars as `run_embed_parts`."""
    try:
        import ray  # noqa: F401  # an optional extra: missing is a usage error, before any work
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'hfbatch[ray]' (ray[data]).") from None
    if num_workers < 1:
        raise InputError(f"--num-workers must be at least 1 (got {num_workers}).")
    settings = settings or Settings.load()
    job = plan_parts(options, shard=shard, settings=settings, engine="ray")
    # int8/uint8: the job's ranges, settled once in the driver before any part is resumed; they
    # travel to every actor with the options
    settle_identity(job)  # one identity for every actor; each chooses this machine's runtime when it computes
    settle_ranges(job, settings)

    # every check that needs no model, before the cluster starts: columns, outputs, earlier runs
    planned: dict[str, PlannedPart] = {}
    for part in job.mine:
        if job.resume(part):
            continue
        opts = job.part_options(part).resolved(settings)
        try:
            files = open_files(opts, embed_columns(opts))
        except InputError as exc:
            job.failed(part, str(exc), time.perf_counter())
            continue
        if files.reader.total_rows is None:  # the driver knows a part is complete by its count: never guess 0
            raise InputError(f"{part.input}: its rows cannot be counted before the job, which --engine ray needs; "
                             "use the local engine.")
        planned[part.relative] = PlannedPart(part, opts, files.passthrough, files.reader.format,
                                                  files.reader.total_rows, files.identity)
    ray_info: dict[str, Any] = {"address": address or "local", "num_workers": num_workers,
                                "gpus_per_worker": gpus_per_worker, "actor_max_restarts": ACTOR_RETRIES,
                                "actor_max_task_retries": ACTOR_RETRIES}
    job.document["ray"] = ray_info
    resolved = shared_chunk_size(job.resolved, given=options.chunk_size, rows=sum(p.rows for p in planned.values()),
                                 workers=num_workers)
    writer = PartsWriter(job, planned, make_backend(job.resolved))  # the driver's backend loads nothing
    try:
        for relative in [r for r, p in planned.items() if not p.rows]:
            writer.commit(relative)  # nothing for the actors to do
        items = [{"part": r, "path": str(p.path)} for r, p in planned.items() if p.rows]
        if items:
            run_on_ray(items, resolved, writer, address=address, num_workers=num_workers,
                        gpus_per_worker=gpus_per_worker)
            ray_info["actor_starts"] = len(writer.actors)
    except BaseException:
        writer.abort()
        job.write(finished=False)
        raise
    return job.finish()


def actor_error(table: pa.Table) -> HfbatchError:
    """The hfbatch error an actor handed back (its class and words), to raise in the driver."""
    from .. import errors

    record = json.loads(table.column(FAILED)[0].as_py())
    kind = getattr(errors, record.get("type", ""), None)
    kind = kind if isinstance(kind, type) and issubclass(kind, HfbatchError) else HfbatchError
    try:
        return kind(record["message"])
    except TypeError:  # (a class that wants more than its message)
        return HfbatchError(record["message"])


def hfbatch_cause(exc: BaseException) -> HfbatchError | None:
    """The HfbatchError somewhere in `exc`'s chain of causes (Ray's `cause`, __cause__,
    __context__), so a bad row in an actor ends the job as it does in the local engine."""
    todo: list[Any] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, HfbatchError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _signal_handlers() -> dict[int, Any]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: Mapping[int, Any]) -> None:
    import signal

    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail at once when a named cluster's port does not answer: ray.init() retries an address
    where nothing listens for minutes (measured: over 10 at 127.0.0.1:9) before it gives up."""
    if not address or address in ("auto", "local"):
        return
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():  # no port: Ray's defaults (6379, ray:// 10001)
        host, port = where, "10001" if address.startswith("ray://") else "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port}: {exc.strerror or type(exc).__name__}") from None


def run_on_ray(items: list[dict[str, str]], resolved: EmbedOptions, writer: PartsWriter, *, address: str | None,
                num_workers: int, gpus_per_worker: float, actor: type = EmbedActor,
                actor_args: tuple[Any, ...] = ()) -> None:
    """Read, embed and hand every row to `writer`, on a cluster (a local one started here, and
    stopped again, unless one is running or `address` names one). `actor`: EmbedActor, or a
    subclass built with (options, *actor_args)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    started_here = not ray.is_initialized()
    if started_here:  # address="local": a bare init() may join a stale cluster found on this machine
        try:
            _probe(address)
            handlers = _signal_handlers()
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
            _restore(handlers)  # ray.init takes SIGTERM: a killed job must still clean up and say so
        except Exception as exc:  # no cluster there, or none could start: the fix is hfbatch's flag
            # the first sentence only: Ray's next one names its own CLI's --address and RAY_ADDRESS
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
            raise HfbatchError(
                f"cannot reach the Ray cluster at --ray-address {address} ({reason}); give the address of a running "
                "cluster (auto, or ray://host:10001), or leave --ray-address out to start a local one."
                if address else
                f"cannot start a local Ray cluster ({reason}); give --ray-address of a running cluster "
                "(auto, or ray://host:10001)."
            ) from None
    try:
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # parts arrive one after another: each written as it ends
        context.enable_progress_bars = False  # hfbatch reports; Ray's bars and banners would interleave
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        read = (ray.data.from_items(items, override_num_blocks=len(items))
                .map_batches(_read_part, fn_kwargs={"options": resolved}, batch_size=1, batch_format="pyarrow",
                             num_cpus=0.25))
        # a read task's chunks, merged by Ray into blocks of up to 128 MB, cut again at the chunk size:
        # else one file is one block, and one actor does the job while the others wait. The cutting
        # tasks take a CPU each (Ray's default for a task; measured: with less room left for them
        # the job waits forever), so a cluster of under 2 CPUs is left uncut
        shaped = cpus >= 2 and "target_num_rows_per_block" in inspect.signature(ray.data.Dataset.repartition).parameters
        if shaped:  # (an older Ray has no row-count repartition: its blocks stay as read)
            read = read.repartition(target_num_rows_per_block=resolved.chunk_size or 10_000)
        shaped = shaped and (cpus - 1.5) / num_workers >= 0.05  # (else the actors leave it no CPU: it waits forever)
        reserved = 1.5 if shaped else 0.5  # the read tasks' quarter CPU, the cutting task's one, a margin
        if (cpus - reserved) / num_workers < 0.01:
            raise InputError(f"--num-workers {num_workers}: a cluster of {cpus:g} CPUs starts at most "
                             f"{int((cpus - reserved) / 0.01)} actors beside its read tasks; give fewer.")
        embedded = (
            read
            .map_batches(actor, fn_constructor_args=(resolved, *actor_args), batch_size=None, batch_format="pyarrow",
                         compute=ActorPoolStrategy(size=num_workers),
                         num_cpus=min(1.0, (cpus - reserved) / num_workers),
                         **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
                         max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
        )
        for table in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
            if FAILED in table.column_names:
                raise actor_error(table)
            writer.add(table)
        writer.finish()
    except HfbatchError:
        raise
    except Exception as exc:  # a task that failed after its retries: Ray wraps the cause
        cause = getattr(exc, "cause", None) or exc
        found = hfbatch_cause(exc)  # (a UDF's InputError is wrapped twice: UserCodeException, RayTaskError)
        if found is not None:
            raise found from None
        raise HfbatchError(f"the Ray job failed ({type(cause).__name__}: {cause}); no part it was writing was kept.") from None
    finally:
        if started_here:
            ray.shutdown()


__all__ = ["run_embed_ray", "run_on_ray", "shared_chunk_size", "StreamWriter", "EmbedActor", "PartsWriter", "PartStream", "PlannedPart"]
