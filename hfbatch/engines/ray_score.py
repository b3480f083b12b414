"""`hfbatch score --engine ray`: the pairs of one input scored by Ray's actors, written by the
driver into one output, as the local engine writes it.

The shape is the embed engine's (engines/ray.py), with the score job's Task and sink: the driver
opens the input as the local engine does (a directory or glob of parts joined into one temp file
beside the output, a pipe spooled), checks its columns and counts its rows, then hands Ray the one
file. Read tasks split it in hfbatch's own chunks (without --chunk-size, small enough that each
actor gets a few: `shared_chunk_size`); each `ScoreActor` holds a scorer (the model
loaded once per actor) and runs the local engine's `opts.validate` (both columns; the pair is the
unit) and `ChunkProcessor` with `ScoreTask`, so pairs are deduped, cached by pair and counted per
chunk exactly as there. The rows come back in input order into a `ScoreStream`, which writes them
into a ParquetSink, or for --rerank into the RerankSink that ranks once every row is in (it needs
them all), and publishes the output with its sidecar only when rows in == rows out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from ..backends.scoring import make_scorer
from ..errors import InputError
from ..io.parts import Part, is_multi_input
from ..io.readers import Chunk, spooled_input
from ..io.writers import ParquetSink
from ..jobs.core import open_files
from ..jobs.score import SCORE_COLUMNS, RerankSink, ScoreResult, ScoreTask, join_parts, score_columns
from ..options import ScoreOptions
from ..settings import Settings
from .ray import EmbedActor, PartStream, PlannedPart, ReportedBackend, StreamWriter, actor_cache, run_on_ray, shared_chunk_size


class ScoreActor(EmbedActor):
    """An actor of a score job: a scorer instead of an embedding backend; the pair is the unit."""

    job = "score"

    def build(self, options: Any) -> Any:
        return make_scorer(options)

    def validate(self, chunk: Chunk, part: Path) -> Any:
        return self.options.validate(chunk)  # (named by the input the user gave, as the local engine does)

    def task(self) -> Any:
        return ScoreTask(self.backend, self.options)


class ScoreStream(PartStream):
    """The job's rows as the actors return them, in input order, into the score job's sink."""

    job = "score"

    def schema(self, table: pa.Table) -> pa.Schema:
        return pa.schema([*self.planned.passthrough, *(table.schema.field(name) for name in SCORE_COLUMNS)])

    def open_sink(self, schema: pa.Schema) -> Any:
        opts = self.planned.opts
        return RerankSink(opts, schema) if opts.rerank else ParquetSink(opts.output, schema)  # type: ignore[arg-type]

    def empty(self, backend: Any) -> tuple[Any, Any]:
        schema = ScoreTask(backend, self.planned.opts).schema(self.planned.passthrough)  # type: ignore[arg-type]
        return self.open_sink(schema), actor_cache(self.planned.opts, backend.fingerprint())  # type: ignore[arg-type]

    def details(self, reported: ReportedBackend) -> dict[str, Any]:
        return ScoreTask(reported, self.planned.opts).provenance()  # type: ignore[arg-type]


def run_score_ray(options: ScoreOptions, *, address: str | None = None, num_workers: int = 2,
                  gpus_per_worker: float = 0.0, settings: Settings | None = None) -> ScoreResult:
    """Score `options.input` on a Ray cluster into one output and sidecar, as `run_score` does.
    InputError (exit 2) before any work; other HfbatchErrors (exit 1) after, with nothing written."""
    try:
        import ray  # noqa: F401  # an optional extra: missing is a usage error, before any work
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'hfbatch[ray]' (ray[data]).") from None
    if num_workers < 1:
        raise InputError(f"--num-workers must be at least 1 (got {num_workers}).")
    for flag, value in (("--max-errors", options.max_errors), ("--log-file", options.log_file),
                        ("--metrics-file", options.metrics_file)):
        if value is not None:
            raise InputError(f"{flag} is not supported by --engine ray yet; drop it, or use the local engine.")
    opts = options.resolved(settings or Settings.load())
    beside = opts.output.parent if isinstance(opts.output, Path) and opts.output.parent.is_dir() else None
    joined = is_multi_input(opts.input)
    with (join_parts(opts, beside) if joined else spooled_input(opts.input, opts.format, directory=beside)) as source:
        files = open_files(opts, score_columns(opts), source)
        rows = files.reader.total_rows
        if rows is None:  # the driver knows the job is complete by its count: never guess
            raise InputError(f"{opts.input}: its rows cannot be counted before the job, which --engine ray needs; "
                             "use the local engine.")
        opts = shared_chunk_size(opts, given=options.chunk_size, rows=rows, workers=num_workers)
        scorer = make_scorer(opts)  # the driver's: it describes the job, and loads no model
        name = Path(str(source)).name
        part = Part(input=source, relative=name, output=opts.output, name=str(opts.output), sidecar=opts.sidecar)  # type: ignore[arg-type]
        stream = ScoreStream(PlannedPart(part, opts, files.passthrough, files.reader.format, rows,  # type: ignore[arg-type]
                                         files.identity))
        stream.shown = opts.input
        stream.ray = {"address": address or "local", "num_workers": num_workers, "gpus_per_worker": gpus_per_worker}
        try:
            if rows:
                run_on_ray([{"part": name, "path": str(source)}], opts, StreamWriter(stream), address=address,  # type: ignore[arg-type]
                           num_workers=num_workers, gpus_per_worker=gpus_per_worker, actor=ScoreActor)
            document = stream.commit(scorer)  # (nothing published when it raises)
        except BaseException:
            stream.abort()
            raise
    return ScoreResult(opts.output, opts.sidecar, document)


__all__ = ["run_score_ray", "ScoreActor", "ScoreStream"]
