"""`--engine ray`: the same per-chunk work as the local pipeline, spread over a Ray cluster.

Shape of the job (each step named for the trap it avoids; measured with Ray 2.60):
- Read: one Ray Data task per input part runs hfbatch's own reader (the same CSV-as-strings,
  JSONL schema and Parquet buffering as `run_embed`), emitting chunks with a `__row` id, so rows
  can be put back in order: Ray writes and joins do not keep order, even with preserve_order.
- Embed: `map_batches` with `EmbedActor`, an actor class that builds the same backend, cache and
  `EmbedTask` as the local pipeline and calls the same `validate_chunk` + `ChunkProcessor.process`
  (jobs/core.py) on each chunk (shared code, not a copy). Actors take a fraction of a CPU and one torch thread, so read tasks
  are never starved (two 1-CPU actors on a 2-CPU machine hang forever). Compute is
  `ActorPoolStrategy(size=N)`; failed actors restart and their tasks retry (`max_restarts`,
  `max_task_retries`); `max_errored_blocks` is never used, because it drops rows silently.
- Write: the driver receives the embedded chunks, orders each part by `__row`, and writes it
  through the same atomic ParquetSink (same schema, a sidecar per part) and job sidecar as the
  multi-part local engine (`parts.py`), so merge-meta and resume work the same.
A shared cache directory (NFS, or one machine) is shared by all actors: diskcache is process-safe.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import HfbatchError, InputError
from ..io.plan import open_job_files
from ..io.readers import Chunk, open_reader
from ..io.writers import ParquetSink
from ..options import EmbedOptions, sidecar_path
from .parts import (PartRecord, PartsResult, earlier_records, expand_inputs, is_multi_input, job_sidecar_path,
                    options_key, part_output, shard_of, skip_if_complete, write_job_sidecar)
from ..provenance import file_digest, library_versions, redact, utc_now
from ..settings import Settings
from ..validate import EMBED_COLUMNS

_META = ("__part", "__row", "__invalid")
_STATS = ("__computed", "__hits", "__actor")
ACTOR_RETRIES = 2  # max_restarts / max_task_retries of the embedding actors


def _read_part(batch: pa.Table, *, options: EmbedOptions) -> Iterator[pa.Table]:
    """A Ray Data task: one part (a row of `batch`) read by hfbatch's reader, chunk by chunk."""
    for part, path in zip(batch.column("part").to_pylist(), batch.column("path").to_pylist()):
        reader = open_reader(path, fmt=options.format, chunk_size=options.chunk_size or 10_000,
                             columns=None if options.keep is None else list(dict.fromkeys([*options.keep, options.text_column])),
                             text_column=options.text_column, max_line_bytes=options.max_line_bytes)  # type: ignore[arg-type]
        for chunk in reader.chunks():
            n = chunk.batch.num_rows
            table = pa.Table.from_batches([chunk.batch])
            table = table.append_column("__part", pa.array([str(part)] * n, pa.string()))
            table = table.append_column("__row", pa.array(range(chunk.first_row, chunk.first_row + n), pa.int64()))
            table = table.append_column("__invalid", pa.array([chunk.invalid.get(i) for i in range(n)], pa.string()))
            yield table


class EmbedActor:
    """Holds one backend (model loaded once per actor) and runs the local pipeline's chunk work."""

    def __init__(self, options: EmbedOptions, fingerprint_hint: str | None = None):
        import torch

        from ..backends import make_backend
        from ..cache import NullCache, open_cache

        torch.set_num_threads(1)  # one core per actor: more threads than cores thrash
        self.options = options
        self.backend = make_backend(options)
        self.cache = (open_cache(options.cache_dir, self.backend.fingerprint(), size_limit_bytes=options.cache_size_bytes or 0)
                      if options.use_cache else NullCache())
        self.id = uuid.uuid4().hex[:12]  # distinct ids seen by the driver = actor starts (restarts show)

    def __call__(self, table: pa.Table) -> pa.Table:
        from ..jobs.core import ChunkProcessor
        from ..jobs.embed import EmbedTask
        from ..provenance import Metrics
        from ..validate import validate_chunk

        opts = self.options
        rows = table.column("__row").to_pylist()
        invalid = {i: msg for i, msg in enumerate(table.column("__invalid").to_pylist()) if msg}
        data = table.drop_columns(list(_META))
        chunk = Chunk(data.combine_chunks().to_batches()[0] if data.num_rows else pa.RecordBatch.from_pylist([], data.schema),
                      rows[0] if rows else 0, invalid)
        passthrough = pa.schema([f for f in data.schema if f.name in (opts.keep or data.schema.names)])
        metrics = Metrics()
        job = ChunkProcessor(EmbedTask(self.backend, opts), self.cache, metrics, passthrough=passthrough,
                             on_invalid=opts.on_invalid)
        validated = validate_chunk(chunk, path=Path(table.column("__part")[0].as_py()), text_column=opts.text_column,
                                   on_invalid=opts.on_invalid)
        hits_before = self.cache.stats.hits
        out = pa.Table.from_batches([job.process(validated)])
        keep = [i for i, t in enumerate(validated.texts) if t is not None or opts.on_invalid != "skip"]
        n = out.num_rows
        out = out.append_column("__part", table.column("__part").take(keep))
        out = out.append_column("__row", pa.array([rows[i] for i in keep], pa.int64()))
        stats = {"__computed": metrics.texts_computed, "__hits": self.cache.stats.hits - hits_before}
        for name, value in stats.items():  # per-chunk counters ride on the first row
            out = out.append_column(name, pa.array([value] + [0] * (n - 1) if n else [], pa.int64()))
        return out.append_column("__actor", pa.array([self.id] * n, pa.string()))


