"""A sync by --id-column with `--engine ray`: the driver plans (jobs/sync.py), Ray's actors embed
the changed rows, the driver writes them into the target's sink as they come and commits once.
Into Postgres the workers write their rows themselves, each into an UNLOGGED staging table of its
own (PgStagingActor), and hand the driver every column but the vectors; the driver's one commit
merges the staging tables (a row twice, from a retried block: once) and drops them.

The driver reads the input once for the plan and once more to copy the rows that changed, each
with its hash, into a local Parquet file: the one part the actors read. Their rows come back in
order into a PartStream whose sink is the sync's (a table's staged rows, or a Parquet output with
its unchanged rows carried), so the driver holds one block at a time and the target gets one
commit, as with the local engine. int8/uint8 ranges are settled in the driver first (the table's,
or taken from the changed rows). Not with --split (a window's parent_row would count the copy's
rows, not the input's).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..backends import make_backend
from ..errors import InputError
from ..io.parts import Part, is_multi_input
from ..io.readers import spooled_input
from ..io.sidecars import sidecar_path
from ..io.stores import location
from ..io.targets import HASH_COLUMN, parse_target
from ..io.columns import EMBED_COLUMNS
from ..jobs.core import open_files
from ..jobs.embed import EmbedResult, calibrate_ranges, embed_task, embed_columns, join_parts, run_embed
from ..jobs.sync import SyncRun, sync_hooks
from ..options import EmbedOptions
from ..provenance import InputIdentity
from ..settings import Settings
from ..vectors import CALIBRATED


def _staging_actor() -> type:
    """EmbedActor's subclass for a Postgres target (made here: importing .ray imports Ray)."""
    import pyarrow.compute as pc

    from .ray import FAILED, EmbedActor

    class PgStagingActor(EmbedActor):
        """Embeds as EmbedActor, then writes the kept rows into this actor's staging table, and
        returns them without their vectors (the driver counts and checks them)."""

        def __init__(self, options: EmbedOptions, prefix: str, key: list[str]):
            super().__init__(options)
            from ..io.targets import open_target

            self.target = open_target(parse_target(options.output, kind=options.target))
            self.stage, self.key = f"{prefix}{self.id}", key

        def __call__(self, table: pa.Table) -> pa.Table:
            out = super().__call__(table)
            if FAILED in out.column_names:  # (an hfbatch error, for the driver to raise)
                return out
            keep = out.column("__keep")
            rows = out if pc.all(keep).as_py() else out.filter(keep)
            rows = rows.select([n for n in rows.schema.names if not n.startswith("__")])
            if rows.num_rows:
                self.target.stage_rows(self.stage, rows, self.key)
            at = out.schema.get_field_index(EMBED_COLUMNS[0])  # (the vectors)
            return out.set_column(at, out.schema.field(at), pa.nulls(out.num_rows, out.schema.field(at).type))

    return PgStagingActor


def run_sync_ray(options: EmbedOptions, *, address: str | None, num_workers: int, gpus_per_worker: float,
                 settings: Settings | None = None) -> EmbedResult:
    from .ray import PartStream, PlannedPart, StreamWriter, run_on_ray, shared_chunk_size

    try:
        import ray  # noqa: F401  # an optional extra: missing is a usage error, before any work
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'hfbatch[ray]' (ray[data]).") from None
    if num_workers < 1:
        raise InputError(f"--num-workers must be at least 1 (got {num_workers}).")
    opts = options.resolved(settings or Settings.load())
    if opts.split is not None:
        raise InputError("--split with --engine ray into a sync target is not supported yet; use the local engine.")
    spec = parse_target(opts.output, kind=opts.target)
    if spec.kind == "postgres" and opts.changes is not None:
        raise InputError("--changes with --engine ray into Postgres: the workers write the rows into the database, "
                         "not through the driver that writes the change file; run the local engine for --changes.")
    changes = location(opts.changes) if opts.changes is not None else None
    extra = (("--changes", changes), ("--changes sidecar", sidecar_path(changes))) if changes is not None else ()
    beside = opts.output.parent if isinstance(opts.output, Path) and opts.output.parent.is_dir() else None
    joined = is_multi_input(opts.input)
    with (join_parts(opts, beside) if joined else spooled_input(opts.input, opts.format, directory=beside)) as source:
        files = open_files(opts, embed_columns(opts), source, table=spec.is_table, extra_outputs=extra)
        backend = make_backend(opts)  # the driver's: it plans and reports, and loads a model only to calibrate
        task = embed_task(backend, opts)
        sync = sync_hooks(opts, task, source, files)
        assert sync is not None
        work_dir = Path(tempfile.mkdtemp(prefix=".hfbatch-ray-sync-", dir=beside))
        work = work_dir / "changed.parquet"
        try:
            rows = _changed_rows(sync, files, work)
            if task.ranges is not None:  # the table's ranges, for every actor
                opts = replace(opts, ranges=task.ranges.tolist(), calibration_record=task.calibration)
            elif opts.output_precision in CALIBRATED and rows:
                ranges, record = calibrate_ranges(replace(opts, format="parquet"), [work], backend=backend)
                opts = replace(opts, ranges=ranges, calibration_record=record)
            actor_opts = replace(opts, input=work, format="parquet",
                                 keep=[*opts.keep, HASH_COLUMN] if opts.keep is not None else None)
            actor_opts = shared_chunk_size(actor_opts, given=options.chunk_size, rows=rows, workers=num_workers)
            if not rows:  # nothing to embed: the local engine commits the deletes (or no new version)
                document = None
            else:
                part = Part(input=work, relative=work.name, output=opts.output, name=str(opts.output),
                            sidecar=opts.sidecar)
                planned = PlannedPart(part, opts, sync.passthrough(files.passthrough), "parquet", rows,
                                      InputIdentity.take(work))

                class SyncStream(PartStream):
                    def open_sink(self, schema: pa.Schema) -> Any:
                        return sync.open_sink(schema)

                stream = SyncStream(planned)
                stream.shown = opts.input
                stream.ray = {"address": address or "local", "num_workers": num_workers,
                              "gpus_per_worker": gpus_per_worker}
                staging: dict[str, Any] = {}
                if spec.kind == "postgres":  # the workers write staging tables; the driver's commit merges them
                    import uuid

                    prefix = sync.target.stage_prefix(uuid.uuid4().hex[:6])  # type: ignore[union-attr]
                    sync.target.stages = prefix  # type: ignore[union-attr]
                    staging = {"actor": _staging_actor(), "actor_args": (prefix, list(sync.plan.key))}
                run_on_ray([{"part": work.name, "path": str(work)}], actor_opts, StreamWriter(stream), address=address,
                           num_workers=num_workers, gpus_per_worker=gpus_per_worker, **staging)
                document = stream.commit(backend)

        finally:
            sync.close()  # (a Postgres target's connection and lock: the local run below takes its own)
            for leftover in work_dir.glob("*"):
                leftover.unlink(missing_ok=True)
            work_dir.rmdir()
    if document is None:
        return run_embed(options, settings=settings)
    return EmbedResult(opts.output, opts.sidecar, document)


def _changed_rows(sync: SyncRun, files: Any, work: Path) -> int:
    """Copy the input's changed rows, each with its hash, into `work`; how many there are."""
    plan = sync.plan
    writer: pq.ParquetWriter | None = None
    rows = 0
    for chunk in files.reader.chunks():
        batch, picked = plan.changed_rows(chunk.batch, chunk.first_row)
        if not len(picked):
            continue
        if writer is None:
            writer = pq.ParquetWriter(str(work), batch.schema, compression="zstd")
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows
