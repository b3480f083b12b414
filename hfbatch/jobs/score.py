"""run_score(): one pair-scoring job, `hfbatch score INPUT -o OUT --query-column Q --text-column D`,
as a Task on the chunk core: each row's (query, document) pair is a unit (validate.pair_key), so
identical pairs are scored once, the cache keys the pair (with the scorer's fingerprint), and a
rerun after a kill scores only what the cache lacks.

A value is backends.scoring.Scored: the score (the model's activation applied, as
CrossEncoder.predict gives it), the pair's tokens, the windows a long document was scored in
(their max, or mean with --aggregate mean) and whether the model saw only part of it. The columns
added are score, n_tokens, n_windows, truncated and score_error (null when ok).

With --rerank K the job's rows are spilled to a temp file beside the output as they are scored;
at the commit each query's K best rows are kept, ranked (`rank`, 1 = best; equal scores in input
order), queries in the order they first appear, rows marked invalid kept (rank null), and only
that is published, atomically, with its sidecar.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..backends.remote import UNKNOWN_MAX_LENGTH
from ..backends.scoring import Pair, Scored, make_scorer
from ..io.writers import local_temp_for, publish_table
from ..monitoring import Observer
from ..options import ScoreOptions
from ..settings import Settings
from ..validate import ValidatedChunk, parse_pair_key
from .core import Cache, JobResult, run_job

SCORE_COLUMNS = ("score", "n_tokens", "n_windows", "truncated", "score_error")
_PACKED = struct.Struct("<4sfii?")  # magic, score, tokens, windows, truncated
_MAGIC = b"SCR1"


class ScoreResult(JobResult):
    """What a finished score job produced: the output paths and the sidecar document."""


def score_columns(opts: ScoreOptions) -> tuple[str, ...]:
    return (*SCORE_COLUMNS, "rank") if opts.rerank else SCORE_COLUMNS


def run_score(options: ScoreOptions, *, scorer: Any = None, observer: Observer | None = None,
              settings: Settings | None = None) -> ScoreResult:
    """Run one score job with `scorer` (default: the one the options name, made lazily).
    InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    opts, document = run_job(options, score_columns(options), lambda o: ScoreTask(scorer or make_scorer(o), o),
                             observer=observer, settings=settings,
                             sync_for=lambda o, task, source, files: Rerank(o) if o.rerank else None,
                             join_parts=join_parts)
    return ScoreResult(opts.output, opts.sidecar, document)


def join_parts(opts: ScoreOptions, directory: Path | None) -> Any:
    """A directory (or glob) of parts scored as one input into one output: --rerank ranks a
    query's rows across every part."""
    from ..io.parts import joined_parts

    return joined_parts(opts.input, opts.format, chunk_size=opts.chunk_size or 10_000,
                        max_line_bytes=opts.max_line_bytes, directory=directory)  # type: ignore[arg-type]


def pack(value: Scored) -> bytes:
    return _PACKED.pack(_MAGIC, value.score, value.count, value.windows, value.truncated)


def unpack(raw: bytes) -> Scored | None:
    """A cached Scored, or None where the bytes are not one (computed again)."""
    if len(raw) != _PACKED.size:
        return None
    magic, score, count, windows, truncated = _PACKED.unpack(raw)
    if magic != _MAGIC or not np.isfinite(score) or windows < 1:
        return None
    return Scored(float(score), int(count), int(windows), bool(truncated))


class ScoreTask:
    """The score job on the chunk core. Units are pair keys; a value is a Scored."""

    job = "score"
    max_batch_tokens = None
    split_mode = None  # a long document is windowed by the scorer, inside one pair's value

    def __init__(self, scorer: Any, opts: ScoreOptions):
        self.backend, self.opts = scorer, opts
        self.added_columns = score_columns(opts)

    @property
    def batch_texts(self) -> int:
        # a remote scorer wants enough pairs per call to keep all its connections busy
        return self.backend.batch_texts or self.opts.batch_size or 32

    def setup_seconds(self) -> dict[str, float]:
        return self.backend.setup_seconds()

    def watch(self, note: Callable[[str], None]) -> None:
        self.backend.watch(note)

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        found: dict[int, Any] = {}
        for i, raw in cache.lookup_bytes(texts, self.backend.fingerprint()).items():
            value = unpack(raw)
            if value is None:
                cache.stats.rejected += 1
                cache.stats.unhit(1)
            else:
                found[i] = value
        return found

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        pairs = [Pair(*parse_pair_key(t)) for t in texts]
        counts = self.backend.pair_counts(pairs)
        limit = self.backend.max_length
        return list(zip(pairs, counts)), [min(c, limit) for c in counts]

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        pairs, counts = zip(*items) if items else ((), ())
        values = self.backend.score(list(pairs), list(counts))
        return values, sum(v.count if v.windows > 1 else min(v.count, self.backend.max_length) for v in values)

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        cache.store_bytes(texts, [pack(v) for v in values], self.backend.fingerprint())

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        return []

    def truncated(self, values: Sequence[Any]) -> list[bool]:
        return [v.truncated for v in values]

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        return pa.schema(list(passthrough) + [
            pa.field("score", pa.float32()), pa.field("n_tokens", pa.int32()), pa.field("n_windows", pa.int32()),
            pa.field("truncated", pa.bool_()), pa.field("score_error", pa.string())])

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        got = [values[r] if r >= 0 else None for r in rows]
        limit = self.backend.max_length
        return [
            pa.array([g.score if g else None for g in got], pa.float32()),
            pa.array([(g.count if g.windows > 1 else min(g.count, limit)) if g else None for g in got], pa.int32()),
            pa.array([g.windows if g else None for g in got], pa.int32()),
            pa.array([g.truncated if g else None for g in got], pa.bool_()),
            pa.array(errors, pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        described = self.backend.describe()
        max_length = self.backend.max_length
        return {"kind": "cross-encoder", "query_column": self.opts.query_column, "text_column": self.opts.text_column,
                "max_length": None if max_length == UNKNOWN_MAX_LENGTH else max_length, "aggregate": self.opts.aggregate or "max",
                "overlap": described.get("overlap"), "activation": described.get("activation"),
                "rerank": self.opts.rerank}

    def split(self, texts: Sequence[str]) -> list[Any]:
        raise NotImplementedError("score windows long documents inside the scorer")

    def combine(self, values: Sequence[Any], tokens: int) -> Any:
        raise NotImplementedError("score windows long documents inside the scorer")

    def calibrate(self, sample: Any) -> None:
        return None


# --- --rerank K --------------------------------------------------------------------------------------

def helper_name(taken: Sequence[str], base: str) -> str:
    """`base`, with underscores added until no column of `taken` has the name."""
    name = base
    while name in taken:
        name += "_"
    return name


class Rerank:
    """The run's sink for --rerank (jobs/core.Sync): every scored row goes to a temp file beside
    the output; the commit publishes each query's best K, ranked (see the module docstring)."""

    def __init__(self, opts: ScoreOptions):
        self.opts = opts

    def passthrough(self, schema: pa.Schema) -> pa.Schema:
        return schema

    def select(self, v: ValidatedChunk) -> ValidatedChunk:
        return v

    def open_sink(self, schema: pa.Schema) -> "RerankSink":
        return RerankSink(self.opts, schema)

    def close(self) -> None:
        return None


class RerankSink:
    """Takes the scored rows (`rows` counts them, for rows in == rows out); `commit` ranks and
    publishes; `abort` leaves nothing."""

    def __init__(self, opts: ScoreOptions, schema: pa.Schema):
        self.opts, self.schema = opts, schema
        self.spill = local_temp_for(opts.output)  # (a killed run's: cleared by the next run's plan)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(self.spill), schema)
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        assert self._writer is not None
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def ranked(self) -> pa.Table:
        import polars as pl

        assert self._writer is not None
        self._writer.close()
        self._writer = None
        scored = pq.read_table(self.spill)
        query = self.opts.query_column
        row, first = (helper_name(scored.schema.names, base) for base in ("__row", "__first"))  # never an input's
        frame = pl.from_arrow(scored).with_row_index(row)  # type: ignore[union-attr]
        text = self.opts.text_column
        if text in frame.columns:  # one pair, one score: the same pair scored in two batches (two chunks, two
            # Ray actors at once) can differ by ~1e-7, which would rank its copies against input order
            frame = frame.with_columns(pl.col("score").first().over([query, text]))
        frame = frame.with_columns(
            pl.col("score").rank("ordinal", descending=True).over(query).cast(pl.Int32).alias("rank"),
            pl.col(row).min().over(query).alias(first))
        kept = frame.filter(pl.col("rank").is_null() | (pl.col("rank") <= self.opts.rerank))
        kept = kept.sort([first, "rank", row], nulls_last=True).drop([row, first])
        table = kept.to_arrow()
        out_schema = self.schema.append(pa.field("rank", pa.int32()))
        return pa.table([table.column(n).cast(f.type) for n, f in zip(out_schema.names, out_schema)], schema=out_schema)

    def commit(self, document: dict[str, Any], sidecar: Any = None) -> None:
        table = self.ranked()
        metrics = document["metrics"]
        metrics["rows_scored"] = metrics.get("rows_written")
        metrics["rows_written"] = table.num_rows
        provenance = document.setdefault("provenance", {})
        if isinstance(provenance.get("output"), dict):
            provenance["output"]["rows"] = table.num_rows
        provenance["rerank"] = {"k": self.opts.rerank, "rows_scored": self.rows, "rows_kept": table.num_rows,
                                "queries": len(set(table.column(self.opts.query_column).to_pylist()))}
        try:
            publish_table(self.opts.output, table, document, sidecar)
        finally:
            self.spill.unlink(missing_ok=True)

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass
            self._writer = None
        self.spill.unlink(missing_ok=True)