def run_embed_ray(options: EmbedOptions, *, shard: tuple[int, int] = (1, 1), address: str | None = None,
                  num_workers: int = 2, gpus_per_worker: float = 0, settings: Settings | None = None) -> PartsResult:
    """Embed a file, directory or glob with Ray Data; outputs and sidecars as `run_embed_parts`."""
    try:
        import ray
        from ray.data import ActorPoolStrategy, DataContext
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'hfbatch[ray]' (ray[data]).") from None
    if num_workers < 1:
        raise InputError(f"--num-workers must be at least 1 (got {num_workers}).")
    settings = settings or Settings.load()
    out_dir = Path(options.output)
    if out_dir.suffix.lower() in (".parquet", ".pq") or out_dir.is_file():
        raise InputError(f"-o {out_dir}: with --engine ray the output is a directory; give one, e.g. -o out/.")
    if is_multi_input(options.input):
        root, parts = expand_inputs(options.input, options.format)
    else:
        root, parts = Path(options.input).parent, [Path(options.input)]
    mine = [p for p in parts if shard_of(str(p.relative_to(root)), shard[1]) == shard[0]]
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = replace(options, input=parts[0], output=part_output(out_dir, root, parts[0])).resolved(settings)
    key = options_key(resolved)
    sidecar = job_sidecar_path(out_dir, shard)
    earlier = earlier_records(sidecar, key)

    # every check that needs no model, before the cluster starts: columns, outputs, earlier runs
    todo: dict[str, tuple[Path, Path, pa.Schema]] = {}
    records: dict[str, PartRecord] = {}
    for part in mine:
        relative, output = str(part.relative_to(root)), part_output(out_dir, root, part)
        done = skip_if_complete(relative, part, output, out_dir, earlier.get(relative))
        if done is not None:
            records[relative] = done
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            files = open_job_files(input=part, output=output, fmt=resolved.format, chunk_size=resolved.chunk_size or 10_000,
                                   text_column=resolved.text_column or "text", keep=resolved.keep, added_columns=EMBED_COLUMNS,
                                   max_line_bytes=resolved.max_line_bytes)  # type: ignore[arg-type]
        except InputError as exc:
            records[relative] = PartRecord(relative, str(output.relative_to(out_dir)), "failed", error=str(exc))
            continue
        todo[relative] = (part, output, files.passthrough)

    document: dict[str, Any] = {
        "job": "embed-parts", "engine": "ray", "tool_version": library_versions()["hfbatch"],
        "command": redact(list(options.command)), "input": str(options.input), "input_root": str(root),
        "output_dir": str(out_dir), "shard": f"{shard[0]}/{shard[1]}", "parts_in_input": len(parts),
        "options_key": key, "started": utc_now(), "parts": [],
    }
    wall = time.perf_counter()
    ray_info: dict[str, Any] = {"address": address or "local", "num_workers": num_workers,
                                "gpus_per_worker": gpus_per_worker, "actor_max_restarts": ACTOR_RETRIES,
                                "actor_max_task_retries": ACTOR_RETRIES}
    if todo:
        started_here = not ray.is_initialized()
        if started_here:  # address="local": a bare init() may join a stale cluster found on this machine
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        try:
            context = DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False  # hfbatch reports; Ray's bars and banners would interleave
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            cpus = float(ray.cluster_resources().get("CPU", 1))
            items = [{"part": rel, "path": str(path)} for rel, (path, _, _) in todo.items()]
            embedded = (
                ray.data.from_items(items, override_num_blocks=len(items))
                .map_batches(_read_part, fn_kwargs={"options": resolved}, batch_size=1, batch_format="pyarrow",
                             num_cpus=0.25)
                .map_batches(EmbedActor, fn_constructor_args=(resolved,), batch_size=None, batch_format="pyarrow",
                             compute=ActorPoolStrategy(size=num_workers),
                             num_cpus=min(1.0, max(0.25, (cpus - 0.5) / num_workers)),
                             **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
                             max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
            )
            pieces: dict[str, list[pa.Table]] = {rel: [] for rel in todo}
            actors: set[str] = set()
            for table in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
                if table.num_rows:
                    actors.update(table.column("__actor").unique().to_pylist())
                    for rel in table.column("__part").unique().to_pylist():
                        pieces[rel].append(table.filter(pc.equal(table.column("__part"), rel)))
            ray_info["actor_starts"] = len(actors)
            for rel, (part, output, passthrough) in todo.items():
                records[rel] = _write_part(rel, part, output, out_dir, pieces[rel], resolved, passthrough)
        except HfbatchError:
            raise
        except Exception as exc:  # a task that failed after its retries: Ray wraps the cause
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, HfbatchError):
                raise cause from None
            raise HfbatchError(f"the Ray job failed ({type(cause).__name__}: {cause}); no part it was writing was kept.") from None
        finally:
            if started_here:
                ray.shutdown()
    document["ray"] = ray_info
    document["parts"] = [asdict(records[str(p.relative_to(root))]) for p in mine]
    write_job_sidecar(sidecar, document, wall, finished=True, relative=options.relative_paths)
    return PartsResult(out_dir, sidecar, document)


def _write_part(relative: str, part: Path, output: Path, out_dir: Path, pieces: list[pa.Table], opts: EmbedOptions,
                passthrough: pa.Schema) -> PartRecord:
    """Order a part's rows by __row and write them atomically, with a sidecar, like run_embed."""
    started = time.perf_counter()
    from ..io.writers import output_schema

    table = pa.concat_tables(pieces) if pieces else None
    dim = None
    if table is not None and table.num_rows:
        table = table.sort_by("__row")
        dim = table.schema.field("embedding").type.list_size
    computed = int(pc.sum(table.column("__computed")).as_py() or 0) if table is not None and table.num_rows else 0
    hits = int(pc.sum(table.column("__hits")).as_py() or 0) if table is not None and table.num_rows else 0
    schema = output_schema(passthrough, dim or 0)
    sink = ParquetSink(output, schema)
    try:
        rows_out = 0
        if table is not None and table.num_rows:
            data = table.select(schema.names).cast(schema)
            for batch in data.to_batches(max_chunksize=65_536):
                sink.write(batch)
            rows_out = data.num_rows
        input_hash = file_digest(part)
        rows_in = count_rows(part, opts)
        document = {
            "provenance": {"tool": "hfbatch", "engine": "ray", "tool_version": library_versions()["hfbatch"],
                           "model_id": opts.model, "backend": opts.backend, "text_column": opts.text_column,
                           "normalize": opts.normalize, "on_invalid": opts.on_invalid, "dim": dim,
                           "input": {"path": str(part), "hash": input_hash, "rows": rows_in},
                           "output": {"path": str(output), "rows": rows_out}, "finished": utc_now(),
                           "libraries": library_versions()},
            "metrics": {"rows_total": rows_in, "rows_written": rows_out, "texts_computed": computed,
                        "cache": {"hits": hits}, "write_seconds": round(time.perf_counter() - started, 3)},
        }
        if opts.on_invalid != "skip" and rows_out != rows_in:
            raise HfbatchError(f"{part}: the Ray job returned {rows_out} rows of {rows_in}; the part was not written.")
        sink.commit(document, sidecar=sidecar_path(output))
    except BaseException:
        sink.abort()
        raise
    invalid = int(table.column("embedding_error").drop_null().length()) if table is not None and table.num_rows else 0
    return PartRecord(relative, str(output.relative_to(out_dir)), "done", rows_in=rows_in, rows_out=rows_out,
                      rows_invalid=invalid, texts_computed=computed, cache_hits=hits, input_hash=input_hash,
                      seconds=round(time.perf_counter() - started, 3))


def count_rows(part: Path, opts: EmbedOptions) -> int:
    """Rows of the input part, counted by its reader (the check that no row was lost)."""
    reader = open_reader(part, fmt=opts.format, chunk_size=opts.chunk_size or 10_000, columns=[opts.text_column],
                         text_column=opts.text_column, max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]
    if reader.total_rows is not None:
        return reader.total_rows
    return sum(chunk.batch.num_rows for chunk in reader.chunks())
